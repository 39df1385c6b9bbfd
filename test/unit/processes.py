"""Child processes of the tests (main.py, torchrun and its workers), always watched with a deadline.

A test that reads a child's output line by line, or waits for its end, does it here: when the deadline
passes (a deadlocked worker, a torchrun waiting for one) the test fails with what it was waiting for
and the output so far, after killing the child and every process below it, instead of blocking the
whole suite until CI's own timeout. Every child gets its own session (process group); torchrun's
workers may be in sessions of their own, so the processes below a child are found through /proc.
"""
import os
import queue
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import List, Optional

TAIL_CHARS = 3000  # of the output shown in a failure


def process_tree(pid: int) -> List[int]:
    """`pid` and every process below it, parents first (Linux /proc; elsewhere just `pid`)."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop(0)
        found.append(current)
        for task in Path(f'/proc/{current}/task').glob('*'):
            try:
                pending += [int(child) for child in (task / 'children').read_text().split()]
            except OSError:  # the task ended meanwhile
                pass
    return found


def has_exited(pid: int) -> bool:
    """Whether `pid` has exited (gone, or a zombie waiting for its parent)."""
    try:
        return Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0] in ('Z', 'X')
    except (OSError, IndexError):
        return True


def kill_tree(process: subprocess.Popen, settle_s: float = 10.0) -> None:
    """SIGKILL `process`, every process below it and its process group; reap it, and wait (up to `settle_s`)
    until the others have exited too: SIGKILL is delivered at once but a busy machine runs the exit later."""
    tree = process_tree(process.pid) if process.poll() is None else []  # found before any dies: orphans leave it
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)  # a child started in its session; the group may outlive it
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()
    settled = time.monotonic() + settle_s
    while time.monotonic() < settled and not all(has_exited(pid) for pid in tree[1:]):
        time.sleep(0.01)


def _name(command) -> str:
    """The start of a command line, each part cut to its first line (a `python -c` script)."""
    parts = [str(part).strip().splitlines()[0][:60] if str(part).strip() else repr(part) for part in command[:6]]
    return ' '.join(parts) + (' ...' if len(command) > 6 else '')


def _hang_message(command, waited_for: str, deadline_s: float, output: str) -> str:
    return (f'{waited_for} did not come within {deadline_s:.0f} s from `{_name(command)}`: it hangs, so it and '
            f'every process below it were killed. Its output so far (last {TAIL_CHARS} characters):\n'
            f'{output[-TAIL_CHARS:]}')


class Watched:
    """`command` started in its own session, stdout and stderr merged and read line by line by a thread.
    One deadline (seconds from the start) bounds every wait; use it as a context manager, which kills
    whatever is still running at the end of the block."""

    def __init__(self, command, deadline_s: float, **popen_kwargs):
        self.command, self.deadline_s = [str(part) for part in command], deadline_s
        self.lines: List[str] = []
        self._deadline = time.monotonic() + deadline_s
        self._ended = False
        self._queue: 'queue.Queue[Optional[str]]' = queue.Queue()
        self.process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        start_new_session=True, **popen_kwargs)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)  # end of the output: every process holding the pipe has closed it

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def output(self) -> str:
        return ''.join(self.lines)

    def _left(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def _next_line(self, waited_for: str) -> Optional[str]:
        """The next line, or None at the end of the output; fails the test when the deadline passes first."""
        if self._ended:
            return None
        try:
            line = self._queue.get(timeout=self._left())
        except queue.Empty:
            self.hung(waited_for)
        if line is None:
            self._ended = True
        else:
            self.lines.append(line)
        return line

    def read_until(self, prefix: str) -> str:
        """Read up to the first line starting with `prefix` and return it."""
        while True:
            line = self._next_line(f'A line starting with {prefix!r}')
            if line is None:
                status = self.process.wait(timeout=max(1.0, self._left()))
                raise AssertionError(f'`{_name(self.command)}` ended (exit status {status}) without a line starting '
                                     f'with {prefix!r}; its output (last {TAIL_CHARS} characters):\n'
                                     f'{self.output[-TAIL_CHARS:]}')
            if line.startswith(prefix):
                return line

    def finish(self) -> int:
        """Read the rest of the output and wait for the exit; return the exit status."""
        while self._next_line('The end of the output') is not None:
            pass
        try:
            return self.process.wait(timeout=self._left())
        except subprocess.TimeoutExpired:
            self.hung('The exit')

    def send_signal(self, signum: int) -> None:
        """Send `signum` to the child alone."""
        self.process.send_signal(signum)

    def signal_group(self, signum: int) -> None:
        """Send `signum` to the child's process group, as a scheduler, torchrun or Ctrl-C does."""
        os.killpg(self.process.pid, signum)

    def hung(self, waited_for: str):
        kill_tree(self.process)
        raise AssertionError(_hang_message(self.command, waited_for, self.deadline_s, self.output))

    def __enter__(self) -> 'Watched':
        return self

    def __exit__(self, *exc_info) -> None:
        kill_tree(self.process)
        self._reader.join(timeout=10)  # the output ends once every process holding the pipe is gone
        if not self._reader.is_alive():
            self.process.stdout.close()


def run_watched(command, deadline_s: float, **popen_kwargs) -> subprocess.CompletedProcess:
    """subprocess.run(command, capture_output=True, text=True) in its own session; when `deadline_s` passes
    first, the child and every process below it are killed and the test fails with their output."""
    command = [str(part) for part in command]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, **popen_kwargs)
    try:
        stdout, stderr = process.communicate(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        raise AssertionError(_hang_message(command, 'The end', deadline_s, f'{stdout}\n--- stderr:\n{stderr}')) from None
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C of the test run)
            kill_tree(process)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
