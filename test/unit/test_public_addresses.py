"""public_address_statement.md lists every public URL, e-mail address and IP in the repo's files.

ModelZoo reviews require the statement to be complete: each public address that appears in a
git-tracked file must have a row naming that file and that address. Loopback, private and
link-local addresses and file:// URLs are not public and need no row.
"""
import ipaddress
import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

REPO = Path(__file__).resolve().parents[2]
STATEMENT = "public_address_statement.md"

URL = re.compile(r"""\b(?:https?|ftp)://[^\s<>"'`)\]}|\\]+""")
EMAIL = re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.])")
NOT_PUBLIC_HOSTS = {"localhost"}


def _is_public_ip(text):
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:  # e.g. 999.1.1.1 is a version-like string, not an address
        return False


def _is_public_url(url):
    host = urlsplit(url).hostname or ""
    if host in NOT_PUBLIC_HOSTS:
        return False
    try:
        return ipaddress.ip_address(host).is_global
    except ValueError:
        return True


def find_addresses(text):
    """The public addresses in `text`: URLs (trailing punctuation dropped), e-mails, IPv4s."""
    found = set()
    for match in URL.finditer(text):
        url = match.group(0).rstrip(".,;:!?*'")
        if _is_public_url(url):
            found.add(url)
    without_urls = URL.sub(" ", text)
    found.update(m.group(0) for m in EMAIL.finditer(without_urls))
    found.update(ip for ip in IPV4.findall(without_urls) if _is_public_ip(ip))
    return found


def tracked_files():
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the statement is checked against git-tracked files")
    return [name for name in out.decode().split("\0") if name and name != STATEMENT]


def statement_rows():
    """(file name, address) of every row of the statement's table."""
    table = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
             for line in (REPO / STATEMENT).read_text(encoding="utf-8").splitlines()
             if line.lstrip().startswith("|")]
    body = [cells for cells in table[1:] if not set("".join(cells)) <= set("-: ")]  # header, separator
    assert all(len(cells) == 5 for cells in body), f"{STATEMENT}: every row needs 5 columns"
    return {(cells[2], cells[3]) for cells in body}


def test_finder_sees_urls_emails_and_public_ips_only():
    # The sample addresses are assembled at run time so that this file itself contains none.
    url, mail, ip = "https:" + "//example.org/van", "a.b" + "@example.org", "8.8." + "8.8"
    text = (f"see {url}. or mail {mail}, bind 127.0.0.1 and 192.168.1.10, host {ip}, version 1.20.3, "
            "http://localhost:8080/x file:///opt/wheels and decorator @pytest.mark.slow, Acc@1 83.5")
    assert find_addresses(text) == {url, mail, ip}


def test_statement_parser_reads_file_and_address_columns(tmp_path):
    rows = statement_rows()
    assert rows, "the statement has no table rows"
    assert all(file and address for file, address in rows)


def test_every_public_address_in_tracked_files_is_in_the_statement():
    rows = statement_rows()
    missing = []
    for name in tracked_files():
        path = REPO / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary files carry no readable addresses
        for address in sorted(find_addresses(data.decode("utf-8", errors="replace"))):
            if (name, address) not in rows:
                missing.append(f"| 开发引入 | / | {name} | {address} | <用途> |")
    assert not missing, f"add these rows to {STATEMENT} (and say what each is used for):\n" + "\n".join(missing)


def test_statement_lists_no_stale_addresses():
    current = {}
    for name in tracked_files():
        path = REPO / name
        if path.is_file() and b"\0" not in (data := path.read_bytes()):
            current[name] = find_addresses(data.decode("utf-8", errors="replace"))
    stale = [f"{file}: {address}" for file, address in sorted(statement_rows())
             if address not in current.get(file, set())]
    assert not stale, f"rows of {STATEMENT} whose address is no longer in that file:\n" + "\n".join(stale)
