"""The sandbox contains hostile programs, reports them as failures, and the test process carries on."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from unisd import sandbox
from unisd.data import benchmarks as B

REAL = Path(os.environ.get("UNISD_REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))


def test_passing_and_failing_programs():
    assert sandbox.run_program("assert sum([1, 2]) == 3").passed
    bad = sandbox.run_program("assert 1 == 2, 'nope'")
    assert not bad.passed and "AssertionError" in bad.reason
    crash = sandbox.run_program("import sys\nsys.exit(3)")
    assert not crash.passed and crash.returncode == 3
    early = sandbox.run_program("import os\nos._exit(0)\nassert False")  # skipping the asserts is no pass
    assert not early.passed and "before the end" in early.reason


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    res = sandbox.run_program("while True:\n    pass", timeout=1.5)
    assert not res.passed and "timeout" in res.reason
    assert time.monotonic() - start < 6


def test_fork_bomb_is_contained_and_cleaned_up():
    prog = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    res = sandbox.run_program(prog, timeout=2)
    assert not res.passed
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


@pytest.mark.skipif(os.geteuid() != 0, reason="uid sweep only when the evaluator runs as root")
def test_daemonized_child_does_not_outlive_the_run():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    sandbox.run_program(prog, timeout=2)
    sandbox.run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", timeout=1)
    deadline = time.monotonic() + 3
    while _live_sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _live_sandbox_processes() == []


def test_memory_bomb_fails_without_hurting_us():
    res = sandbox.run_program("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 2**20))", timeout=5, memory_mb=512)
    assert not res.passed and ("MemoryError" in res.reason or "timeout" in res.reason)


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
    # world-writable /tmp is private to the run where namespaces are available (root here)
    probe = Path("/tmp") / f"unisd-escape-{os.getpid()}"
    sandbox.run_program(f"open({str(probe)!r}, 'w').write('x')")
    if os.geteuid() == 0:
        assert not probe.exists()
    probe.unlink(missing_ok=True)


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("UNISD_TEST_SECRET", "hunter2")
    prog = ("import os\nassert 'UNISD_TEST_SECRET' not in os.environ, 'leak'\n"
            "try:\n    data = open(f'/proc/{os.getppid()}/environ').read()\nexcept OSError:\n    data = ''\n"
            "assert 'hunter2' not in data, 'leak via /proc'\n")
    res = sandbox.run_program(prog)
    assert res.passed, res.reason
    leak = sandbox.run_program("import os\nassert 'UNISD_TEST_SECRET' in os.environ")
    assert not leak.passed


def test_network_is_blocked():
    res = sandbox.run_program("import socket\nsocket.socket()")
    assert not res.passed and "network" in res.reason


def test_pass_at_1_on_gold_and_wrong_solutions(monkeypatch):
    monkeypatch.setenv("UNISD_DATA_DIR", str(Path(__file__).parent / "fixtures"))
    mbpp = B.load("mbpp", "test") + B.load("mbpp", "train")
    he = B.load("humaneval", "test")[:4]
    items = mbpp + he
    gold = [f"Here you go:\n```python\n{e.answer}\n```" for e in items]
    assert sandbox.pass_at_1(gold, [e.meta for e in items]) == 1.0
    wrong = ["```python\ndef nothing():\n    return None\n```"] * len(items)
    assert sandbox.pass_at_1(wrong, [e.meta for e in items]) == 0.0
    assert sandbox.pass_at_k(10, 0, 1) == 0.0 and sandbox.pass_at_k(10, 10, 1) == 1.0
    assert abs(sandbox.pass_at_k(10, 3, 1) - 0.3) < 1e-9


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
        results = list(pool.map(lambda e: sandbox.check(f"```python\n{e.answer}\n```", e.meta, timeout=30), items))
    failed = [(e.meta["task_id"], r.reason) for e, r in zip(items, results) if not r.passed]
    print(f"{len(items)} gold programs in {time.monotonic() - start:.1f} s")
    assert failed == []
