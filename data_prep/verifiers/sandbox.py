"""Process isolation for `code.run_code_tests`: how the two processes of one run are started,
bounded, killed and reaped, and whether the isolated sandbox works here.

It holds `_Sandbox` (bubblewrap's argument list, spawning the harness and the candidate with the
limits the runner applies, the memfds they read, the pidfd kill and reaping), `start_run` (the
pipes and limits of one run), the availability probe (`_bwrap_problem`, `sandbox_problem`), the
mode selection (`sandbox_mode`, $CODE_SANDBOX) and `SandboxUnavailableError`. It sits apart from
`code.py`, which runs the tests and reads the verdicts, so each can be read on its own;
`code.py` imports this module, never the reverse.

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
IPC namespace goes with the sandbox. The caller (`code.run_code_tests`) bounds the wall clock
(`timeout_s`: both sandboxes SIGKILLed) and the stdout + stderr bytes (`max_output_bytes`, read
incrementally; killed at the cap), and reaps every process of a call, also when it runs as
PID 1 of a container (see `_Sandbox.kill`). Not bounded per run: the kernel's reclaimable dentry cache
(e.g. lookups of missing names). No memory cgroup is used. An audit hook in the candidate
process also refuses (and reports as "forbidden") process creation, sockets, ctypes and writes
outside the work dir; it is a policy layer, not the security boundary: the tests show each
attack contained without it.

Candidate code runs on the standard library only (`python -I -S`, no site-packages).
"""

from __future__ import annotations

import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Tuple

from data_prep.verifiers import sandbox_seccomp

_RUNNER = Path(__file__).with_name("_sandbox_runner.py")
SANDBOX_ENV = "CODE_SANDBOX"
SANDBOX_MODES = ("bwrap", "unsafe_local")
SANDBOX_WORKDIR = "/work"
_HARNESS_MEMORY_MB = 1024
_NPROC = 64                  # tasks (threads) per sandbox user namespace
_WORK_INODES = 4096          # files (inodes) in a work dir: ~1 KiB of kernel memory each
_PROC_STAGE = "/.proc-setup"  # the PID namespace's procfs, until the runner's set-up replaces /proc


class SandboxUnavailableError(RuntimeError):
    """The isolated sandbox cannot run here; the message says what is missing."""


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


def start_run(box: _Sandbox, key: bytes, candidate_job: dict, harness_job: dict, cpu_s: int,
              audit_hook: bool) -> Tuple[int, int, int, int, int]:
    """Start one run's harness, then its candidate, in `box`, wired by pipes (`_sandbox_runner.py`).

    Returns this process's read ends (`box` closes them): the verdict pipe, the candidate's
    stdout and stderr, the harness's stderr and the candidate's "started" pipe."""
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
    os.write(key_w, key)
    os.close(key_w)
    cand_job = box.memfd(json.dumps(candidate_job).encode())
    harn_job = box.memfd(json.dumps(harness_job).encode())
    box.spawn("harness", [harn_job, resp_r, req_w, verdict_w, key_r],
              {"as_bytes": _HARNESS_MEMORY_MB << 20, "cpu_s": cpu_s, "fsize_bytes": 1 << 20, "nproc": _NPROC},
              stdout=subprocess.DEVNULL, stderr=herr_w)
    for fd in (key_r, harn_job):  # only the harness holds these now
        os.close(fd)
        box.fds.remove(fd)
    box.spawn("candidate", [cand_job, req_r, resp_w, started_w],
              {"as_bytes": box.memory_mb << 20, "cpu_s": cpu_s, "fsize_bytes": min(box.disk_mb, 16) << 20,
               "nproc": _NPROC, "audit_hook": bool(audit_hook)},
              stdout=out_w, stderr=err_w)
    for fd in (req_r, req_w, resp_r, resp_w, verdict_w, out_w, err_w, herr_w, started_w):  # the children hold these now
        os.close(fd)
        box.fds.remove(fd)
    return verdict_r, out_r, err_r, herr_r, started_r
