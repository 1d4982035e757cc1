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
  True, a monkeypatched runner or a forged report cannot make a failing test pass. The verdict
  travels on a pipe only the harness holds, never on the candidate's output.

Isolation (`sandbox="bwrap"`, the default) uses bubblewrap: each process gets new mount, PID,
network (no interfaces), IPC, UTS and user namespaces; the file system is read-only system
directories (/usr and the Python installation) plus a size-limited tmpfs work dir (`/work`,
`disk_mb`), nothing of the caller's files, home or /tmp; /dev and / are read-only. A seccomp
filter (`sandbox_seccomp.py`) refuses new processes, ptrace, pidfd signals, namespace and
mount changes, non-Unix sockets and other host-reaching syscalls. When the caller is root, the
sandboxed code runs as uid 65534 (no capabilities), so RLIMIT_NPROC applies and root-owned
files stay read-only to it. Limits: wall clock `timeout_s` (both process trees SIGKILLed),
RLIMIT_CPU, RLIMIT_AS = `memory_mb`, RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_NPROC, no core
dumps, a clean environment, and a byte cap on the candidate's stdout + stderr
(`max_output_bytes`, read incrementally; the sandbox is killed at the cap). An audit hook in
the candidate process also refuses (and reports as "forbidden") process creation, sockets,
ctypes and writes outside the work dir; it is a policy layer, not the security boundary.

Where bubblewrap or user namespaces are missing, `run_code_tests` raises
`SandboxUnavailableError` saying what is missing and how to install it. Setting
`CODE_SANDBOX=unsafe_local` (or `sandbox="unsafe_local"`) runs the same two processes as plain
local subprocesses with the resource limits but without namespaces or seccomp: the harness
still judges the results, but candidate code can read and write whatever the caller can. Use
it only for code you trust.

Candidate code runs on the standard library only (`python -I -S`, no site-packages).
"""

from __future__ import annotations

import collections
import json
import math
import os
import platform
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

from data_prep.verifiers import sandbox_seccomp

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
STATUSES = ("passed", "failed", "error", "timeout", "memory", "forbidden", "output_limit", "crashed")
SANDBOX_ENV = "CODE_SANDBOX"
SANDBOX_MODES = ("bwrap", "unsafe_local")
SANDBOX_WORKDIR = "/work"
_KEEP_CHARS = 8192           # characters of stdout / stderr kept in the result
_MAX_VERDICT = 4 << 20       # bytes accepted from the harness
_HARNESS_MEMORY_MB = 1024
_NPROC = 64                  # tasks (threads) per sandbox user namespace


class SandboxUnavailableError(RuntimeError):
    """The isolated sandbox cannot run here; the message says what is missing."""


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


# ------------------------------------------------------------------------------ environment

def sandbox_mode(sandbox: Optional[str] = None) -> str:
    """The mode to use: the argument, else $CODE_SANDBOX, else "bwrap"."""
    mode = sandbox or os.environ.get(SANDBOX_ENV) or "bwrap"
    if mode not in SANDBOX_MODES:
        raise ValueError(f"code sandbox: unknown mode {mode!r} (from {'the sandbox argument' if sandbox else SANDBOX_ENV}); "
                         f"choose one of {SANDBOX_MODES}")
    return mode


def _python() -> Tuple[str, List[str]]:
    """The base interpreter (not a venv wrapper) and the directories it needs, resolved."""
    exe = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    dirs = sorted({os.path.realpath(sys.base_prefix), os.path.realpath(sys.base_exec_prefix)})
    return exe, dirs


_INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install bubblewrap`; Fedora/RHEL: `dnf install bubblewrap`; "
                 "Arch: `pacman -S bubblewrap`)")
_UNSAFE_HINT = (f"or set {SANDBOX_ENV}=unsafe_local to run candidate code without isolation "
                "(only for code you trust)")


@lru_cache(maxsize=1)
def _bwrap_problem() -> Optional[str]:
    """None when the bubblewrap sandbox works here, else what is missing and how to fix it."""
    if shutil.which("bwrap") is None:
        return f"bubblewrap (`bwrap`) is not installed: {_INSTALL_HINT}, {_UNSAFE_HINT}"
    if not sandbox_seccomp.supported():
        return (f"the seccomp filter has no syscall table for this machine ({platform.machine()}; "
                f"known: {sorted(sandbox_seccomp.ARCHES)}); {_UNSAFE_HINT}")
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        return f"`unshare` (util-linux) is needed to run the sandbox as an unprivileged user when the caller is root; {_UNSAFE_HINT}"
    try:
        exe, _ = _python()
        with _Sandbox("bwrap", memory_mb=256, disk_mb=1, timeout_s=20) as box:
            proc = box.spawn_probe([exe, "-I", "-S", "-c", "import os; print(os.getuid())"])
            out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        return f"bubblewrap did not start a test sandbox within 20 s; {_UNSAFE_HINT}"
    except SandboxUnavailableError as exc:
        return str(exc)
    except OSError as exc:
        return f"bubblewrap could not be started ({exc}); {_UNSAFE_HINT}"
    if proc.returncode != 0:
        return (f"bubblewrap is installed but cannot create the sandbox's namespaces: {err.strip()[-500:]!r}. "
                "Unprivileged user namespaces must be allowed (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0, and on Ubuntu 24.04+ an AppArmor profile for bwrap or "
                f"kernel.apparmor_restrict_unprivileged_userns=0); {_UNSAFE_HINT}")
    return None


def sandbox_problem(sandbox: Optional[str] = None) -> Optional[str]:
    """None when `run_code_tests` can run in this mode here, else why not (and how to fix it)."""
    return None if sandbox_mode(sandbox) == "unsafe_local" else _bwrap_problem()


# ------------------------------------------------------------------------------ processes


class _Sandbox:
    """Spawns the sandboxed processes of one run; owns the fds and the per-run user namespace."""

    def __init__(self, mode: str, memory_mb: int, disk_mb: int, timeout_s: float):
        self.mode, self.memory_mb, self.disk_mb, self.timeout_s = mode, memory_mb, disk_mb, timeout_s
        self.fds: List[int] = []
        self.userns_fd: Optional[int] = None
        self.tmp: Optional[tempfile.TemporaryDirectory] = None
        self.procs: List[subprocess.Popen] = []

    def __enter__(self):
        if self.mode == "bwrap" and os.geteuid() == 0:
            self.userns_fd = _make_userns()
            self.fds.append(self.userns_fd)
        if self.mode == "unsafe_local":
            self.tmp = tempfile.TemporaryDirectory(prefix="sandbox-")
        return self

    def __exit__(self, *exc):
        for proc in self.procs:
            _kill(proc)
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if self.tmp is not None:
            self.tmp.cleanup()

    def memfd(self, data: bytes) -> int:
        fd = os.memfd_create("sandbox", 0)
        self.fds.append(fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def workdir(self) -> str:
        return self.tmp.name if self.tmp is not None else SANDBOX_WORKDIR

    def _bwrap_argv(self, runner_fd: Optional[int]) -> Tuple[List[str], List[int]]:
        exe, prefixes = _python()
        argv = ["bwrap"]
        if self.userns_fd is not None:   # root caller: a namespace whose uid 65534 is the host's 65534
            argv += ["--userns", str(self.userns_fd), "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            argv += ["--unshare-user"]
        argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--die-with-parent", "--new-session", "--clearenv",
                 "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SANDBOX_WORKDIR,
                 "--setenv", "TMPDIR", SANDBOX_WORKDIR, "--setenv", "LANG", "C.UTF-8",
                 "--ro-bind", "/usr", "/usr"]
        for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            path = "/" + name
            if os.path.islink(path):
                argv += ["--symlink", os.readlink(path), path]
            elif os.path.isdir(path):
                argv += ["--ro-bind", path, path]
        argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        binds = [d for d in prefixes if d != "/usr" and not d.startswith("/usr/")]
        if not any(exe.startswith(p + os.sep) for p in prefixes + ["/usr"]):
            binds.append(exe)
        made = set()
        for d in binds:   # parents readable by the sandbox user (bwrap would copy e.g. /root's 0700)
            for parent in reversed(Path(d).parents[:-1] if len(Path(d).parents) > 1 else []):
                if str(parent) not in made and str(parent) not in ("/usr", "/"):
                    made.add(str(parent))
                    argv += ["--perms", "0755", "--dir", str(parent)]
            argv += ["--ro-bind", d, d]
        pass_fds = []
        if runner_fd is not None:
            argv += ["--ro-bind-data", str(runner_fd), "/opt/sandbox/runner.py"]
            pass_fds.append(runner_fd)
        seccomp_fd = self.memfd(sandbox_seccomp.filter_bytes())
        pass_fds.append(seccomp_fd)
        argv += ["--proc", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                 "--perms", "1777", "--size", str(self.disk_mb << 20), "--tmpfs", SANDBOX_WORKDIR,
                 "--chdir", SANDBOX_WORKDIR, "--remount-ro", "/", "--seccomp", str(seccomp_fd), "--"]
        if self.userns_fd is not None:
            pass_fds.append(self.userns_fd)
        return argv, pass_fds

    def spawn_probe(self, cmd: List[str]) -> subprocess.Popen:
        prefix, pass_fds = self._bwrap_argv(None)
        proc = subprocess.Popen(prefix + cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                pass_fds=pass_fds, env={}, start_new_session=True, text=True)
        self.procs.append(proc)
        return proc

    def spawn(self, role: str, fds: List[int], limits: dict, stdout: int, stderr: int) -> subprocess.Popen:
        exe, _ = _python()
        limits = dict(limits, drop_uid=self.userns_fd is not None, workdir=self.workdir())
        if self.mode == "bwrap":
            runner_fd = self.memfd(_RUNNER.read_bytes())
            prefix, pass_fds = self._bwrap_argv(runner_fd)
            runner, cwd = "/opt/sandbox/runner.py", None
        else:
            prefix, pass_fds, runner, cwd = [], [], str(_RUNNER), self.workdir()
        cmd = prefix + [exe, "-I", "-S", "-u", runner, role] + [str(fd) for fd in fds] + [json.dumps(limits)]
        env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir(), "TMPDIR": self.workdir(), "LANG": "C.UTF-8"}
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, cwd=cwd,
                                pass_fds=pass_fds + fds, env=env, start_new_session=True)
        self.procs.append(proc)
        return proc


def _make_userns() -> int:
    """A user namespace mapping uid/gid 0 and 65534 to themselves; returns an fd for `bwrap --userns`.

    bwrap sets the sandbox up as the namespace's uid 0 (which can reach a root-only Python
    install), then the runner switches to 65534 before any candidate code runs."""
    helper = subprocess.Popen(["unshare", "--user", "sleep", "30"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
    try:
        own = os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while True:
            try:
                if os.readlink(f"/proc/{helper.pid}/ns/user") != own:
                    break
            except OSError:
                pass
            if helper.poll() is not None or time.monotonic() > deadline:
                raise SandboxUnavailableError(
                    "code sandbox: `unshare --user` could not create a user namespace "
                    f"({helper.stderr.read().decode(errors='replace').strip()[-300:]!r}); {_UNSAFE_HINT}")
            time.sleep(0.0005)
        for kind in ("uid", "gid"):
            with open(f"/proc/{helper.pid}/{kind}_map", "w") as f:
                f.write("0 0 1\n65534 65534 1\n")
        return os.open(f"/proc/{helper.pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        helper.kill()
        helper.wait()


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the process group (bwrap and, through --die-with-parent and the PID namespace, all in it)."""
    for fn in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
        try:
            fn()
        except (ProcessLookupError, PermissionError, OSError):
            pass


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
                   *, sandbox: Optional[str] = None, disk_mb: int = 32,
                   max_output_bytes: int = 1 << 20, _audit_hook: bool = True) -> CodeResult:
    """Run `code`, then judge each test snippet (e.g. "assert f(2) == 4") against it, sandboxed.

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
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        herr_r, herr_w = os.pipe()
        started_r, started_w = os.pipe()
        box.fds += [req_r, req_w, resp_r, resp_w, verdict_r, verdict_w, out_r, out_w, err_r, err_w, herr_r, herr_w,
                    started_r, started_w]
        cand_job = box.memfd(json.dumps({"code": code}).encode())
        harn_job = box.memfd(json.dumps({"tests": tests}).encode())
        box.spawn("candidate", [cand_job, req_r, resp_w, started_w],
                  {"as_bytes": memory_mb << 20, "cpu_s": cpu_s, "fsize_bytes": min(disk_mb, 16) << 20, "nproc": _NPROC,
                   "audit_hook": bool(_audit_hook)},
                  stdout=out_w, stderr=err_w)
        box.spawn("harness", [harn_job, resp_r, req_w, verdict_w],
                  {"as_bytes": _HARNESS_MEMORY_MB << 20, "cpu_s": cpu_s, "fsize_bytes": 1 << 20, "nproc": _NPROC},
                  stdout=subprocess.DEVNULL, stderr=herr_w)
        for fd in (req_r, req_w, resp_r, resp_w, verdict_w, out_w, err_w, herr_w, started_w):  # the children hold these now
            os.close(fd)
            box.fds.remove(fd)
        outcome = _collect(box, verdict_r, out_r, err_r, herr_r, started_r, start, timeout_s, max_output_bytes)
    verdicts, summary, why, stdout, stderr, herr = outcome
    duration = time.monotonic() - start
    passed = sum(1 for v in verdicts if v.get("ok") is True)
    errors = [str(v.get("error") or "") for v in verdicts]
    if why is not None or summary is None:
        status = why or "crashed"
        if status == "crashed":
            stderr = (stderr + "\n[harness] " + herr).strip()
        return CodeResult(status, passed, len(tests), errors, [], stdout, stderr, duration)
    violations = [str(v) for v in summary.get("violations") or []]
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


def _collect(box: _Sandbox, verdict_r: int, out_r: int, err_r: int, herr_r: int, started_r: int, start: float,
             timeout_s: float, max_output: int):
    """Read every pipe without blocking until the harness's summary, the deadline or a cap.

    The deadline is timeout_s after the candidate process signals (on `started_r`) that it is
    about to run the code, and never later than timeout_s + _STARTUP_ALLOWANCE_S after `start`."""
    latest = start + timeout_s + _STARTUP_ALLOWANCE_S
    deadline = latest
    out, err, herr = _Capture(_KEEP_CHARS), _Capture(_KEEP_CHARS, tail=True), _Capture(_KEEP_CHARS, tail=True)
    verdict_buf = bytearray()
    verdicts: List[dict] = []
    summary, why = None, None
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
                    verdict_buf += chunk
                    if len(verdict_buf) > _MAX_VERDICT:
                        why = "crashed"
                        break
                    summary = _parse_frames(verdict_buf, verdicts) or summary
                if out.count + err.count > max_output:
                    why = "output_limit"
                    break
            if why is not None:
                break
            if summary is not None and grace_end is None:
                grace_end = time.monotonic() + 0.05
    finally:
        sel.close()
        for proc in box.procs:
            _kill(proc)
    stderr = err.text()
    if why == "output_limit":
        stderr = (stderr + f"\n[sandbox] killed: more than {max_output} bytes of output").strip()
    return verdicts, summary, why, out.text(), stderr, herr.text()


def _parse_frames(buf: bytearray, verdicts: List[dict]) -> Optional[dict]:
    """Consume complete frames from buf; per-test verdicts go to `verdicts`; returns the summary if seen."""
    summary = None
    while len(buf) >= 4:
        n = int.from_bytes(buf[:4], "big")
        if len(buf) < 4 + n:
            break
        msg = json.loads(bytes(buf[4:4 + n]))
        del buf[:4 + n]
        if msg.get("done"):
            summary = msg
        else:
            verdicts.append(msg)
    return summary
