"""A real one-node Slurm cluster on localhost for tests: munged + slurmctld + slurmd.

Uses Debian's `slurm-wlm` and `munge` packages. Everything the daemons write (state, spool,
logs, pid files, the munge socket) lives in one temporary directory, and the ports are free
ones picked at start, so the cluster leaves nothing behind and does not clash with another
copy of itself. The daemons are stopped by their pid files.

`unavailable_reason()` says why such a cluster cannot be started here (packages missing, not
root), or returns None.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")
MUNGE_KEY = Path("/etc/munge/munge.key")


def unavailable_reason() -> Optional[str]:
    """Why a local Slurm cannot be started here, or None."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return (f"Slurm/munge not installed (missing {', '.join(missing)}); install with "
                "`apt-get install -y slurm-wlm munge` (the CI script does this when run as root)")
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd launches jobs as their user)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "user 'munge' does not exist (the munge package creates it)"
    if not MUNGE_KEY.exists():
        return f"{MUNGE_KEY} is missing (the munge package creates it)"
    return None


@contextmanager
def running_cluster(prefix: str) -> Iterator["SlurmCluster"]:
    """A started cluster with an empty `work` directory, stopped and removed afterwards (kept,
    and its path printed, with SLURM_TEST_KEEP set); raises SlurmError if it does not start.

    Not pytest's tmp_path: its parent is private to root, and munged runs as user munge."""
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    cluster = SlurmCluster(root / "cluster")
    try:
        cluster.start()
    except Exception as e:
        shutil.rmtree(root, ignore_errors=True)
        raise SlurmError(f"Slurm is installed but the local cluster did not start: {e}") from e
    cluster.work = root / "work"
    cluster.work.mkdir()
    try:
        yield cluster
    finally:
        cluster.stop()
        if os.environ.get("SLURM_TEST_KEEP"):  # keep job logs, checkpoints and daemon logs to look at
            print(f"\nSlurm test files kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    """A test module's local Slurm (skipped, with the reason, where it cannot start here)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    try:
        with running_cluster("slurm-test-") as c:
            yield c
    except SlurmError as e:
        pytest.fail(str(e))


def _free_ports(n: int) -> List[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """Start with `start()`, stop with `stop()`; `env` is the environment for Slurm commands."""

    def __init__(self, root: Path, cpus: Optional[int] = None):
        self.root = Path(root)
        self.cpus = cpus or os.cpu_count() or 1
        self.node = socket.gethostname()
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_dir = self.root / "munge"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.pid_files = {
            "slurmd": self.root / "run" / "slurmd.pid",
            "slurmctld": self.root / "run" / "slurmctld.pid",
            "munged": self.munge_dir / "munged.pid",
        }
        self.env: Dict[str, str] = dict(os.environ, SLURM_CONF=str(self.conf))
        for var in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # an outer allocation's variables would confuse our commands
                del self.env[var]

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        for sub in ("etc", "run", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            self._write_conf()
            self._daemon("slurmctld", ["slurmctld", "-f", str(self.conf)])
            self._daemon("slurmd", ["slurmd", "-f", str(self.conf)])
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the daemons by pid file: slurmd, then slurmctld, then munged."""
        for name in ("slurmd", "slurmctld", "munged"):
            pid_file = self.pid_files[name]
            try:
                pid = int(pid_file.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
            _terminate(pid)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def _start_munge(self) -> None:
        # munged refuses directories that other users can write to and runs as user munge.
        munge = pwd.getpwnam("munge")
        self.munge_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        # Our temp root may be world-writable-with-sticky (/tmp); munged checks the socket's
        # directory only, so a private subdirectory owned by munge is enough.
        cmd = ["runuser", "-u", "munge", "--", "munged", f"--socket={self.munge_socket}",
               f"--pid-file={self.pid_files['munged']}", f"--log-file={self.munge_dir / 'munged.log'}",
               f"--seed-file={self.munge_dir / 'munged.seed'}", f"--key-file={MUNGE_KEY}"]
        self._run_daemon_cmd("munged", cmd)
        deadline = time.time() + 15
        while not self.munge_socket.exists():
            if time.time() > deadline:
                raise SlurmError(f"munged did not create {self.munge_socket}: {self._tail('munge/munged.log')}")
            time.sleep(0.1)

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = _free_ports(2)
        r = self.root
        self.conf.write_text(f"""\
# Generated for a one-node test cluster on localhost.
ClusterName=localtest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={self.pid_files['slurmctld']}
SlurmdPidFile={self.pid_files['slurmd']}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/builtin
ReturnToService=2
JobRequeue=1
# Short timers: tests wait on job state changes.
KillWait=10
MinJobAge=300
InactiveLimit=0
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _run_daemon_cmd(self, name: str, cmd: List[str]) -> None:
        res = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if res.returncode != 0:
            raise SlurmError(f"{name} failed to start (exit {res.returncode}): {res.stderr.strip() or res.stdout.strip()}")

    def _daemon(self, name: str, cmd: List[str]) -> None:
        self._run_daemon_cmd(name, cmd)
        deadline = time.time() + 20
        while not self.pid_files[name].exists():
            if time.time() > deadline:
                raise SlurmError(f"{name} wrote no pid file: {self._tail(f'log/{name}.log')}")
            time.sleep(0.1)

    def wait_idle(self, timeout: float) -> None:
        """Poll until the node is idle (no job running or completing on it)."""
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            res = self.run(["sinfo", "-h", "-N", "-o", "%T"], check=False)
            state = res.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmError(f"node never became idle (sinfo says {state!r}); slurmctld log: "
                         f"{self._tail('log/slurmctld.log')}; slurmd log: {self._tail('log/slurmd.log')}")

    def _tail(self, rel: str, n: int = 15) -> str:
        try:
            return "\n".join((self.root / rel).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return f"({rel} missing)"

    # -- commands ----------------------------------------------------------------------------
    def run(self, cmd: List[str], check: bool = True, cwd=None, env: Optional[dict] = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
        res = subprocess.run(cmd, env=env or self.env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr.strip()}")
        return res

    def job(self, job_id: str) -> Dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, StdOut, ...)."""
        out = self.run(["scontrol", "show", "-o", "job", job_id]).stdout
        fields = {}
        for token in out.split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def wait(self, job_id: str, states, timeout: float) -> Dict[str, str]:
        """Poll until the job's state is one of `states`; raise with the last state on timeout."""
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} not in {states} after {timeout:.0f}s: {info.get('JobState')} "
                         f"(reason {info.get('Reason')}); slurmctld log: {self._tail('log/slurmctld.log')}")


def _real_memory_mb() -> int:
    """Most of this machine's memory, in MB: jobs that ask for memory (--mem-per-cpu) can then be
    placed; slurmd drains a node that has less than its configured RealMemory."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.9) >> 20


def _terminate(pid: int, timeout: float = 15.0) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
