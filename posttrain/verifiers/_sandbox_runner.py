"""Runs inside the sandbox subprocess (started by `posttrain.verifiers.code`); stdlib only.

Reads {"code", "tests", "nonce", "workdir"} as JSON on stdin, installs an audit hook that refuses
process creation, sockets, native-code loading and writes outside the work dir, executes the
candidate code and then each test in the same namespace, and prints one result line prefixed
by the nonce. Violations are recorded even when the candidate catches the exception.
"""

import io
import json
import os
import sys

FORBIDDEN_MODULES = {"socket", "_socket", "ssl", "subprocess", "multiprocessing", "ctypes", "_ctypes",
                     "pty", "resource", "_posixsubprocess", "asyncio", "concurrent", "urllib", "http",
                     "ftplib", "smtplib", "telnetlib", "xmlrpc", "webbrowser", "cffi", "mmap"}
_BLOCKED_EVENTS = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "socket.",
                   "os.kill", "os.killpg", "os.setrlimit", "resource.setrlimit",
                   "os.chroot", "os.symlink", "os.link")
_PATH_EVENTS = {"os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.truncate", "os.chmod",
                "os.chown", "os.mkdir", "os.utime"}
_MAX_CAPTURE = 8192

violations = []


def _inside(path, workdir):
    try:
        real = os.path.realpath(os.fsdecode(path)) if not isinstance(path, int) else workdir
    except (TypeError, ValueError):
        return False
    return real == workdir or real.startswith(workdir + os.sep)


_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _writes(args):
    """Whether an 'open' audit event (path, mode, flags) opens for writing."""
    mode = args[1] if len(args) > 1 else None
    flags = args[2] if len(args) > 2 else 0
    return bool((isinstance(mode, str) and any(c in mode for c in "wax+"))
                or (isinstance(flags, int) and flags & _WRITE_FLAGS))


def _make_hook(workdir):
    def hook(event, args):
        bad = None
        if event == "import" and args and str(args[0]).split(".")[0] in FORBIDDEN_MODULES:
            bad = f"import {args[0]}"
        elif event.startswith(_BLOCKED_EVENTS):
            bad = event
        elif event == "open" and _writes(args) and not _inside(args[0], workdir):
            bad = f"write outside the sandbox dir: {args[0]}"
        elif event in _PATH_EVENTS and args and not _inside(args[0], workdir):
            bad = f"{event} outside the sandbox dir: {args[0]}"
        if bad:
            violations.append(bad)
            raise PermissionError(f"sandbox: {bad} is not allowed")
    return hook


def _short(exc):
    text = f"{type(exc).__name__}: {exc}"
    return text[:500]


def _run(source, ns, label):
    """Execute source in ns; return None on success or the error text."""
    try:
        exec(compile(source, label, "exec"), ns)  # noqa: S102 - this is the sandbox
        return None
    except BaseException as exc:  # noqa: BLE001 - SystemExit/KeyboardInterrupt from candidates too
        return _short(exc)


def main():
    job = json.loads(sys.stdin.read())
    stdin_closed = open(os.devnull)  # candidates that read stdin get EOF, not our payload
    sys.stdin = stdin_closed
    nonce, workdir = job["nonce"], os.path.realpath(job["workdir"])
    real_stdout = sys.stdout
    captured = io.StringIO()
    for name in list(sys.modules):
        if name.split(".")[0] in FORBIDDEN_MODULES:
            del sys.modules[name]
    sys.addaudithook(_make_hook(workdir))
    sys.stdout = captured
    ns = {"__name__": "__main__", "__builtins__": __builtins__}
    load_error = _run(job["code"], ns, "<candidate>")
    results = []
    for i, test in enumerate(job["tests"]):
        err = load_error or _run(test, ns, f"<test {i}>")
        results.append({"ok": err is None, "error": err})
    sys.stdout = real_stdout
    out = {"load_error": load_error, "results": results, "violations": violations[:20],
           "stdout": captured.getvalue()[:_MAX_CAPTURE]}
    real_stdout.write("\n" + nonce + json.dumps(out) + "\n")
    real_stdout.flush()
    os._exit(0)  # skip interpreter teardown: candidate atexit handlers and __del__ do not run


if __name__ == "__main__":
    main()
