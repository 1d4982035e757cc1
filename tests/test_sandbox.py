"""The code sandbox against hostile programs: a table of attacks, each contained.

Every attack runs twice where it matters: with the candidate's audit-hook policy layer and
without it (`_audit_hook=False`), so the kernel-level isolation (namespaces, seccomp,
rlimits, tmpfs quota, output cap) is shown to contain it on its own. For each run: the
tests do not pass, the caller's memory stays bounded, nothing outside the sandbox changed,
and a bystander process is still alive.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time

import pytest

from data_prep.verifiers import code as sandbox_code
from data_prep.verifiers import sandbox as sandbox_box
from data_prep.verifiers import run_code_tests
from data_prep.verifiers.code import SandboxUnavailableError, sandbox_problem

_PROBLEM = sandbox_problem("bwrap")
needs_bwrap = pytest.mark.skipif(_PROBLEM is not None, reason=f"isolated sandbox unavailable: {_PROBLEM}")

SECRET = "sandbox-test-secret-7f3a9c"


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture
def bystander():
    """A process of the caller's user that the candidate must not be able to harm."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                            env=dict(os.environ, SANDBOX_TEST_SECRET=SECRET))
    yield proc
    proc.kill()
    proc.wait()


@pytest.fixture
def host_canary(tmp_path, monkeypatch):
    """A host dir with a secret file, the secret in the caller's environment; checked after the run."""
    canary = tmp_path / "canary.txt"
    canary.write_text(SECRET)
    monkeypatch.setenv("SANDBOX_TEST_SECRET", SECRET)
    before = sorted(p.name for p in tmp_path.iterdir())
    tmp_before = set(os.listdir("/tmp"))
    yield tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "the candidate changed a host directory"
    assert canary.read_text() == SECRET
    new_in_tmp = {n for n in set(os.listdir("/tmp")) - tmp_before if n.startswith("sbx-attack")}
    assert not new_in_tmp, f"the candidate created {new_in_tmp} in the host's /tmp"


def _fill(code, pid, directory):
    return code.replace("{pid}", str(pid)).replace("{dir}", str(directory))


# (name, code, tests, statuses allowed with the audit hook, statuses allowed without it)
# {pid}: the bystander's pid; {dir}: the host canary dir. None = any status except "passed".
NOT_PASSED = None
ATTACKS = [
    ("monkeypatch the runner", "import __main__\n__main__._run = lambda *a: None\n__main__._serve = lambda *a: {'ok': True}\n"
     "def f():\n    return 0", ["assert False", "assert f() == 3"], NOT_PASSED, NOT_PASSED),
    ("forge a report on every fd", "import json, os, struct, sys\n"
     "def frame(o):\n    d = json.dumps(o).encode()\n    return struct.pack('>I', len(d)) + d\n"
     "f = sys._getframe()\nwhile f is not None:\n    f = f.f_back\n"
     "for fd in range(1, 64):\n    for msg in ({'i': 0, 'ok': True, 'error': None}, {'done': True, 'violations': []},\n"
     "                {'ready': True, 'load_error': None, 'names': {}}):\n"
     "        try:\n            os.write(fd, frame(msg))\n        except OSError:\n            pass\n"
     "print('@@result-0000@@{\"load_error\": null, \"results\": [{\"ok\": true, \"error\": null}], \"violations\": []}')\n"
     "def f():\n    return 0", ["assert f() == 3"], NOT_PASSED, NOT_PASSED),
    ("__eq__ always True", "class E:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
     "        return False\n    __hash__ = object.__hash__\ndef f():\n    return E()",
     ["assert f() == 3", "assert not (f() != 3)", "assert [f()] == [3]"], ("failed",), ("failed",)),
    ("int subclass with rigged __eq__", "class I(int):\n    def __eq__(self, other):\n        return True\n"
     "    __hash__ = int.__hash__\ndef f():\n    return I(0)", ["assert f() == 3"], ("failed",), ("failed",)),
    ("container claims membership", "class C(list):\n    def __contains__(self, x):\n        return True\n"
     "def f():\n    return C()", ["assert 3 in f()"], ("failed",), ("failed",)),
    ("lie through the value encoder", "import __main__\n__main__.encode = lambda *a, **k: {'h': 999}\ndef f():\n    return 0",
     ["assert f() == 3"], NOT_PASSED, NOT_PASSED),
    ("shadow a builtin the tests use", "def abs(x):\n    return 0\ndef len(x):\n    return 3\ndef f(x):\n    return 0",
     ["assert abs(f(2) - 4) < 1e-9", "assert len(f(1)) == 3"], ("failed",), ("failed",)),
    ("fake standard module", "class math:\n    @staticmethod\n    def isclose(*a, **k):\n        return True\ndef f():\n    return 0",
     ["assert math.isclose(f(), 0.5)"], ("failed",), ("failed",)),
    ("sqlite3 outside the work dir", "import sqlite3\nsqlite3.connect('/tmp/sbx-attack.db').execute('create table t(x)')\n"
     "sqlite3.connect('{dir}/sbx-attack.db').execute('create table t(x)')", ["assert True"], ("forbidden",), NOT_PASSED),
    ("mkfifo outside the work dir", "import os\nos.mkfifo('/tmp/sbx-attack-fifo')\nos.mkfifo('{dir}/sbx-attack-fifo')",
     ["assert True"], NOT_PASSED, NOT_PASSED),
    ("create through dir_fd", "import os\nfd = os.open('/', os.O_RDONLY)\nos.open('sbx-attack', os.O_CREAT | os.O_WRONLY, dir_fd=fd)\n"
     "fd = os.open('/tmp', os.O_RDONLY)\nos.open('sbx-attack', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
     ["assert True"], NOT_PASSED, NOT_PASSED),
    ("write into the caller's files", "open('{dir}/canary.txt', 'w').write('pwned')\nopen('{dir}/sbx-attack', 'w')",
     ["assert True"], ("forbidden",), NOT_PASSED),
    ("pidfd kill of another process", "import os, signal\nsignal.pidfd_send_signal(os.pidfd_open({pid}), signal.SIGKILL)",
     ["assert True"], NOT_PASSED, NOT_PASSED),
    ("kill another process", "import os\nos.kill({pid}, 9)", ["assert True"], ("forbidden",), NOT_PASSED),
    ("kill the parent", "import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)", ["assert True"], ("forbidden",), NOT_PASSED),
    ("kill everything", "import os\nos.kill(-1, 9)", ["assert True"], ("forbidden",), NOT_PASSED),
    ("ptrace the parent through /proc", "import os\nppid = os.getppid()\nwith open(f'/proc/{ppid}/mem', 'r+b') as m:\n"
     "    m.write(b'x')", ["assert True"], NOT_PASSED, NOT_PASSED),
    ("fork bomb", "import os\nwhile True:\n    os.fork()", ["assert True"], ("forbidden",), ("error",)),
    ("thread bomb", "import threading, time\nts = []\nwhile True:\n"
     "    t = threading.Thread(target=time.sleep, args=(30,))\n    t.start()\n    ts.append(t)",
     ["assert True"], ("error", "memory"), ("error", "memory")),
    ("10 GB allocation", "x = bytearray(10 * 1024 ** 3)", ["assert True"], ("memory",), ("memory",)),
    ("infinite stdout", "while True:\n    print('y' * 1000)", ["assert True"], ("output_limit",), ("output_limit",)),
    ("stderr flood", "import sys\nwhile True:\n    sys.__stderr__.write('x' * 65536)", ["assert True"],
     ("output_limit",), ("output_limit",)),
    ("raw fd flood", "import os\nwhile True:\n    os.write(2, b'x' * 65536)", ["assert True"],
     ("output_limit",), ("output_limit",)),
    ("socket to the internet", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)", ["assert True"],
     ("forbidden",), NOT_PASSED),
    ("socket to localhost", "import socket\ns = socket.socket()\ns.connect(('127.0.0.1', 22))", ["assert True"],
     ("forbidden",), NOT_PASSED),
    ("fill the disk", "f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * (1 << 20))", ["assert True"],
     ("error",), ("error",)),
    ("fill the disk with many files", "i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1",
     ["assert True"], ("error",), ("error",)),
    ("write /dev/shm and /", "open('/dev/shm/sbx-attack', 'w')\nopen('/sbx-attack', 'w')", ["assert True"],
     ("forbidden",), ("error",)),
    ("infinite loop", "while True:\n    pass", ["assert True"], ("timeout",), ("timeout",)),
    ("sleep", "import time\ntime.sleep(60)", ["assert True"], ("timeout",), ("timeout",)),
    ("hang in a call", "def f():\n    while True:\n        pass", ["assert f() == 1"], ("timeout",), ("timeout",)),
    ("exit mid-call", "import os\ndef f():\n    os._exit(0)", ["assert f() == 1", "assert True"], ("failed",), ("failed",)),
]


@needs_bwrap
@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit-hook", "kernel-only"])
@pytest.mark.parametrize("name,code,tests,with_hook,without_hook", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_contained(name, code, tests, with_hook, without_hook, audit_hook, bystander, host_canary):
    code = _fill(code, bystander.pid, host_canary)
    disk_before = shutil.disk_usage("/tmp").used
    rss_before = _rss_mb()
    start = time.monotonic()
    r = run_code_tests(code, tests, timeout_s=2.0, memory_mb=256, _audit_hook=audit_hook)
    elapsed = time.monotonic() - start
    allowed = with_hook if audit_hook else without_hook
    assert r.status != "passed" and r.passed < r.total, (name, r)
    if allowed is not None:
        assert r.status in allowed, (name, r)
    assert elapsed < 2.0 + 5, f"{name}: took {elapsed:.1f}s; the wall-clock kill did not work"
    assert _rss_mb() - rss_before < 50, f"{name}: the caller's memory grew by {_rss_mb() - rss_before:.0f} MB"
    # other processes share this file system, so only a large growth is attributed to the candidate
    # (an unbounded writer reaches GBs in the 2 s; test_disk_quota checks the quota exactly)
    grew = shutil.disk_usage("/tmp").used - disk_before
    assert grew < 512 << 20, f"{name}: the host disk usage grew by {grew >> 20} MB"
    assert bystander.poll() is None, f"{name}: the bystander process was killed"
    assert len(r.stdout) <= 8192 and len(r.stderr) <= 8192 + 200


@needs_bwrap
def test_candidate_sees_no_host_environment_or_files(host_canary, bystander):
    probe = ("import os, glob\n"
             "print(dict(os.environ))\n"
             "for p in glob.glob('/proc/*/environ') + ['/proc/self/environ', '/proc/{pid}/environ']:\n"
             "    try:\n        print(p, open(p, 'rb').read())\n    except OSError as e:\n        print(p, e)\n"
             "for p in ['{dir}/canary.txt', '/etc/passwd', '/etc/shadow', os.path.expanduser('~/.bash_history'),\n"
             "          '/proc/1/cmdline']:\n"
             "    try:\n        print(p, open(p).read()[:2000])\n    except OSError as e:\n        print(p, e)\n"
             "print(os.listdir('/'), os.listdir('/proc'))\n").replace("{dir}", str(host_canary)).replace("{pid}", str(bystander.pid))
    r = run_code_tests(probe, ["assert True"], timeout_s=5, _audit_hook=False)
    assert r.all_passed, r
    assert SECRET not in r.stdout and SECRET not in r.stderr
    assert "SANDBOX_TEST_SECRET" not in r.stdout
    assert "canary.txt No such file" in r.stdout or "canary.txt [Errno" in r.stdout
    # the sandbox's /proc holds only its own fd table: no process (not even its own) is listed
    assert r.stdout.rstrip().endswith("['self']"), r.stdout[-500:]


@needs_bwrap
def test_the_candidate_never_sees_the_expected_values():
    """The tests and their expected values stay in the harness: a candidate that searches its own
    process (payload, frames, memory maps, files) for the expected value does not find it."""
    code = ("import gc\n"
            "needle = ''.join(['9876', '54321'])  # built at run time: not a constant of this code\n"
            "def scan():\n"
            "    hits, g = [], globals()\n"
            "    for o in gc.get_objects():\n"
            "        if o is g or o is hits:\n"
            "            continue\n"
            "        try:\n"
            "            if needle in repr(o):\n"
            "                hits.append(type(o).__name__)\n"
            "        except Exception:\n"
            "            pass\n"
            "    return hits\n"
            "found = scan()\n"
            "def f(*args):\n    return found")
    r = run_code_tests(code, ["assert f(123456789) == 987654321"], timeout_s=5, _audit_hook=False)
    assert r.status == "failed", r
    r = run_code_tests(code, ["r = f()\nassert r == [], r"], timeout_s=5, _audit_hook=False)
    assert r.all_passed, r


CORRECT = [
    ("plain function", "def add(a, b):\n    return a + b", ["assert add(1, 2) == 3", "assert add('a', 'b') == 'ab'"]),
    ("containers and floats", "def stats(xs):\n    return {'n': len(xs), 'mean': sum(xs) / len(xs), 'set': set(xs),"
     " 't': tuple(xs), 'fs': frozenset(xs), 'b': bytes(xs), 'c': complex(1, 2), 'none': None}",
     ["s = stats([1, 2, 3])\nassert s == {'n': 3, 'mean': 2.0, 'set': {1, 2, 3}, 't': (1, 2, 3), 'fs': frozenset({1, 2, 3}),"
      " 'b': b'\\x01\\x02\\x03', 'c': 1 + 2j, 'none': None}"]),
    ("big ints, nan and inf", "def f():\n    return [10 ** 5000, float('inf'), -0.0]",
     ["r = f()\nassert r[0] == 10 ** 5000 and r[1] == float('inf') and str(r[2]) == '-0.0'"]),
    ("exceptions", "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x",
     ["try:\n    f(-1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\nelse:\n    assert False", "assert f(2) == 2"]),
    ("classes and methods", "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
     "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n    def __len__(self):\n"
     "        return len(self.items)", ["s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1",
                                        "assert s.items == [1]"]),
    ("generators", "def gen(n):\n    for i in range(n):\n        yield i * i", ["assert list(gen(200)) == [i * i for i in range(200)]",
                                                                          "assert sum(gen(4)) == 14"]),
    ("in-place mutation of an argument", "def sort_in_place(xs):\n    xs.sort()", ["xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]"]),
    ("keyword arguments and globals", "import math\nLIMIT = 10\ndef clamp(x, *, hi=LIMIT):\n    return min(x, hi)",
     ["assert clamp(20) == LIMIT == 10 and clamp(20, hi=3) == 3 and math.floor(2.5) == 2"]),
    ("work dir and stdlib", "import tempfile, json, os\ndef roundtrip(obj):\n    with tempfile.NamedTemporaryFile('w+', delete=False) as f:\n"
     "        json.dump(obj, f)\n    return json.load(open(f.name))", ["assert roundtrip({'a': [1, 2]}) == {'a': [1, 2]}"]),
    ("threads are allowed", "import threading\ndef f():\n    out = []\n    t = threading.Thread(target=out.append, args=(7,))\n"
     "    t.start()\n    t.join()\n    return out", ["assert f() == [7]"]),
]

WRONG = [
    ("off by one", "def add(a, b):\n    return a + b + 1", ["assert add(1, 2) == 3"]),
    ("wrong type", "def f():\n    return '3'", ["assert f() == 3"]),
    ("tuple for list", "def f():\n    return (1, 2)", ["assert f() == [1, 2]"]),
    ("no exception", "def f(x):\n    return x", ["try:\n    f(-1)\nexcept ValueError:\n    pass\nelse:\n    assert False"]),
    ("missing function", "def g():\n    return 1", ["assert f() == 1"]),
    ("one of two", "def f(x):\n    return 2 * x", ["assert f(2) == 4", "assert f(3) == 5"]),
]


def _modes():
    return [pytest.param("bwrap", marks=needs_bwrap), "unsafe_local"]


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("name,code,tests", CORRECT, ids=[c[0] for c in CORRECT])
def test_correct_programs_pass(name, code, tests, mode):
    r = run_code_tests(code, tests, timeout_s=10, sandbox=mode)
    assert r.all_passed and r.passed == r.total == len(tests), (name, r)


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("name,code,tests", WRONG, ids=[w[0] for w in WRONG])
def test_wrong_programs_fail(name, code, tests, mode):
    r = run_code_tests(code, tests, timeout_s=10, sandbox=mode)
    assert r.status == "failed" and r.passed < r.total, (name, r)


@pytest.mark.parametrize("mode", _modes())
def test_in_process_attacks_fail_in_both_modes(mode):
    """These attacks stay inside the candidate's own process (monkeypatching, rigged __eq__,
    shadowed built-ins), which the harness does not trust in either mode. This is no claim
    that unsafe_local resists hostile code: there the candidate has the caller's uid, files and
    /proc (see the module doc of data_prep.verifiers.code)."""
    for name, code, tests, _, _ in ATTACKS[:8]:
        r = run_code_tests(_fill(code, 0, "/nonexistent"), tests, timeout_s=5, sandbox=mode)
        assert r.status != "passed" and r.passed < r.total, (name, r)


# ------------------------------------------------------------------------------ oracles and verdicts

SHIFT_SETUP = ("import string\n"
               "def encode(s):\n"
               "    return ''.join(chr((ord(c) - 97 + 3) % 26 + 97) for c in s)\n")
SHIFT_TESTS = ["for w in ['abc', 'xyz', 'hello']:\n    assert decode(encode(w)) == w, w"]
ORACLE_CASES = [
    # (name, candidate code, passes?)
    ("solves it", "def decode(s):\n    return ''.join(chr((ord(c) - 97 - 3) % 26 + 97) for c in s)", True),
    ("solves it with the helper", "def decode(s):\n    for _ in range(25):\n        s = encode(s)\n    return s", True),
    ("redefines the helper", "def encode(s):\n    return s\ndef decode(s):\n    return s", False),
    ("rebinds it through globals()", "globals()['encode'] = str\ndef decode(s):\n    return s", False),
    ("replaces it with a plain value", "encode = 'abc'.strip\ndef decode(s):\n    return s", False),
    ("shadows its module", "class string:\n    ascii_lowercase = ''\nencode = lambda s: s\ndef decode(s):\n    return s",
     False),
]


@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("name,code,passes", ORACLE_CASES, ids=[c[0] for c in ORACLE_CASES])
def test_trusted_setup_is_the_tests_oracle(name, code, passes, mode):
    """The problem's helpers (trusted_setup) are what the tests call, whatever the candidate
    defines under their names; the candidate may still call them."""
    r = run_code_tests(code, SHIFT_TESTS, timeout_s=10, sandbox=mode, trusted_setup=SHIFT_SETUP)
    assert r.all_passed == passes, (name, r)
    if not passes:
        assert r.status == "failed", (name, r)


# The candidate finds its sibling harness in /proc (same parent, same uid), then writes verdict
# frames that claim every test passed into the verdict pipe: through the harness's write end
# (/proc/<harness>/fd/N, opened by dir_fd so the path looks relative) or the caller's read end
# (/proc/<ppid>/fd/M, the fd whose pipe is the same). Only siblings are touched: other runs on
# this machine are left alone.
FORGE = r'''
import os, json, struct
TARGET = {target!r}
def frame(o, tag=b''):
    d = tag + json.dumps(o).encode()
    return struct.pack('>I', len(d)) + d
def harness():
    for pid in os.listdir('/proc'):
        try:
            argv = open(f'/proc/{{pid}}/cmdline', 'rb').read().split(b'\0')
            ppid = int(open(f'/proc/{{pid}}/stat').read().rsplit(')', 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if b'harness' in argv and ppid == os.getppid() and int(pid) != os.getpid():
            return pid, argv[argv.index(b'harness') + 4].decode()
    raise SystemExit('no harness found')
pid, verdict_fd = harness()
if TARGET == 'caller':
    pipe = os.readlink(f'/proc/{{pid}}/fd/{{verdict_fd}}')
    pid = str(os.getppid())
    verdict_fd = next(fd for fd in os.listdir(f'/proc/{{pid}}/fd') if os.readlink(f'/proc/{{pid}}/fd/{{fd}}') == pipe)
d = os.open(f'/proc/{{pid}}/fd', os.O_RDONLY)
w = os.open(verdict_fd, os.O_WRONLY, dir_fd=d)
for tag in (b'', bytes(32)):
    for i in (0, 0, 1):
        os.write(w, frame({{'i': i, 'ok': True, 'error': None}}, tag))
    os.write(w, frame({{'done': True, 'load_error': None, 'violations': []}}, tag))
def f():
    return 0
'''


@pytest.mark.parametrize("target", ["harness", "caller"])
def test_forged_verdict_frames_are_not_counted_in_unsafe_local(target):
    r = run_code_tests(FORGE.format(target=target), ["assert f() == 3", "assert f() == 4"], timeout_s=10,
                       sandbox="unsafe_local", _audit_hook=False)
    assert "no harness found" not in r.stderr, r
    assert r.status == "forbidden" and r.passed == 0, r
    assert any("verdict pipe" in v and "forged" in v for v in r.violations), r


def _signed_frames(key, msgs):
    """Verdict frames as the harness writes them (its own code, through a pipe)."""
    from data_prep.verifiers import _sandbox_runner as runner

    r, w = os.pipe()
    try:
        for m in msgs:
            runner.send_signed(w, key, m)
        os.close(w)
        w = None
        data = b""
        while True:
            chunk = os.read(r, 1 << 16)
            if not chunk:
                return data
            data += chunk
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_each_test_verdict_counts_once_and_only_with_the_key():
    key = os.urandom(32)
    ok0, fail1 = {"i": 0, "ok": True, "error": None}, {"i": 1, "ok": False, "error": "AssertionError"}
    done = {"done": True, "load_error": None, "violations": []}
    data = _signed_frames(key, [ok0, ok0, fail1, ok0, {"i": 1, "ok": True, "error": None}, done])
    reader = sandbox_code._Verdicts(key, total=2)
    for i in range(0, len(data), 7):  # arrives in pieces
        reader.feed(data[i:i + 7])
    assert reader.by_index == {0: ok0, 1: fail1} and reader.summary == done and not reader.broken
    assert reader.repeated == 3 and len(reader.rejected) == 1 and "repeated" in reader.rejected[0]
    # the same frames under another key, an index out of range, a garbled length: nothing counts
    for bad in (_signed_frames(os.urandom(32), [ok0, done]), _signed_frames(key, [{"i": 2, "ok": True}]),
                b"\xff\xff\xff\xff" + data):
        reader = sandbox_code._Verdicts(key, total=2)
        reader.feed(bad)
        assert reader.broken and not reader.by_index and reader.summary is None, bad[:40]


@needs_bwrap
@pytest.mark.parametrize("many_files", [False, True], ids=["one file", "many files"])
def test_disk_quota(many_files):
    """The candidate's work dir holds disk_mb, and one file RLIMIT_FSIZE (16 MiB), however it writes."""
    code = ("import errno\n"
            "def fill(many):\n"
            "    total, i, chunk = 0, 0, b'x' * (1 << 20)\n"
            "    f = open('big', 'wb', buffering=0)\n"
            "    try:\n"
            "        while total < (1 << 30):\n"
            "            if many:\n"
            "                f = open(f'f{i}', 'wb', buffering=0)\n"
            "                i += 1\n"
            "            total += f.write(chunk)\n"
            "    except OSError as e:\n"
            "        return total, errno.errorcode[e.errno]\n"
            "    return total, None")
    r = run_code_tests(code, [f"total, err = fill({many_files})\nassert total <= 24 << 20 and err in ('ENOSPC', 'EFBIG'), (total, err)"],
                       timeout_s=10, disk_mb=24, _audit_hook=False)
    assert r.all_passed, r


@needs_bwrap
def test_output_is_kept_bounded_and_partial_results_survive_a_timeout():
    r = run_code_tests("print('x' * 100000)\ndef f():\n    return 1\ndef hang():\n    while True:\n        pass",
                       ["assert f() == 1", "hang()"], timeout_s=2)
    assert r.status == "timeout" and r.passed == 1 and len(r.stdout) == 8192, r


def test_refuses_without_isolation_unless_opted_in(monkeypatch):
    sandbox_box._bwrap_problem.cache_clear()
    monkeypatch.setattr(sandbox_box.shutil, "which", lambda name: None)
    monkeypatch.delenv("CODE_SANDBOX", raising=False)
    try:
        with pytest.raises(SandboxUnavailableError) as err:
            run_code_tests("def f(): return 1", ["assert f() == 1"])
        text = str(err.value)
        assert "bubblewrap" in text and "apt-get install bubblewrap" in text and "CODE_SANDBOX=unsafe_local" in text
        monkeypatch.setenv("CODE_SANDBOX", "unsafe_local")
        assert run_code_tests("def f(): return 1", ["assert f() == 1"]).all_passed
        monkeypatch.setenv("CODE_SANDBOX", "docker")
        with pytest.raises(ValueError, match="CODE_SANDBOX"):
            run_code_tests("def f(): return 1", ["assert f() == 1"])
    finally:
        sandbox_box._bwrap_problem.cache_clear()


def test_seccomp_filter_shape():
    from data_prep.verifiers import sandbox_seccomp as sc
    for machine in sc.ARCHES:
        prog = sc.filter_bytes(machine)
        assert len(prog) % 8 == 0 and 20 < len(prog) // 8 < 4096
    with pytest.raises(sc.UnsupportedArchitecture):
        sc.filter_bytes("sparc64")


def test_seccomp_numbers_match_the_kernel_headers():
    """The hand-written syscall tables agree with the installed kernel headers (when present)."""
    from data_prep.verifiers import sandbox_seccomp as sc
    import re
    headers = {"x86_64": "/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "aarch64": "/usr/include/asm-generic/unistd.h"}
    checked = 0
    for machine, path in headers.items():
        if not os.path.exists(path):
            continue
        text = open(path).read()
        for name, nr in sc.ARCHES[machine][1].items():
            m = re.search(rf"#define __NR(?:3264)?_{name}\s+(\d+)\b", text)
            assert m and int(m.group(1)) == nr, (machine, name, nr, m and m.group(1))
            checked += 1
    if not checked:
        pytest.skip("no kernel headers installed (linux-libc-dev)")


@needs_bwrap
def test_latency_per_call():
    run_code_tests("def f(): return 1", ["assert f() == 1"])
    times = []
    for _ in range(5):
        start = time.monotonic()
        assert run_code_tests("def add(a, b):\n    return a + b", ["assert add(1, 2) == 3"] * 5).all_passed
        times.append(time.monotonic() - start)
    times.sort()
    print(f"sandboxed run_code_tests: median {times[2] * 1000:.0f} ms per call")
    assert times[2] < 3.0, times


# ------------------------------------------------------------------------------ host memory, reaping, /proc
# Memory that RLIMIT_AS does not count (memfd, System V and POSIX shared memory, tmpfs inodes)
# must be refused or bounded by the kernel, whatever the candidate's process does to itself.
# Each attack keeps a marker of what it achieved (`got`) and its test passes only if the attack
# worked; meanwhile the host's Shmem and Slab (/proc/meminfo) are sampled for their peak.

# loads an extension module of the standard library under another name (the audit hook looks
# for "ctypes" / "_ctypes" / "mmap" by name) and builds a raw syscall(nr, a, b, c, d, e) in an
# executable page: no libc symbol is looked up, no audited ctypes event is raised
RAW_SYSCALL = r'''
import importlib.util, os, sys
def ext(name):
    d = next(p for p in sys.path if p.endswith('lib-dynload'))
    so = os.path.join(d, next(n for n in os.listdir(d) if n.startswith(name + '.')))
    spec = importlib.util.spec_from_file_location('innocent.' + name, so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
C, M = ext('_ctypes'), ext('mmap')
class c_long(C._SimpleCData):
    _type_ = 'l'
class c_void_p(C._SimpleCData):
    _type_ = 'P'
class py_object(C._SimpleCData):
    _type_ = 'O'
def fn(addr, restype, *argtypes, flags=C.FUNCFLAG_CDECL):
    class F(C.CFuncPtr):
        _flags_, _restype_, _argtypes_ = flags, restype, argtypes
    return F(addr)
string_at = fn(C._string_at_addr, py_object, c_void_p, c_long, flags=C.FUNCFLAG_CDECL | C.FUNCFLAG_PYTHONAPI)
memset = fn(C._memset_addr, c_void_p, c_void_p, c_long, c_long)
page = M.mmap(-1, 4096, prot=M.PROT_READ | M.PROT_WRITE | M.PROT_EXEC)
page.write(bytes.fromhex('4889f8' '4889f7' '4889d6' '4889ca' '4d89c2' '4d89c8' '0f05' 'c3'))  # x86_64
syscall = fn(int.from_bytes(string_at(id(page) + 16, 8), 'little'), c_long, *[c_long] * 6)
'''

SYSV_SHM = RAW_SYSCALL + r'''
got, err = 0, None
for _ in range(20):
    sid = syscall(29, 0, 64 << 20, 0o1600, 0, 0)   # shmget(IPC_PRIVATE, 64 MiB, IPC_CREAT | 0600)
    if sid < 0:
        err = -sid
        break
    at = syscall(30, sid, 0, 0, 0, 0)               # shmat
    if at < 0:
        err = -at
        break
    memset(at, 1, 64 << 20)
    syscall(67, at, 0, 0, 0, 0)                     # shmdt: the segment stays
    got += 64 << 20
'''

MEMFD = r'''
import os
got, err, fds, chunk = 0, None, [], b'x' * (1 << 20)
try:
    while got < (1 << 30):
        fds.append(os.memfd_create('x'))   # each below RLIMIT_FSIZE, all outside RLIMIT_AS
        for _ in range(8):
            got += os.write(fds[-1], chunk)
except OSError as e:
    err = e.errno
'''

POSIX_SHM = r'''
import os, _posixshmem
got, err, chunk = 0, None, b'x' * (1 << 20)
try:
    for i in range(128):
        try:
            fd = _posixshmem.shm_open(f'/sbx-attack-{i}', os.O_CREAT | os.O_RDWR, 0o600)
        except OSError:
            fd = os.open(f'/dev/shm/sbx-attack-{i}', os.O_CREAT | os.O_RDWR, 0o600)
        for _ in range(8):
            got += os.write(fd, chunk)
except OSError as e:
    err = e.errno
'''

MANY_INODES = r'''
import os
got, err = 0, None
try:
    open('a', 'w').close()
    while got < 300000:   # empty files, hard links and directories: no bytes, kernel memory only
        kind = got % 3
        if kind == 0:
            open(f'f{got}', 'w').close()
        elif kind == 1:
            os.link('a', f'l{got}')
        else:
            os.mkdir(f'd{got}')
        got += 1
except OSError as e:
    err = e.errno
'''

_ANY_STOP = ("failed", "error", "memory", "forbidden", "timeout")
# (name, code, test that passes only if the attack worked, meminfo field to watch)
HOST_ATTACKS = [
    ("memfd growth", MEMFD, "assert got >= 1 << 30, (got, err)", "Shmem"),
    ("SysV shm through a raw syscall", SYSV_SHM, "assert got >= 1 << 30, (got, err)", "Shmem"),
    ("POSIX shm_open on /dev/shm", POSIX_SHM, "assert got >= 1 << 30, (got, err)", "Shmem"),
    ("tmpfs inode exhaustion", MANY_INODES, "assert got >= 300000, (got, err)", "Slab"),
]


class _HostMemory:
    """Peak growth (bytes) of a /proc/meminfo field on the host while the block runs."""

    def __init__(self, field):
        self.field, self.peak, self._stop = field, 0, None

    def _read(self):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(self.field + ":"):
                    return int(line.split()[1]) << 10
        raise AssertionError(f"no {self.field} in /proc/meminfo")

    def __enter__(self):
        import threading
        base = self._read()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.005):
                self.peak = max(self.peak, self._read() - base)
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


@needs_bwrap
@pytest.mark.parametrize("audit_hook", [True, False], ids=["audit-hook", "kernel-only"])
@pytest.mark.parametrize("name,code,test,field", HOST_ATTACKS, ids=[a[0] for a in HOST_ATTACKS])
def test_memory_outside_the_address_space_is_bounded(name, code, test, field, audit_hook):
    if "raw syscall" in name and platform.machine() != "x86_64":
        pytest.skip("the raw-syscall payload is x86_64 machine code")
    with _HostMemory(field) as host:
        r = run_code_tests(code, [test], timeout_s=3.0, memory_mb=256, disk_mb=8, _audit_hook=audit_hook)
    assert r.status in _ANY_STOP and r.passed == 0, (name, r)
    assert host.peak < 96 << 20, f"{name}: the host's {field} grew by {host.peak >> 20} MiB during the run"
    if r.status == "failed":   # the marker: how far the attack got before the kernel stopped it
        assert "AssertionError" in r.test_errors[0], r


@needs_bwrap
def test_work_dir_inodes_are_bounded():
    r = run_code_tests(MANY_INODES + "\ndef result():\n    return got, err",
                       ["got, err = result()\nassert got < 5000 and err == 28, (got, err)"],   # ENOSPC
                       timeout_s=5, disk_mb=8, _audit_hook=False)
    assert r.all_passed, r


@needs_bwrap
def test_dev_shm_and_ipc_are_unusable():
    """Nothing under /dev is writable, and the IPC syscalls are refused before any namespace check."""
    code = RAW_SYSCALL if platform.machine() == "x86_64" else "syscall = None\n"
    code += ("import os, errno\n"
             "def probe():\n"
             "    out = {}\n"
             "    for p in ('/dev/shm/x', '/dev/mqueue/x', '/dev/x'):\n"
             "        try:\n"
             "            os.close(os.open(p, os.O_CREAT | os.O_WRONLY, 0o600))\n"
             "            out[p] = 'created'\n"
             "        except OSError as e:\n"
             "            out[p] = errno.errorcode[e.errno]\n"
             "    if syscall is not None:   # shmget, msgget, semget, mq_open, memfd_create: -EPERM\n"
             "        out['ipc'] = [syscall(nr, 0, 4096, 0o1600, 0, 0) for nr in (29, 68, 64, 240, 319)]\n"
             "    return out")
    r = run_code_tests(code, ["out = probe()\n"
                              "assert 'created' not in out.values(), out\n"
                              "assert out.get('ipc', [-1] * 5) == [-1] * 5, out"],
                       timeout_s=5, _audit_hook=False)
    assert r.all_passed, r


FD_PROBE = r'''
import os, stat
def fds():
    listed = {int(n): None for n in os.listdir('/proc/self/fd')}
    for fd in list(listed):
        try:
            listed[fd] = os.readlink(f'/proc/self/fd/{fd}')
        except OSError:
            del listed[fd]   # the directory listing's own fd
    scanned = []
    for fd in range(1024):   # independent of /proc
        try:
            os.fstat(fd)
            scanned.append(fd)
        except OSError:
            pass
    return listed, scanned
'''


@needs_bwrap
def test_candidate_holds_only_its_own_fds():
    """No user-namespace, memfd, info-pipe or other inherited fd reaches the candidate: stdin
    (/dev/null), stdout, stderr and its two pipes to the harness, nothing else."""
    r = run_code_tests(FD_PROBE, ["listed, scanned = fds()\n"
                                  "assert sorted(listed) == scanned, (listed, scanned)\n"
                                  "assert listed[0] == '/dev/null', listed\n"
                                  "others = [t for fd, t in listed.items() if fd > 2]\n"
                                  "assert len(others) == 2 and all(t.startswith('pipe:[') for t in others), listed"],
                       timeout_s=5, _audit_hook=False)
    assert r.all_passed, r


_HIDDEN = ["/proc/cmdline", "/proc/sys/kernel/random/boot_id", "/proc/self/mountinfo", "/proc/self/mounts",
           "/proc/mounts", "/proc/1/mountinfo", "/proc/2/mountinfo", "/proc/thread-self/mountinfo",
           "/proc/self/task", "/proc/stat", "/proc/self/status", "/proc/self/maps", "/.proc-setup/self/mountinfo"]


@needs_bwrap
def test_host_identifying_proc_files_are_hidden():
    """The kernel command line, boot id and mount table (host devices, paths, options) cannot be
    read, from the main thread or another one."""
    host_boot_id = open("/proc/sys/kernel/random/boot_id").read().strip()
    host_cmdline = open("/proc/cmdline").read().strip()
    code = ("import os, threading\n"
            f"PATHS = {_HIDDEN!r}\n"
            "def read_all():\n"
            "    out = {}\n"
            "    for p in PATHS:\n"
            "        try:\n"
            "            out[p] = sorted(os.listdir(p)) if os.path.isdir(p) else open(p).read()[:4000]\n"
            "        except OSError as e:\n"
            "            out[p] = None\n"
            "    return out\n"
            "res = {}\n"
            "t = threading.Thread(target=lambda: res.update(read_all()))\n"
            "t.start()\n"
            "t.join()\n"
            "main = read_all()\n"
            "print(main, res)\n"
            "def read(p, thread=False):\n"
            "    return (res if thread else main)[p]")
    tests = [f"assert read({p!r}) is None and read({p!r}, thread=True) is None, read({p!r})" for p in _HIDDEN]
    r = run_code_tests(code, tests, timeout_s=5, _audit_hook=False)
    assert r.all_passed, [(t, e) for t, e in zip(_HIDDEN, r.test_errors) if e]
    assert host_boot_id not in r.stdout and (not host_cmdline or host_cmdline not in r.stdout)


_PID1_SCRIPT = r'''
import json, os
from data_prep.verifiers import run_code_tests
assert os.getpid() == 1
cases = [("def f():\n    return 1", ["assert f() == 1"]),
         ("while True:\n    pass", ["assert True"]),                      # killed at the timeout
         ("import os\ndef f():\n    os._exit(0)", ["assert f() == 1"]),    # the candidate exits mid-call
         ("while True:\n    print('y' * 1000)", ["assert True"]),          # killed at the output cap
         ("import os\nos._exit(3)", ["assert True"])]
statuses = [run_code_tests(code, tests, timeout_s=1.0, max_output_bytes=1 << 16).status for code, tests in cases]
zombies = []
for pid in os.listdir('/proc'):
    try:
        stat = open(f'/proc/{pid}/stat').read()
    except OSError:
        continue
    if stat.rsplit(')', 1)[1].split()[0] == 'Z':
        zombies.append(stat[:80])
print(json.dumps({"statuses": statuses, "zombies": zombies}))
'''


@needs_bwrap
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                    reason="needs root and unshare(1) to run the caller as PID 1 of a new PID namespace")
def test_no_zombies_when_the_caller_is_pid_1():
    """In a container without an init the caller is PID 1 and inherits every orphan: after the
    calls, no process of the namespace is a zombie."""
    import json
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", _PID1_SCRIPT],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["statuses"] == ["passed", "timeout", "failed", "output_limit", "error"], out
    assert out["zombies"] == [], out


@needs_bwrap
def test_setup_privileges_are_gone_before_the_code_runs():
    """The runner mounts as the namespace's root; the candidate then holds no capability, cannot
    mount or unmount (the final seccomp program is loaded) and cannot regain privileges."""
    code = ("import ctypes, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "hdr, caps = (ctypes.c_uint32 * 2)(0x20080522, 0), (ctypes.c_uint32 * 6)()\n"
            "capget = libc.capget(hdr, caps)\n"
            "def errno_of(rc):\n"
            "    return ctypes.get_errno() if rc != 0 else 0\n"
            "mount = errno_of(libc.mount(b'tmpfs', b'/work', b'tmpfs', ctypes.c_ulong(0), None))\n"
            "umount = errno_of(libc.umount2(b'/proc/self/fd', 2))\n"
            "nnp, seccomp = libc.prctl(39, 0, 0, 0, 0), libc.prctl(21, 0, 0, 0, 0)\n"
            "def state():\n"
            "    return capget, list(caps), mount, umount, nnp, seccomp")
    r = run_code_tests(code, ["capget, caps, mount, umount, nnp, seccomp = state()\n"
                              "assert capget == 0 and caps == [0] * 6, caps\n"
                              "assert mount == umount == 1, (mount, umount)   # EPERM\n"
                              "assert nnp == 1 and seccomp == 2, (nnp, seccomp)"],
                       timeout_s=5, _audit_hook=False)
    assert r.all_passed, r
