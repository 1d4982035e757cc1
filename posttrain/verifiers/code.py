"""Run candidate Python code against assert-style tests in a sandboxed subprocess.

    result = run_code_tests("def add(a, b): return a + b", ["assert add(1, 2) == 3"], timeout_s=5, memory_mb=256)
    result.status, result.passed, result.total, result.all_passed

Each call starts a fresh `python -I -S` in a new session (its own process group) inside a
temporary working directory that is deleted afterwards, with:

- wall-clock timeout: the whole process group is SIGKILLed when `timeout_s` passes
  (catches `sleep`, blocking reads and infinite loops); RLIMIT_CPU is a backstop;
- memory: RLIMIT_AS = `memory_mb` (a 10 GB allocation raises MemoryError inside);
- files: RLIMIT_FSIZE 16 MiB, RLIMIT_NOFILE 64, no core dumps; writes, renames and deletes
  outside the work dir are refused;
- processes: an audit hook refuses fork/exec/spawn/system/subprocess (a fork bomb stops at its
  first fork), and RLIMIT_NPROC caps processes where it is enforced (not for root);
- network: a fresh network namespace (`unshare -rn`) when the kernel allows it, and in every
  case the audit hook refuses socket creation and imports of socket/ssl/subprocess/ctypes/...
  (`FORBIDDEN_MODULES`).

Limits of this sandbox (document, do not overstate): it protects the host from accidents and
ordinary misbehaviour of generated code. Candidate code shares its interpreter with the test
harness, so a deliberately adversarial program could tamper with how its own tests are judged,
and reading files outside the work dir is allowed. For hostile code use a container or VM.
"""

from __future__ import annotations

import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List, Sequence, Union

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
STATUSES = ("passed", "failed", "error", "timeout", "memory", "forbidden", "crashed")


@dataclass
class CodeResult:
    """Outcome of one sandboxed run.

    status: "passed" (every test passed), "failed" (some test failed), "error" (the code itself
    raised, e.g. a SyntaxError), "timeout", "memory" (MemoryError or killed near the memory
    limit), "forbidden" (a sandbox rule was hit), "crashed" (died without reporting).
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


@lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """Whether `unshare -rn` can give the sandbox a network namespace with no interfaces up."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _limits(timeout_s: float, memory_mb: int):
    """preexec_fn: rlimits for the child (runs after fork, before exec)."""
    mem = memory_mb * 1024 * 1024
    cpu = int(timeout_s) + 2

    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if os.geteuid() != 0:  # the kernel does not enforce NPROC for root
            resource.setrlimit(resource.RLIMIT_NPROC, (64, 64))
    return apply


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _classify(report: dict, total: int) -> str:
    if report["violations"]:
        return "forbidden"
    errors = [r["error"] or "" for r in report["results"]] + [report["load_error"] or ""]
    if any(e.startswith("MemoryError") for e in errors):
        return "memory"
    if report["load_error"]:
        return "error"
    return "passed" if all(r["ok"] for r in report["results"]) and total else "failed"


def _parse_report(stdout: str, nonce: str):
    for line in reversed(stdout.splitlines()):
        if line.startswith(nonce):
            return json.loads(line[len(nonce):])
    return None


def run_code_tests(code: str, tests: Union[str, Sequence[str]], timeout_s: float = 5.0,
                   memory_mb: int = 512) -> CodeResult:
    """Run `code`, then each test snippet (e.g. "assert f(2) == 4") in its namespace, sandboxed."""
    if not isinstance(code, str):
        raise TypeError(f"run_code_tests: code must be a str, got {type(code).__name__}")
    tests = [tests] if isinstance(tests, str) else list(tests)
    if timeout_s <= 0 or memory_mb < 64:
        raise ValueError(f"run_code_tests: need timeout_s > 0 and memory_mb >= 64, got {timeout_s}, {memory_mb}")
    nonce = "@@result-" + secrets.token_hex(8) + "@@"
    cmd = [sys.executable, "-I", "-S", str(_RUNNER)]
    if network_namespace_available():
        cmd = ["unshare", "-rn"] + cmd
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        payload = json.dumps({"code": code, "tests": tests, "nonce": nonce, "workdir": workdir})
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True,
                                preexec_fn=_limits(timeout_s, memory_mb), text=True)
        try:
            out, err = proc.communicate(payload, timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            out, err = proc.communicate()
            timed_out = True
        _kill_group(proc)  # anything the candidate left behind in its group
    duration = time.monotonic() - start
    report = None if timed_out else _parse_report(out, nonce)
    if report is None:
        status = "timeout" if timed_out or proc.returncode == -signal.SIGXCPU else (
            "memory" if "MemoryError" in err else "crashed")
        return CodeResult(status, 0, len(tests), stderr=err[-4000:], duration_s=duration)
    passed = sum(r["ok"] for r in report["results"])
    return CodeResult(_classify(report, len(tests)), passed, len(tests),
                      [r["error"] or "" for r in report["results"]], report["violations"],
                      report["stdout"], err[-4000:], duration)
