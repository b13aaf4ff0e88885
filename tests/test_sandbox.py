"""The sandbox contains hostile programs, reports them as failures, and the test process carries on."""
from __future__ import annotations

import ast
import errno
import os
import socket
import time
from pathlib import Path

import pytest

from unisd import sandbox
from unisd.data import benchmarks as B
from unisd.data import scoring as S

REAL = Path(os.environ.get("UNISD_REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_passing_and_failing_programs():
    ok = sandbox.run_program("assert sum([1, 2]) == 3")
    assert ok.passed and ok.reason == "passed" and ok.returncode == 0
    bad = sandbox.run_program("assert 1 == 2, 'nope'")
    assert not bad.passed and "AssertionError" in bad.reason
    crash = sandbox.run_program("import sys\nsys.exit(3)")
    assert not crash.passed and crash.returncode == 3 and crash.reason == "exit status 3"  # silent: the status
    early = sandbox.run_program("import os\nos._exit(0)\nassert False")  # skipping the asserts is no pass
    assert not early.passed and (early.reason, early.returncode) == ("exited before the end of the tests", -1)


def test_error_line_is_the_last_line_decoded_leniently_and_cut_to_300_characters():
    long = sandbox.run_program("assert False, 'x' * 1000")
    assert long.reason == "AssertionError: " + "x" * (300 - len("AssertionError: "))
    raw = sandbox.run_program("import sys\nsys.stdout.buffer.write(b'bad \\xff byte\\n')\nsys.stdout.flush()\nsys.exit(1)")
    assert raw.reason == "bad \ufffd byte"


def test_program_sees_its_limits_a_private_folder_and_its_own_session():
    prog = ("import os, sys, resource as r\nnames = ['RLIMIT_AS', 'RLIMIT_CPU', 'RLIMIT_FSIZE', 'RLIMIT_CORE']\n"
            "got = [r.getrlimit(getattr(r, n)) for n in names]\n"
            "assert False, (got, oct(os.stat('.').st_mode & 0o777), os.path.basename(os.getcwd())[:14],\n"
            "               os.getsid(0) == os.getpid(), sys.flags.isolated, sys.flags.no_site)\n")
    res = sandbox.run_program(prog, timeout=4, memory_mb=512, fsize_mb=3)
    limits, mode, prefix, leader, isolated, no_site = ast.literal_eval(res.reason.removeprefix("AssertionError: "))
    assert limits == [(512 << 20, 512 << 20), (5, 6), (3 << 20, 3 << 20), (0, 0)]  # CPU: int(timeout) + 1 s
    assert (mode, prefix) == ("0o700", "unisd-sandbox-")
    # its own session (so a timeout kills the whole group), isolated mode, and no site-packages when root
    # (the interpreter then runs as another uid and must not import from folders it cannot read)
    assert (leader, isolated, no_site) == (True, 1, int(os.geteuid() == 0))


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    res = sandbox.run_program("while True:\n    pass", timeout=1.5)
    assert not res.passed and "timeout" in res.reason
    assert time.monotonic() - start < 6


ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="per-run uid and namespaces only when the evaluator is root")


@ROOT_ONLY
def test_fork_bomb_stops_at_the_process_limit():
    # The run's uid is its own, so RLIMIT_NPROC admits the program itself and nproc - 1 children.
    # at most 24 forks, so a missing limit fails by count instead of bombing the machine
    prog = ("import os, time\nforked = 0\ntry:\n    for _ in range(24):\n        if os.fork() == 0:\n"
            "            time.sleep(60)\n            os._exit(0)\n        forked += 1\nexcept OSError:\n    pass\n"
            "assert False, f'forked {forked}'\n")
    res = sandbox.run_program(prog, timeout=10, nproc=6)
    assert res.reason == "AssertionError: forked 5"
    assert sandbox.run_program("print('still alive')").passed  # the machine still forks for us


def _live_sandbox_processes() -> list[str]:
    """Pids running (not zombies waiting to be reaped) under a sandbox uid."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            status = (p / "status").read_text()
        except OSError:
            continue
        uid = int(status.split("\nUid:")[1].split()[0])
        state = status.split("\nState:")[1].split()[0]
        if uid >= sandbox.SANDBOX_UID_BASE and state != "Z":
            pids.append(p.name)
    return pids


@ROOT_ONLY
def test_daemonized_child_does_not_outlive_the_run():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    sandbox.run_program(prog, timeout=2)
    sandbox.run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=1)
    deadline = time.monotonic() + 3
    while _live_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_sandbox_processes() == []


def test_memory_bomb_raises_memory_error_near_the_limit():
    # 8 MiB blocks until MemoryError (at most twice the limit, so a missing limit fails fast, not by timeout)
    prog = ("blocks = []\ntry:\n    for _ in range(64):\n        blocks.append(bytearray(8 << 20))\n"
            "except MemoryError:\n    got = 8 * len(blocks)\n    del blocks\n    assert False, f'MemoryError after {got} MiB'\n")
    res = sandbox.run_program(prog, timeout=10, memory_mb=256)
    assert res.reason.startswith("AssertionError: MemoryError after "), res.reason
    allocated = int(res.reason.split()[-2])
    assert 256 - 128 <= allocated < 256  # the interpreter itself takes the rest of the address space


def test_file_size_limit_stops_writes_at_fsize():
    prog = ("written = 0\ntry:\n    with open('big.bin', 'wb', buffering=0) as f:\n        for _ in range(8):\n"
            "            written += f.write(bytes(1 << 20))\nexcept OSError as e:\n"
            "    assert False, f'{e.strerror} after {written} bytes'\n")
    res = sandbox.run_program(prog, fsize_mb=3)
    assert res.reason == f"AssertionError: File too large after {3 << 20} bytes"


def test_work_folder_is_the_cwd_and_is_deleted_afterwards(monkeypatch):
    made: list[str] = []
    real_mkdtemp = sandbox.tempfile.mkdtemp

    def recording_mkdtemp(**kwargs):
        made.append(real_mkdtemp(**kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", recording_mkdtemp)
    failed = sandbox.run_program("import os\nopen('left.txt', 'w').write('x')\nassert False, os.getcwd()")
    passed = sandbox.run_program("open('left.txt', 'w').write('x')")
    timed_out = sandbox.run_program("open('left.txt', 'w').write('x')\nwhile True:\n    pass", timeout=1)
    assert passed.passed and not timed_out.passed
    assert len(made) == 3 and failed.reason == f"AssertionError: {made[0]}"
    assert [Path(folder).exists() for folder in made] == [False, False, False]


def test_cannot_delete_or_write_files_outside_its_folder(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    outside = tmp_path / "evil.txt"
    prog = (f"import os, shutil\n"
            f"for f in (lambda: os.remove({str(canary)!r}), lambda: shutil.rmtree({str(tmp_path)!r}),\n"
            f"          lambda: open({str(outside)!r}, 'w').write('x'), lambda: open({str(canary)!r}, 'w').write('gone')):\n"
            f"    try:\n        f()\n    except OSError:\n        pass\n"
            f"open('inside.txt', 'w').write('fine')\n")
    sandbox.run_program(prog)
    assert canary.read_text() == "keep me" and not outside.exists()


@ROOT_ONLY
def test_world_writable_folders_are_private_to_the_run():
    folders = [Path(f) for f in ("/tmp", "/var/tmp", "/dev/shm") if Path(f).is_dir()]
    probes = [folder / f"unisd-escape-{os.getpid()}" for folder in folders]
    # each is a fresh 16 MiB tmpfs, sticky and world-writable, without set-uid files or devices
    prog = (f"import os\nfor p in {[str(p) for p in probes]!r}:\n    open(p, 'w').write('x')\n"
            "mounts = [l.split() for l in open('/proc/self/mounts')]\n"
            f"assert False, [(m[0], m[2], sorted(set(m[3].split(',')) & {{'nosuid', 'nodev', 'size=16384k'}}),\n"
            f"                oct(os.stat(m[1]).st_mode & 0o7777)) for m in mounts if m[1] in {[str(f) for f in folders]!r}][-{len(folders)}:]\n")
    try:
        res = sandbox.run_program(prog)
        assert ast.literal_eval(res.reason.removeprefix("AssertionError: ")) == \
            [("tmpfs", "tmpfs", ["nodev", "nosuid", "size=16384k"], "0o1777")] * len(folders)
        assert [p.exists() for p in probes] == [False] * len(folders)  # it wrote to its own folders
    finally:
        for p in probes:
            p.unlink(missing_ok=True)


SCRUBBED_ENV = ["HOME", "LANG", "OMP_NUM_THREADS", "PATH", "PYTHONDONTWRITEBYTECODE", "PYTHONHASHSEED", "TMPDIR"]
_CHILD_ENV = "import subprocess, sys\nenv = subprocess.run([sys.executable, '-I', '-c', 'import os; print(sorted(os.environ))'],\n" \
             "                     capture_output=True, text=True).stdout.strip()\n"


def test_environment_is_scrubbed_for_the_program_and_its_children(monkeypatch):
    monkeypatch.setenv("UNISD_TEST_SECRET", "hunter2")  # set now, long after this process started
    # the program and a child it starts see exactly the sandbox's own variables (the child adds LC_CTYPE at most)
    res = sandbox.run_program(f"import os\n{_CHILD_ENV}assert False, (sorted(os.environ), env)")
    own, child = ast.literal_eval(res.reason.removeprefix("AssertionError: "))
    assert own == SCRUBBED_ENV
    values = sandbox.run_program("import os\nassert False, {k: v for k, v in os.environ.items() if k not in ('HOME', 'TMPDIR')}")
    assert ast.literal_eval(values.reason.removeprefix("AssertionError: ")) == {
        "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": "0"}
    assert [k for k in ast.literal_eval(child) if k != "LC_CTYPE"] == SCRUBBED_ENV


@ROOT_ONLY
def test_parent_environment_cannot_be_read_through_proc():
    prog = "import os\ntry:\n    open(f'/proc/{os.getppid()}/environ').read()\nexcept OSError as e:\n    assert False, type(e).__name__\n"
    assert sandbox.run_program(prog).reason == "AssertionError: PermissionError"


def test_socket_creation_raises_in_the_program():
    res = sandbox.run_program("import socket\nsocket.socket()")
    assert not res.passed and res.reason == "OSError: network access is disabled in the unisd sandbox"


@ROOT_ONLY
def test_child_process_cannot_reach_a_host_listener():
    """A fresh interpreter started by the program has real sockets: only the network namespace stops it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    child = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
             f"    print('connected')\nexcept OSError as e:\n    print(type(e).__name__, e.errno)\n")
    prog = (f"import subprocess, sys\nrun = subprocess.run([sys.executable, '-I', '-c', {child!r}], capture_output=True, text=True)\n"
            f"assert False, (run.stdout + run.stderr).strip()\n")
    with listener:
        res = sandbox.run_program(prog)
        with pytest.raises(TimeoutError):
            listener.accept()
    assert res.reason == f"AssertionError: OSError {errno.ENETUNREACH}"  # loopback is down in the namespace


def test_pass_at_1_on_gold_and_wrong_solutions(monkeypatch):
    monkeypatch.setenv("UNISD_DATA_DIR", str(Path(__file__).parent / "fixtures"))
    mbpp = B.load("mbpp", "test") + B.load("mbpp", "train")
    he = B.load("humaneval", "test")[:4]
    items = mbpp + he
    gold = [f"Here you go:\n```python\n{e.answer}\n```" for e in items]
    assert S.pass_at_1(gold, [e.meta for e in items]) == 1.0
    wrong = ["```python\ndef nothing():\n    return None\n```"] * len(items)
    assert S.pass_at_1(wrong, [e.meta for e in items]) == 0.0
    assert sandbox.pass_at_k(10, 0, 1) == 0.0 and sandbox.pass_at_k(10, 10, 1) == 1.0
    assert abs(sandbox.pass_at_k(10, 3, 1) - 0.3) < 1e-9
    assert sandbox.pass_at_k(5, 2, 3) == pytest.approx(1 - 1 / 10)  # n - c == k: one all-wrong draw of C(5, 3)


@pytest.mark.realdata
def test_real_mbpp_and_humaneval_gold_solutions_all_pass(monkeypatch):
    """All 257 sanitized MBPP test references and all 164 HumanEval canonical solutions (about 20 s)."""
    if not (REAL / "mbpp").is_dir():
        pytest.skip(f"no real data at {REAL}")
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("UNISD_DATA_DIR", str(REAL))
    items = B.load("mbpp", "test") + B.load("humaneval", "test")
    assert len(items) == 257 + 164
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        # generous timeout: a few references (e.g. MBPP 123) take seconds, more on a loaded 2-core machine
        results = list(pool.map(lambda e: S.check_code(f"```python\n{e.answer}\n```", e.meta, timeout=30), items))
    failed = [(e.meta["task_id"], r.reason) for e, r in zip(items, results) if not r.passed]
    print(f"{len(items)} gold programs in {time.monotonic() - start:.1f} s")
    assert failed == []
