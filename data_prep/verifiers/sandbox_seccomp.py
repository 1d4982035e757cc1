"""A seccomp-BPF filter for the code sandbox, built by hand (no libseccomp needed).

`filter_bytes()` returns a classic-BPF program (an array of `struct sock_filter`) in the form
bubblewrap's `--seccomp FD` loads. The filter, applied to the sandboxed interpreter and every
thread it starts:

- kills the process for any architecture other than the native one (32-bit and x32 syscalls
  would bypass a table written for the 64-bit numbers);
- refuses with EPERM the syscalls that reach outside a process: ptrace and cross-process
  memory access, pidfd signals, namespace and mount changes, kernel modules, keyrings, BPF,
  perf, io_uring, userfaultfd, device nodes and FIFOs (`mknod`), clock and host-name changes;
- refuses new *processes*: `fork`, `vfork`, and `clone` without `CLONE_THREAD` or with any
  namespace flag return EPERM; `clone3` returns ENOSYS so the C library falls back to `clone`,
  whose flags the filter can read. Threads are allowed (their number is bounded by the address
  space limit and, where the kernel enforces it, RLIMIT_NPROC);
- allows `socket()` only for AF_UNIX (the network namespace has no interfaces anyway);
- refuses every way to hold memory outside the process's address space (RLIMIT_AS) and outside
  the size-limited work dir: `memfd_create`, `memfd_secret`, System V shared memory, message
  queues and semaphores (`shm*`, `msg*`, `sem*`; 64-bit x86 and arm64 have no `ipc`
  multiplexer, and 32-bit/x32 calls are killed above), POSIX message queues (`mq_*`), and
  inotify/fanotify instances (kernel memory per watch).

Everything else is allowed: the mount, PID, network and user namespaces and the read-only
binds do the rest.

Two programs: `filter_bytes(setup=True)` is loaded by bubblewrap before the sandbox's runner
starts and still allows `mount`/`umount2`, which the runner needs once (as the namespace's root,
before any candidate code) to mount its inode-limited work dir and its /proc; the runner then
loads `filter_bytes()` (both stay in force, so everything above is refused from the first
instruction on and the mount calls from before the candidate's code on) and drops every
capability.
"""

from __future__ import annotations

import errno
import platform
import struct
from functools import lru_cache
from typing import Dict, List, Tuple

# linux/filter.h, linux/seccomp.h, linux/audit.h
_LD_W_ABS = 0x20          # BPF_LD | BPF_W | BPF_ABS
_JEQ_K = 0x15             # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K = 0x35             # BPF_JMP | BPF_JGE | BPF_K
_JSET_K = 0x45            # BPF_JMP | BPF_JSET | BPF_K
_RET_K = 0x06             # BPF_RET | BPF_K
RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
_OFF_NR, _OFF_ARCH, _OFF_ARG0 = 0, 4, 16   # args[0] low 32 bits (little-endian)

CLONE_THREAD = 0x00010000
CLONE_NAMESPACES = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000
                    | 0x40000000 | 0x00000080)   # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
AF_UNIX = 1

_DENIED = ("ptrace", "process_vm_readv", "process_vm_writev", "mount", "umount2", "pivot_root", "chroot",
           "unshare", "setns", "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
           "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot", "swapon",
           "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm", "personality",
           "io_uring_setup", "io_uring_enter", "io_uring_register", "pidfd_open", "pidfd_send_signal",
           "pidfd_getfd", "kcmp", "open_by_handle_at", "name_to_handle_at", "mknod", "mknodat", "fork", "vfork",
           "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr",
           "lookup_dcookie", "vhangup", "settimeofday", "clock_settime", "adjtimex", "clock_adjtime",
           "sethostname", "setdomainname", "move_pages", "migrate_pages",
           # memory that RLIMIT_AS does not count
           "memfd_create", "memfd_secret", "shmget", "shmat", "shmctl", "shmdt", "semget", "semop", "semctl",
           "semtimedop", "msgget", "msgsnd", "msgrcv", "msgctl", "mq_open", "mq_unlink", "mq_timedsend",
           "mq_timedreceive", "mq_notify", "mq_getsetattr", "inotify_init", "inotify_init1", "fanotify_init")
_SETUP_ALLOWED = ("mount", "umount2")   # allowed by the setup program only (see the module doc)

# Syscall numbers (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h). A name missing from
# an architecture's table does not exist there (aarch64 has no fork, vfork, mknod, iopl, ioperm).
_X86_64 = dict(ptrace=101, process_vm_readv=310, process_vm_writev=311, mount=165, umount2=166, pivot_root=155,
               chroot=161, unshare=272, setns=308, bpf=321, perf_event_open=298, userfaultfd=323, keyctl=250,
               add_key=248, request_key=249, kexec_load=246, kexec_file_load=320, init_module=175,
               finit_module=313, delete_module=176, reboot=169, swapon=167, swapoff=168, acct=163, quotactl=179,
               quotactl_fd=443, syslog=103, iopl=172, ioperm=173, personality=135, io_uring_setup=425,
               io_uring_enter=426, io_uring_register=427, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438,
               kcmp=312, open_by_handle_at=304, name_to_handle_at=303, mknod=133, mknodat=259, fork=57, vfork=58,
               fsopen=430, fsconfig=431, fsmount=432, fspick=433, move_mount=429, open_tree=428,
               mount_setattr=442, lookup_dcookie=212, vhangup=153, settimeofday=164, clock_settime=227,
               adjtimex=159, clock_adjtime=305, sethostname=170, setdomainname=171, move_pages=279,
               migrate_pages=256, memfd_create=319, memfd_secret=447, shmget=29, shmat=30, shmctl=31, shmdt=67,
               semget=64, semop=65, semctl=66, semtimedop=220, msgget=68, msgsnd=69, msgrcv=70, msgctl=71,
               mq_open=240, mq_unlink=241, mq_timedsend=242, mq_timedreceive=243, mq_notify=244, mq_getsetattr=245,
               inotify_init=253, inotify_init1=294, fanotify_init=300, socket=41, clone=56, clone3=435)
_AARCH64 = dict(ptrace=117, process_vm_readv=270, process_vm_writev=271, mount=40, umount2=39, pivot_root=41,
                chroot=51, unshare=97, setns=268, bpf=280, perf_event_open=241, userfaultfd=282, keyctl=219,
                add_key=217, request_key=218, kexec_load=104, kexec_file_load=294, init_module=105,
                finit_module=273, delete_module=106, reboot=142, swapon=224, swapoff=225, acct=89, quotactl=60,
                quotactl_fd=443, syslog=116, personality=92, io_uring_setup=425, io_uring_enter=426,
                io_uring_register=427, pidfd_open=434, pidfd_send_signal=424, pidfd_getfd=438, kcmp=272,
                open_by_handle_at=265, name_to_handle_at=264, mknodat=33, fsopen=430, fsconfig=431, fsmount=432,
                fspick=433, move_mount=429, open_tree=428, mount_setattr=442, lookup_dcookie=18, vhangup=58,
                settimeofday=170, clock_settime=112, adjtimex=171, clock_adjtime=266, sethostname=161,
                setdomainname=162, move_pages=239, migrate_pages=238, memfd_create=279, memfd_secret=447,
                shmget=194, shmat=196, shmctl=195, shmdt=197, semget=190, semop=193, semctl=191, semtimedop=192,
                msgget=186, msgsnd=189, msgrcv=188, msgctl=187, mq_open=180, mq_unlink=181, mq_timedsend=182,
                mq_timedreceive=183, mq_notify=184, mq_getsetattr=185, inotify_init1=26, fanotify_init=262,
                socket=198, clone=220, clone3=435)

# machine -> (AUDIT_ARCH_*, syscall table, first number of a foreign ABI sharing the arch value)
ARCHES: Dict[str, Tuple[int, Dict[str, int], int]] = {
    "x86_64": (0xC000003E, _X86_64, 0x40000000),   # x32 syscalls carry bit 30
    "aarch64": (0xC00000B7, _AARCH64, 0),
}


class UnsupportedArchitecture(RuntimeError):
    pass


def _ins(code: int, k: int = 0, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def _program(machine: str, setup: bool = False) -> List[bytes]:
    if machine not in ARCHES:
        raise UnsupportedArchitecture(f"the sandbox's seccomp filter knows {sorted(ARCHES)}, not {machine!r}")
    audit_arch, table, foreign_base = ARCHES[machine]
    eperm = RET_ERRNO | errno.EPERM
    prog = [_ins(_LD_W_ABS, _OFF_ARCH),
            _ins(_JEQ_K, audit_arch, jt=1, jf=0),
            _ins(_RET_K, RET_KILL_PROCESS),
            _ins(_LD_W_ABS, _OFF_NR)]
    if foreign_base:
        prog += [_ins(_JGE_K, foreign_base, jt=0, jf=1), _ins(_RET_K, RET_KILL_PROCESS)]
    for name in _DENIED:
        if name in table and not (setup and name in _SETUP_ALLOWED):   # "if nr == N: return EPERM"
            prog += [_ins(_JEQ_K, table[name], jt=0, jf=1), _ins(_RET_K, eperm)]
    prog += [_ins(_JEQ_K, table["clone3"], jt=0, jf=1), _ins(_RET_K, RET_ERRNO | errno.ENOSYS)]
    # clone: a thread (CLONE_THREAD) without namespace flags is allowed, anything else refused
    prog += [_ins(_JEQ_K, table["clone"], jt=0, jf=5),
             _ins(_LD_W_ABS, _OFF_ARG0),
             _ins(_JSET_K, CLONE_NAMESPACES, jt=2, jf=0),
             _ins(_JSET_K, CLONE_THREAD, jt=0, jf=1),
             _ins(_RET_K, RET_ALLOW),
             _ins(_RET_K, eperm)]
    # socket: AF_UNIX only
    prog += [_ins(_JEQ_K, table["socket"], jt=0, jf=3),
             _ins(_LD_W_ABS, _OFF_ARG0),
             _ins(_JEQ_K, AF_UNIX, jt=1, jf=0),
             _ins(_RET_K, eperm)]
    prog.append(_ins(_RET_K, RET_ALLOW))
    return prog


@lru_cache(maxsize=None)
def filter_bytes(machine: str = "", setup: bool = False) -> bytes:
    """The compiled filter for `machine` (default: this one, `platform.machine()`); `setup`: the
    program bubblewrap loads, which still allows the runner's own mount calls."""
    prog = _program(machine or platform.machine(), setup)
    if len(prog) > 4096:  # BPF_MAXINSNS
        raise AssertionError(f"seccomp filter too long: {len(prog)} instructions")
    return b"".join(prog)


def supported() -> bool:
    return platform.machine() in ARCHES
