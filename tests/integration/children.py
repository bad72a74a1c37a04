"""Running child processes from a test: lines out with deadlines, a line in, SIGKILL, and no process left behind."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]


class Child:
    """A Python script run with this interpreter; its stdout is read line by line, its stderr kept for messages."""

    def __init__(self, script: Path, *args: str) -> None:
        # As a module of the repository, so that it imports tests.support as the tests do.
        module = ".".join(script.resolve().relative_to(REPO).with_suffix("").parts)
        self.proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        self._stderr.extend(self.proc.stderr)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)[-4000:]

    def expect(self, prefix: str, timeout: float) -> str:
        """The next stdout line starting with `prefix`; fails if the child exits or the deadline passes first."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"no line {prefix!r} from the child within {timeout} s; stderr:\n"
                                     f"{self.stderr}") from None
            if line is None:
                self.proc.wait(timeout=30)
                raise AssertionError(f"the child exited ({self.proc.returncode}) before printing {prefix!r}; "
                                     f"stderr:\n{self.stderr}")
            if line.startswith(prefix):
                return line

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """SIGKILL: no handler, no finally block, no flush runs in the child."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        assert self.proc.returncode == -signal.SIGKILL

    def finish(self, timeout: float) -> int:
        """Wait for the child to exit on its own; fails (and kills it) if it is still running at the deadline."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            raise AssertionError(f"the child did not finish within {timeout} s; stderr:\n{self.stderr}") from None
        for t in self._readers:
            t.join(timeout=30)
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        for t in self._readers:
            t.join(timeout=30)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                try:
                    stream.close()
                except OSError:
                    pass

    def __enter__(self) -> Child:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
