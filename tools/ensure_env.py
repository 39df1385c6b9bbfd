#!/usr/bin/env python3
"""Find a Python that has the repository's requirements, or set up a virtual environment that has them.

test/demo.sh and test/unit_tests.sh call this through test/env_python.sh, with the system's `python3`:

    python3 tools/ensure_env.py requirements.txt [requirements-dev.txt]

It picks the interpreter and prints shell lines for `eval` on stdout (`export PYTHON=...`, plus
VIRTUAL_ENV and PATH when that interpreter lives in a virtual environment); everything meant for the
user (the one line naming the interpreter, pip's progress, errors) goes to stderr. Exit status 1 with
one `error:` line when no usable environment could be had (Python too old, venv module missing, a
package pip could not install).

The choice:
1. Unless $VAN_VENV is set, the current interpreter ($PYTHON, else $VIRTUAL_ENV/bin/python, else
   `python3`/`python` on PATH) is used as it is when it meets every requirement and MIN_PYTHON.
   Nothing is installed into it.
2. Otherwise the managed virtual environment ($VAN_VENV, default <repo>/.venv) is used: created when
   missing (with `python3.11`, the tested version, when on PATH, else `python3`), and pip installs the
   requirement files into it when it lacks something or when a requirement file changed since its last
   install (a hash of each file is kept in <venv>/requirements.sha256).

"Meets a requirement" is decided by `--check`, run under the candidate interpreter: the installed
distributions (importlib.metadata) against each requirement line, compared with `packaging` as pip
does. The rest uses only the standard library and keeps to syntax old interpreters can parse, so that
an old `python3` can still report "too old" and create the environment with a newer one.
"""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# The oldest Python the code supports; the one place that says so.
MIN_PYTHON = (3, 9)
# Preferred for a new virtual environment: the version CI and the measurements use.
TESTED_PYTHON = "python3.11"
REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_VAR = "VAN_VENV"
DEFAULT_VENV = REPO_ROOT / ".venv"
STAMP_NAME = "requirements.sha256"
BAD_REQUIREMENTS = 3  # exit status of --check for a requirement file it cannot read


class EnvError(Exception):
    """A problem the user has to fix; the message says what and how."""


def version_text(version_tuple):
    return ".".join(str(part) for part in version_tuple)


# --- requirement files and the check -------------------------------------------------------------

# pip options that only say where to find packages; they do not change what must be installed.
_INDEX_OPTIONS = ("-i", "--index-url", "--extra-index-url", "--no-index", "-f", "--find-links", "--pre",
                  "--trusted-host", "--prefer-binary", "--only-binary", "--no-binary", "-c", "--constraint")


def read_requirement_lines(path, _seen=None):
    """The requirement lines of a pip requirement file, following `-r other.txt`.

    Returns ([(where, line)], [files read]); where is 'file:line number'. Comments and index options
    are dropped; other pip options raise ValueError (the check would not know what they mean).
    """
    path = Path(path)
    seen = _seen if _seen is not None else []
    if path.resolve() in seen:
        return [], []
    seen.append(path.resolve())
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ValueError("cannot read the requirement file %s: %s" % (path, err.strerror or err))
    lines, files = [], [path]
    for number, raw in enumerate(text.splitlines(), 1):
        line = re.sub(r"(^|\s)#.*$", "", raw).strip()
        if not line:
            continue
        where = "%s:%d" % (path.name, number)
        if line.startswith("-"):
            option, _, value = line.replace("=", " ", 1).partition(" ")
            if option in ("-r", "--requirement"):
                included, included_files = read_requirement_lines(path.parent / value.strip(), seen)
                lines += included
                files += included_files
            elif option not in _INDEX_OPTIONS:
                raise ValueError("%s: cannot check the pip option line %r" % (where, line))
        else:
            lines.append((where, line))
    return lines, files


def normalize_name(name):
    """PEP 503: 'PyYAML', 'scikit_learn' -> 'pyyaml', 'scikit-learn'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_versions():
    """{normalized name: version} of the distributions this interpreter imports (first on sys.path wins)."""
    from importlib import metadata  # Python 3.8+; imported late so older interpreters reach the version check
    versions = {}
    for distribution in metadata.distributions():
        name = distribution.metadata["Name"]
        if name and normalize_name(name) not in versions:
            versions[normalize_name(name)] = distribution.version
    return versions


def unmet_requirements(lines, installed):
    """One sentence per requirement line that `installed` ({normalized name: version}) does not meet.

    Uses `packaging` (requirements.txt lists it, so an interpreter without it lacks a requirement
    anyway): PEP 440 versions and specifiers, PEP 508 markers of this interpreter; installed
    pre-releases count where their number fits, as in `pip check`; extras are not followed.
    """
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:
        # Without packaging only presence can be told; say so rather than guess at versions.
        names = [re.split(r"[\s\[<>=!~;(@]", line, 1)[0] for _, line in lines]
        return ["packaging not installed (the version check needs it)"] + \
            ["%s not installed" % name for name in names
             if normalize_name(name) not in installed and normalize_name(name) != "packaging"]
    problems = []
    for where, line in lines:
        try:
            requirement = Requirement(line)
        except InvalidRequirement as err:
            raise ValueError("%s: %s" % (where, err))
        if requirement.url:
            raise ValueError("%s: cannot check a requirement given by URL: %r" % (where, line))
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        have = installed.get(normalize_name(requirement.name))
        wanted = str(requirement.specifier) or "any version"
        if have is None:
            problems.append("%s not installed (%s needs %s)" % (requirement.name, where, wanted))
            continue
        try:
            fits = requirement.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            fits = False
        if not fits:
            problems.append("%s %s installed, %s needs %s" % (requirement.name, have, where, wanted))
    return problems


def python_problem(version_info):
    """The sentence saying this Python is too old, or None."""
    if tuple(version_info[:2]) < MIN_PYTHON:
        return "Python %s is older than %s, the oldest this code supports" % (
            version_text(version_info[:3]), version_text(MIN_PYTHON))
    return None


def check_this_interpreter(files):
    """What `--check` prints: this interpreter, its prefixes and the unmet requirements (JSON-able)."""
    problem = python_problem(sys.version_info)
    report = {"executable": sys.executable, "version": version_text(sys.version_info[:3]),
              "prefix": sys.prefix, "base_prefix": getattr(sys, "base_prefix", sys.prefix),
              "unmet": [problem] if problem else []}
    if not problem:
        lines = []
        for path in files:
            lines += read_requirement_lines(path)[0]
        report["unmet"] = unmet_requirements(lines, installed_versions())
    return report


# --- choosing and preparing the interpreter -------------------------------------------------------

def inspect_interpreter(python, files):
    """Runs `--check` under `python`: (report dict, None) or (None, why it could not run)."""
    try:
        done = subprocess.run([str(python), str(Path(__file__).resolve()), "--check"] + [str(f) for f in files],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as err:
        return None, "cannot run %s: %s" % (python, err)
    if done.returncode == BAD_REQUIREMENTS:
        raise EnvError(done.stderr.strip().replace("error: ", "", 1))
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return None, "%s failed: %s" % (python, lines[-1] if lines else "exit status %d" % done.returncode)
    try:
        return json.loads(done.stdout), None
    except ValueError:
        return None, "%s printed no report" % python


def current_interpreter(environ):
    """(path, how it was found): $PYTHON, else the active virtual environment, else python3/python on PATH."""
    if environ.get("PYTHON"):
        return environ["PYTHON"], "$PYTHON"
    if environ.get("VIRTUAL_ENV"):
        python = Path(environ["VIRTUAL_ENV"]) / "bin" / "python"
        if python.exists():
            return str(python), "the active virtual environment"
    for name in ("python3", "python"):
        found = shutil.which(name, path=environ.get("PATH", os.defpath))
        if found:
            return found, "%s on PATH" % name
    return sys.executable, "the Python running this script"


def probe_version(python):
    """(major, minor, micro) of an interpreter, or None when it does not run."""
    try:
        done = subprocess.run([python, "-c", "import sys; print('%d %d %d' % sys.version_info[:3])"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, universal_newlines=True, timeout=60)
        return tuple(int(part) for part in done.stdout.split()) if done.returncode == 0 else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def choose_venv_python(environ, probe=probe_version):
    """(path, version, name) of the interpreter to create the virtual environment with: the tested
    version when on PATH, else python3, else python, the first at least MIN_PYTHON."""
    seen, found = set(), []
    for name in (TESTED_PYTHON, "python3", "python"):
        path = shutil.which(name, path=environ.get("PATH", os.defpath))
        if not path or os.path.realpath(path) in seen:
            continue
        seen.add(os.path.realpath(path))
        version = probe(path)
        if version is None:
            continue
        if not python_problem(version):
            return path, version, name
        found.append("%s is Python %s (%s)" % (name, version_text(version), path))
    raise EnvError("no Python %s or newer to create the virtual environment with (%s); install one, e.g. "
                   "`sudo apt install %s %s-venv` on Debian/Ubuntu, then rerun"
                   % (version_text(MIN_PYTHON), "; ".join(found) or "none of %s, python3, python on PATH"
                      % TESTED_PYTHON, TESTED_PYTHON, TESTED_PYTHON))


def shorten(problems, shown=3):
    """The first problems joined, then how many more."""
    text = "; ".join(problems[:shown])
    return text + ("; and %d more" % (len(problems) - shown) if len(problems) > shown else "")


def _is_within(path, folder):
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _remove_venv(venv):
    """Deletes a broken virtual environment, never a folder that is not one."""
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists() and any(venv.iterdir()):
            raise EnvError("%s exists but is not a virtual environment (no pyvenv.cfg); move it away or set "
                           "%s to another folder" % (venv, VENV_VAR))
        shutil.rmtree(str(venv))


def create_venv(venv, environ, log):
    creator, version, name = choose_venv_python(environ)
    note = ", the tested version" if name == TESTED_PYTHON else ""
    log("Creating the virtual environment %s with %s (Python %s at %s%s)"
        % (venv, name, version_text(version), creator, note))
    _remove_venv(venv)
    done = subprocess.run([creator, "-m", "venv", str(venv)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          universal_newlines=True)
    if done.returncode != 0:
        output = done.stdout.strip()
        shutil.rmtree(str(venv), ignore_errors=True)
        hint = ""
        if "ensurepip" in output:
            hint = "; on Debian/Ubuntu install the venv module: sudo apt install python%d.%d-venv" % version[:2]
        last = output.splitlines()[-1] if output else "exit status %d" % done.returncode
        raise EnvError("could not create the virtual environment %s with %s: %s%s" % (venv, creator, last, hint))


def requirement_hashes(files):
    """sha256 of each requirement file together with the files it includes (-r)."""
    hashes = []
    for path in files:
        digest = hashlib.sha256()
        for part in read_requirement_lines(path)[1]:
            digest.update(part.read_bytes())
        hashes.append(digest.hexdigest())
    return hashes


def stamp_covers(venv, hashes):
    try:
        installed = set((venv / STAMP_NAME).read_text().split())
    except OSError:
        return False
    return set(hashes) <= installed


_PIP_FAILURES = (
    re.compile(r"No matching distribution found for (\S+)"),
    re.compile(r"Could not find a version that satisfies the requirement (\S+)"),
    re.compile(r"Failed (?:building wheel for|to build) (.+?)\s*$"),
    re.compile(r"Cannot install (.+?)(?: because|$)"),
    re.compile(r"Could not build wheels for (.+?)(?:,| which|$)"),
)


def pip_failure(lines, status):
    """One sentence naming what pip could not install, from its output (it reports the package in its
    error lines; without one, the last package it was collecting)."""
    for line in reversed(lines):
        for pattern in _PIP_FAILURES:
            match = pattern.search(line)
            if match:
                return "pip could not install %s (%s)" % (match.group(1).strip(), line.strip())
    collecting = [line.split(None, 1)[1].strip() for line in lines
                  if line.startswith("Collecting ") and len(line.split(None, 1)) == 2]
    errors = [line.strip() for line in lines if line.lstrip().upper().startswith("ERROR")]
    detail = errors[-1] if errors else "exit status %d" % status
    if collecting:
        return "pip failed while installing %s (%s)" % (collecting[-1], detail)
    return "pip failed before naming a package (%s)" % detail


def pip_install(python, files, log):
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check"]
    for path in files:
        command += ["-r", str(path)]
    log("Running: %s" % " ".join(shlex.quote(part) for part in command))
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                               encoding="utf-8", errors="replace")
    lines = []
    for line in process.stdout:
        sys.stderr.write(line)
        lines.append(line.rstrip("\n"))
    status = process.wait()
    if status != 0:
        raise EnvError("%s; fix that and rerun (the environment is kept)" % pip_failure(lines, status))


def ensure_venv(venv, files, environ, log):
    """The managed virtual environment, created or updated until it meets `files`; returns its report."""
    python = venv / "bin" / "python"
    names = ", ".join(Path(f).name for f in files)
    created = False
    report, why = inspect_interpreter(python, files) if python.exists() else (None, "no %s" % python)
    if report is not None and python_problem(tuple(int(p) for p in report["version"].split("."))):
        report, why = None, "its Python %s is too old" % report["version"]
    if report is None:
        if venv.exists():
            log("The virtual environment %s is unusable (%s): creating it again" % (venv, why))
        create_venv(venv, environ, log)
        created = True
        report, why = inspect_interpreter(python, files)
        if report is None:
            raise EnvError("the new virtual environment %s does not work: %s" % (venv, why))
    hashes = requirement_hashes(files)
    updated = False
    stamp = venv / STAMP_NAME
    if report["unmet"] or not stamp_covers(venv, hashes):
        if created:
            reason = "new environment"
        elif report["unmet"]:
            reason = "it lacks: " + shorten(report["unmet"])
        elif stamp.exists():
            reason = "%s changed since the last install" % names
        else:
            reason = "no record of installing %s here" % names
        log("Installing %s into %s (%s)" % (names, venv, reason))
        if stamp.exists():
            stamp.unlink()  # an interrupted install must not look finished
        pip_install(python, files, log)
        report, why = inspect_interpreter(python, files)
        if report is None or report["unmet"]:
            raise EnvError("after pip install, %s still does not meet %s: %s"
                           % (venv, names, why or "; ".join(report["unmet"])))
        stamp.write_text("".join(h + "\n" for h in hashes))
        updated = True
    state = "created now" if created else "updated now" if updated else "up to date"
    log("Using Python %s at %s (virtual environment %s, %s)" % (report["version"], python, venv, state))
    return str(python), report


def ensure_environment(files, environ, log):
    """Returns (interpreter path, its --check report); see the module docstring for the choice."""
    files = [Path(f).resolve() for f in files]
    names = ", ".join(f.name for f in files)
    for path in files:
        read_requirement_lines(path)  # an unreadable file stops here, before anything is created
    venv = Path(os.path.abspath(environ.get(VENV_VAR) or str(DEFAULT_VENV)))
    if environ.get(VENV_VAR):
        log("%s=%s: using that virtual environment" % (VENV_VAR, venv))
    else:
        python, how = current_interpreter(environ)
        if not _is_within(python, venv):
            report, why = inspect_interpreter(python, files)
            if report is not None and not report["unmet"]:
                log("Using Python %s at %s (%s; it meets %s)" % (report["version"], python, how, names))
                return python, report
            lacks = why if report is None else "lacks: " + shorten(report["unmet"])
            log("%s (%s) %s" % (python, how, lacks))
    return ensure_venv(venv, files, environ, log)


def shell_exports(python, report):
    """Lines for `eval` in bash: PYTHON, and VIRTUAL_ENV/PATH when the interpreter is in a venv."""
    lines = ["export PYTHON=%s" % shlex.quote(python)]
    if report["prefix"] != report["base_prefix"]:
        bin_dir = os.path.join(report["prefix"], "bin")
        lines += ["export VIRTUAL_ENV=%s" % shlex.quote(report["prefix"]),
                  'export PATH=%s:"$PATH"' % shlex.quote(bin_dir),
                  "unset PYTHONHOME"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--check":
        try:
            print(json.dumps(check_this_interpreter(argv[1:])))
        except ValueError as err:  # a requirement file the check cannot read: not this interpreter's fault
            print("error: %s" % err, file=sys.stderr)
            return BAD_REQUIREMENTS
        return 0

    def log(message):
        print(message, file=sys.stderr, flush=True)

    try:
        python, report = ensure_environment(argv, os.environ, log)
    except (EnvError, ValueError) as err:
        print("error: %s" % err, file=sys.stderr)
        return 1
    sys.stdout.write(shell_exports(python, report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
