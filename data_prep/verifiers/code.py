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
  travels on a pipe only the harness holds, never on the candidate's output; every frame on it
  carries a keyed BLAKE2b tag under a random per-run key that only the harness receives (on a
  pipe it reads once at start-up), and each test's verdict counts once. A frame with a wrong
  tag stops the reading and makes the run "forbidden".

Test oracles come from the problem, never from the candidate: helpers the tests call (HumanEval's
`poly`, `encode_cyclic`, `encode_shift`; a GRPO row's "setup") are passed as `trusted_setup`,
which the harness executes itself after binding the candidate's names, so a candidate that
redefines such a helper changes only its own process, not the tests' oracle.

Isolation (`sandbox="bwrap"`, the default) uses bubblewrap: each process gets new mount, PID,
network (no interfaces), IPC, UTS and user namespaces; the file system is read-only system
directories (/usr and the Python installation) plus the work dir (`/work`), nothing of the
caller's files, home or /tmp; /, /dev (so /dev/shm too) and /proc are read-only. /proc holds
only the process's own fd table (`/proc/self/fd`): no kernel command line, boot id, mount
table, other processes or host statistics. The runner sets this up itself (`setup_sandbox` in
`_sandbox_runner.py`) as the namespace's root before reading its job, then loads the full
seccomp filter (`sandbox_seccomp.py`: no new processes, ptrace, pidfd signals, namespace or
mount changes, non-Unix sockets, memfd, System V IPC, POSIX message queues, inotify and other
host-reaching syscalls) and drops every capability: when the caller is root the code runs as
uid 65534, so RLIMIT_NPROC applies and root-owned files stay read-only to it; otherwise as the
namespace's root, which is the caller's uid outside, without capabilities. The fds bubblewrap
passes on (user namespace, its info pipe, memfds) are closed there too.

What the kernel bounds, per process (candidate and harness each): its address space (RLIMIT_AS
= `memory_mb`; the harness 1 GiB), CPU time (RLIMIT_CPU), output file size (RLIMIT_FSIZE),
open fds (RLIMIT_NOFILE 64, which also bounds pipe and socket buffers), threads (RLIMIT_NPROC),
queued signals and POSIX timers (RLIMIT_SIGPENDING), no core dumps; its work dir is its own
tmpfs of `disk_mb` bytes and 4096 inodes (files, directories, links: about 1 KiB of kernel
memory each); shared memory outside the address space cannot be made at all (memfd_create,
shmget and the other System V and POSIX IPC calls are refused; /dev/shm is read-only), and the
IPC namespace goes with the sandbox. The caller bounds the wall clock (`timeout_s`: both
sandboxes SIGKILLed) and the stdout + stderr bytes (`max_output_bytes`, read incrementally;
killed at the cap), and reaps every process of a call, also when it runs as PID 1 of a
container (see `_Sandbox.kill`). Not bounded per run: the kernel's reclaimable dentry cache
(e.g. lookups of missing names). No memory cgroup is used. An audit hook in the candidate
process also refuses (and reports as "forbidden") process creation, sockets, ctypes and writes
outside the work dir; it is a policy layer, not the security boundary: the tests show each
attack contained without it.

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
import platform
import select
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
_KEY_BYTES = 32              # the per-run verdict key (`_sandbox_runner.KEY_BYTES`)
_TAG_BYTES = 32              # tag on each verdict frame (`_sandbox_runner.TAG_BYTES`)
_TAG_PERSON = b"sbx-verdict"
_HARNESS_MEMORY_MB = 1024
_NPROC = 64                  # tasks (threads) per sandbox user namespace
_WORK_INODES = 4096          # files (inodes) in a work dir: ~1 KiB of kernel memory each
_PROC_STAGE = "/.proc-setup"  # the PID namespace's procfs, until the runner's set-up replaces /proc


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
        with _Sandbox("bwrap", memory_mb=256, disk_mb=1, timeout_s=20) as box:
            proc = box.spawn_probe()
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
        self.inner: dict = {}   # bubblewrap's pid -> pidfd of its child (the sandbox's PID-namespace init)

    def __enter__(self):
        if self.mode == "bwrap" and os.geteuid() == 0:
            self.userns_fd = _make_userns()
            self.fds.append(self.userns_fd)
        if self.mode == "unsafe_local":
            self.tmp = tempfile.TemporaryDirectory(prefix="sandbox-")
        return self

    def __exit__(self, *exc):
        self.kill()
        for fd in self.fds + list(self.inner.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        if self.tmp is not None:
            self.tmp.cleanup()

    def kill(self) -> None:
        """SIGKILL every sandbox of this run and reap everything this process has to reap.

        bubblewrap's child (the PID namespace's init; killing it kills the namespace) is killed
        first through a pidfd; bubblewrap then exits (a bubblewrap still there 2 s later is
        killed with its process group). bubblewrap does not always reap its child before it
        exits (it leaves as soon as the sandboxed command has ended), so that child is
        re-parented to the nearest subreaper: init, or this process when it is PID 1 (a
        container without an init) or a subreaper. In the latter case it is reaped here,
        through the same pidfd (which cannot name a recycled pid), so no zombie outlives the
        call. This process is not made a subreaper: that would hand it every orphan of the
        caller's other children too."""
        for proc in self.procs:
            pidfd = self.inner.get(proc.pid)
            if pidfd is None or not _pidfd_kill(pidfd):
                _kill(proc)
        deadline = time.monotonic() + 2.0
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(proc)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        for pidfd in self.inner.values():
            _reap(pidfd)

    def memfd(self, data: bytes) -> int:
        fd = os.memfd_create("sandbox", os.MFD_CLOEXEC)   # inherited only where passed (pass_fds)
        self.fds.append(fd)
        os.write(fd, data)
        os.lseek(fd, 0, os.SEEK_SET)
        return fd

    def workdir(self) -> str:
        return self.tmp.name if self.tmp is not None else SANDBOX_WORKDIR

    def _bwrap_argv(self, runner_fd: int, info_fd: int) -> Tuple[List[str], List[int]]:
        exe, prefixes = _python()
        argv = ["bwrap"]
        if self.userns_fd is not None:   # root caller: a namespace whose uid 65534 is the host's 65534
            argv += ["--userns", str(self.userns_fd), "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:   # the namespace's root (the caller's uid outside); the runner keeps no capability
            argv += ["--unshare-user", "--uid", "0", "--gid", "0"]
        argv += ["--cap-add", "CAP_SYS_ADMIN"]   # the runner's own mounts (work dir, /proc), then dropped
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
        argv += ["--ro-bind-data", str(runner_fd), "/opt/sandbox/runner.py"]
        # bubblewrap's program still allows mount/umount2 for the runner's set-up, which then
        # loads the full program (`sandbox_seccomp`); the procfs at _PROC_STAGE and the
        # tmpfs on /work are replaced there (see `_sandbox_runner.setup_sandbox`)
        seccomp_fd = self.memfd(sandbox_seccomp.filter_bytes(setup=True))
        pass_fds = [runner_fd, seccomp_fd, info_fd]
        argv += ["--proc", _PROC_STAGE, "--tmpfs", "/proc", "--dir", "/proc/self", "--dir", "/proc/self/fd",
                 "--remount-ro", "/proc", "--dev", "/dev", "--remount-ro", "/dev",
                 "--perms", "1777", "--size", str(self.disk_mb << 20), "--tmpfs", SANDBOX_WORKDIR,
                 "--chdir", SANDBOX_WORKDIR, "--remount-ro", "/", "--info-fd", str(info_fd),
                 "--seccomp", str(seccomp_fd), "--"]
        if self.userns_fd is not None:
            pass_fds.append(self.userns_fd)
        return argv, pass_fds

    def spawn_probe(self) -> subprocess.Popen:
        """The runner's set-up alone, in a sandbox (`_bwrap_problem`); prints the sandbox uid."""
        return self._start("probe", [], {}, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           env={}, text=True)

    def spawn(self, role: str, fds: List[int], limits: dict, stdout: int, stderr: int) -> subprocess.Popen:
        env = {"PATH": "/usr/bin:/bin", "HOME": self.workdir(), "TMPDIR": self.workdir(), "LANG": "C.UTF-8"}
        return self._start(role, fds, limits, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=env)

    def _start(self, role: str, fds: List[int], limits: dict, **popen) -> subprocess.Popen:
        exe, _ = _python()
        limits = dict(limits, drop_uid=self.userns_fd is not None, workdir=self.workdir())
        info = None
        if self.mode == "bwrap":
            runner_fd = self.memfd(_RUNNER.read_bytes())
            final_fd = self.memfd(sandbox_seccomp.filter_bytes())
            limits["setup"] = {"work": SANDBOX_WORKDIR, "work_bytes": self.disk_mb << 20, "work_inodes": _WORK_INODES,
                               "proc_stage": _PROC_STAGE, "seccomp_fd": final_fd}
            info = os.pipe()
            self.fds += info
            prefix, pass_fds = self._bwrap_argv(runner_fd, info[1])
            pass_fds.append(final_fd)
            runner, cwd = "/opt/sandbox/runner.py", None
        else:
            prefix, pass_fds, runner, cwd = [], [], str(_RUNNER), self.workdir()
        cmd = prefix + [exe, "-I", "-S", "-u", runner, role] + [str(fd) for fd in fds] + [json.dumps(limits)]
        proc = subprocess.Popen(cmd, cwd=cwd, pass_fds=pass_fds + list(fds), start_new_session=True, **popen)
        self.procs.append(proc)
        if info is not None:
            for fd in info:
                self.fds.remove(fd)
            os.close(info[1])
            pidfd = _inner_pidfd(proc, info[0])
            if pidfd is not None:
                self.inner[proc.pid] = pidfd
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


def _inner_pidfd(proc: subprocess.Popen, info_r: int) -> Optional[int]:
    """A pidfd of bubblewrap's child, from the pid bubblewrap writes on --info-fd (before its
    child runs); closes info_r. None when bubblewrap failed first, or where pidfds or a /proc
    of this PID namespace are missing (`kill` then falls back to the process group)."""
    buf, pid = b"", None
    deadline = time.monotonic() + 10
    try:
        while pid is None and time.monotonic() < deadline:
            ready, _, _ = select.select([info_r], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(info_r, 4096) if ready else b""
            if not chunk:
                return None
            buf += chunk
            try:
                pid = int(json.loads(buf)["child-pid"])
            except ValueError:
                continue   # not all of it yet
            except (KeyError, TypeError):
                return None
    finally:
        os.close(info_r)
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    # the pidfd names bubblewrap's child only if bubblewrap (this process's child, not yet
    # reaped, so its pid is not recycled) is its parent
    try:
        with open(f"/proc/{pid}/status") as f:
            ppid = next((int(line.split()[1]) for line in f if line.startswith("PPid:")), None)
    except (OSError, ValueError):
        ppid = None
    if ppid != proc.pid:
        os.close(pidfd)
        return None
    return pidfd


def _pidfd_kill(pidfd: int) -> bool:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:   # ESRCH: it has ended already
        return False


def _reap(pidfd: int) -> None:
    """Reap the process behind `pidfd` if it became this process's child (this process is PID 1
    or a subreaper and its bubblewrap died first); otherwise its parent reaps it."""
    if not hasattr(os, "P_PIDFD"):
        return
    deadline = time.monotonic() + 2.0
    while True:
        try:
            if os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None:
                return
        except OSError:   # ECHILD: not this process's child
            return
        if time.monotonic() > deadline:
            return
        time.sleep(0.002)


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
        req_r, req_w = os.pipe()
        resp_r, resp_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        herr_r, herr_w = os.pipe()
        started_r, started_w = os.pipe()
        key_r, key_w = os.pipe()
        box.fds += [req_r, req_w, resp_r, resp_w, verdict_r, verdict_w, out_r, out_w, err_r, err_w, herr_r, herr_w,
                    started_r, started_w, key_r]
        # The verdict key goes to the harness alone, through a pipe it reads once at start-up;
        # the harness is started first and this process closes its end before the candidate exists.
        key = os.urandom(_KEY_BYTES)
        os.write(key_w, key)
        os.close(key_w)
        cand_job = box.memfd(json.dumps({"code": code, "setup": trusted_setup}).encode())
        harn_job = box.memfd(json.dumps({"tests": tests, "setup": trusted_setup}).encode())
        box.spawn("harness", [harn_job, resp_r, req_w, verdict_w, key_r],
                  {"as_bytes": _HARNESS_MEMORY_MB << 20, "cpu_s": cpu_s, "fsize_bytes": 1 << 20, "nproc": _NPROC},
                  stdout=subprocess.DEVNULL, stderr=herr_w)
        for fd in (key_r, harn_job):  # only the harness holds these now
            os.close(fd)
            box.fds.remove(fd)
        box.spawn("candidate", [cand_job, req_r, resp_w, started_w],
                  {"as_bytes": memory_mb << 20, "cpu_s": cpu_s, "fsize_bytes": min(disk_mb, 16) << 20, "nproc": _NPROC,
                   "audit_hook": bool(_audit_hook)},
                  stdout=out_w, stderr=err_w)
        for fd in (req_r, req_w, resp_r, resp_w, verdict_w, out_w, err_w, herr_w, started_w):  # the children hold these now
            os.close(fd)
            box.fds.remove(fd)
        outcome = _collect(box, _Verdicts(key, len(tests)), verdict_r, out_r, err_r, herr_r, started_r, start,
                           timeout_s, max_output_bytes)
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
