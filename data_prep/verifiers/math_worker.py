"""The math verifier's worker process: sympy runs there, under a time budget and a memory limit.

No signal inside a process can interrupt one long big-integer operation of sympy's, so the only
reliable time limit is to run the comparison in another process and kill that one:

- One worker per calling process, started on first use (`_compare_in_worker`) as a fresh
  interpreter (`subprocess`: fork + exec, so threads, CUDA or process groups of the caller are
  never inherited) and kept: a round trip costs ~0.1 ms. Requests and replies are one JSON line
  each over its stdin/stdout.
- When the budget runs out the caller SIGKILLs the worker and starts a replacement at once
  (~0.5 s of imports, waited for only by the next answer that needs sympy); the answer gets
  reason "timeout". A worker that dies or replies nonsense gives "error" and is replaced.
- A forked child of the caller starts its own worker (`_after_fork_in_child`); `shutdown_worker`
  ends the worker at exit, and a worker exits when its caller's pipe closes, so it cannot
  outlive a killed caller.
- Inside the worker (`_serve`): RLIMIT_AS = `MEMORY_LIMIT_MB` (a MemoryError there is reason
  "too large"), no core files, and RLIMIT_CPU set before each answer to the budget + 2 s, a
  kernel-enforced backstop of the caller's kill.

The comparison itself is `math._compare_here`; `math` imports this module for the client side,
so the worker's entry point (`_WORKER_MAIN`, run in the child only) is what brings the two
together, and neither module imports the other in a cycle. The verdict reasons are defined here,
beside the replies that carry most of them; `math` re-exports them.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import subprocess
import sys
import threading
import time
from math import ceil
from pathlib import Path
from typing import Callable, Optional

from data_prep.verifiers import math_guards

EQUAL, DIFFERENT, NO_ANSWER, TOO_LARGE, TIMEOUT, ERROR = \
    "equal", "different", "no answer", "too large", "timeout", "error"

MEMORY_LIMIT_MB = 1024
"""Address-space limit (RLIMIT_AS) of the worker process that runs sympy."""
_STARTUP_TIMEOUT_S = 60.0  # a fresh worker imports sympy (~0.3 s idle; much more on a loaded host)

_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the data_prep package
# The child's entry point: it brings the comparison (`math`) and the loop (this module) together.
_WORKER_MAIN = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); sys.path[0:1] = [sys.argv[1]]; "
                "from data_prep.verifiers.math import _compare_here; "
                "from data_prep.verifiers.math_worker import _serve; _serve(_compare_here, int(sys.argv[2]))")


def _close_pipes(proc: subprocess.Popen) -> None:
    """Close our ends of the pipes to `proc` (a broken one is as good as closed)."""
    for f in (proc.stdin, proc.stdout):
        try:
            f.close()
        except OSError:
            pass


class _Worker:
    """A persistent child process running `_compare_here` on requests (one JSON line each)."""

    def __init__(self):
        self.proc: Optional[subprocess.Popen] = None
        self.buf = b""
        self.ready = False
        self.seq = 0

    def start(self) -> None:
        # A fresh interpreter (fork + exec): nothing of the caller's threads, CUDA or process
        # group state is inherited; the pipes are its only link.
        try:
            self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN, _ROOT, str(MEMORY_LIMIT_MB)],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True)
        except OSError as e:
            raise RuntimeError(f"cannot start the math verifier's worker process ({sys.executable}): {e}") from e
        self.buf, self.ready = b"", False

    def _readline(self, deadline: float) -> Optional[bytes]:
        """The next line from the worker; None when the deadline passes first; b"" when it died."""
        fd = self.proc.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if not poller.poll(max(1, ceil(left * 1000))):
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                return b""
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def _ensure_ready(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:  # died while idle
            self.close()
        if self.proc is None:
            self.start()
        if not self.ready:
            deadline, line = time.monotonic() + _STARTUP_TIMEOUT_S, b"-"
            while line and line != b"ready":  # (skipping whatever start-up hooks may print)
                line = self._readline(deadline)
            if line != b"ready":
                self.kill()
                raise RuntimeError(f"the math verifier's worker process did not start within {_STARTUP_TIMEOUT_S:.0f}s "
                                   f"(it said {line!r}; its stderr is this process's)")
            self.ready = True

    def compare(self, answer: str, reference: str, timeout_s: float) -> str:
        for _ in range(2):
            self._ensure_ready()
            self.seq += 1
            request = json.dumps({"id": self.seq, "a": answer, "b": reference, "guards": math_guards._STATIC_GUARDS,
                                  "cpu_s": timeout_s}).encode() + b"\n"
            try:
                view = memoryview(request)
                while view:  # small: the idle worker takes it at once
                    view = view[self.proc.stdin.write(view):]
                break
            except OSError:  # it died before reading this answer: once more with a new one
                self.kill()
        else:
            return ERROR
        try:
            line = self._readline(time.monotonic() + timeout_s)
        except BaseException:  # e.g. KeyboardInterrupt: its reply would be stale; start afresh
            self.kill()
            raise
        if line is None:  # out of time: SIGKILL it and start the replacement now
            self.kill()
            try:
                self.start()
            except RuntimeError:  # the next answer tries again (and raises if it still cannot)
                pass
            return TIMEOUT
        try:
            reply = json.loads(line)
            if reply["id"] != self.seq or reply["reason"] not in (EQUAL, DIFFERENT, TOO_LARGE, ERROR):
                raise ValueError(line)
            return reply["reason"]
        except (ValueError, KeyError, TypeError):  # it died (b""), or this is no reply: start afresh
            self.kill()
            return ERROR

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.close()

    def close(self, wait_s: float = 2.0) -> None:
        """Close the pipes (an idle worker exits), reap it (SIGKILL after wait_s)."""
        proc, self.proc, self.ready = self.proc, None, False
        if proc is None:
            return
        _close_pipes(proc)
        try:
            proc.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def detach(self) -> None:
        """In a forked child: drop the parent's worker without touching it (close our copies of
        its pipes, so it still sees end-of-file when the parent goes)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _close_pipes(proc)
            proc.returncode = 0  # not our child: never wait for it


_WORKER: Optional[_Worker] = None
_WORKER_LOCK = threading.Lock()


def _compare_in_worker(answer: str, reference: str, timeout_s: float) -> str:
    global _WORKER
    with _WORKER_LOCK:
        if _WORKER is None:
            _WORKER = _Worker()
        return _WORKER.compare(answer, reference, timeout_s)


def worker_pid() -> Optional[int]:
    """The process id of this process's worker, None when none is running."""
    w = _WORKER
    return w.proc.pid if w is not None and w.proc is not None else None


def shutdown_worker() -> None:
    """End this process's worker (run at exit; the next comparison starts a new one)."""
    global _WORKER
    w, _WORKER = _WORKER, None
    if w is not None:
        w.close()


def _after_fork_in_child() -> None:
    global _WORKER, _WORKER_LOCK
    w, _WORKER, _WORKER_LOCK = _WORKER, None, threading.Lock()
    if w is not None:
        w.detach()


atexit.register(shutdown_worker)
os.register_at_fork(after_in_child=_after_fork_in_child)


def _set_limit(which: int, soft: int) -> None:
    import resource

    _, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard if which == resource.RLIMIT_CPU else soft))


def _serve(compare: Callable[[str, str], str], memory_mb: int) -> None:
    """The worker's loop: one JSON request per line on stdin, answered with `compare(a, b)` (a
    reason) in one reply per line on the original stdout (anything printed goes to stderr);
    ends at end-of-file."""
    import resource

    _set_limit(resource.RLIMIT_AS, memory_mb << 20)
    _set_limit(resource.RLIMIT_CORE, 0)
    out = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)
    out.write(b"ready\n")
    for line in sys.stdin.buffer:
        rid, reason = None, ERROR
        try:
            req = json.loads(line)
            rid, math_guards._STATIC_GUARDS = req["id"], bool(req["guards"])
            used = resource.getrusage(resource.RUSAGE_SELF)
            # A kernel-enforced backstop of the caller's kill: SIGXCPU past the budget + 2 s of CPU.
            _set_limit(resource.RLIMIT_CPU, int(used.ru_utime + used.ru_stime + float(req["cpu_s"])) + 2)
            reason = compare(str(req["a"]), str(req["b"]))
        except Exception:  # noqa: BLE001 - a malformed request or an unforeseen failure: "error"
            pass
        out.write(json.dumps({"id": rid, "reason": reason}).encode() + b"\n")
