"""The benchmark suite's contract: one way in, and every stored result says how to reproduce it."""
from __future__ import annotations

import functools
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = sorted((ROOT / "bench" / "results").rglob("*.json"))
PROVENANCE = ("command", "git_sha", "versions", "machine")


@functools.cache
def listed() -> dict[str, str]:
    done = subprocess.run([sys.executable, "-m", "bench", "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(line.split(maxsplit=1) if " " in line.strip() else (line.strip(), "")
                for line in done.stdout.splitlines() if line.strip())


def test_the_list_names_each_benchmark_with_its_summary():
    found = listed()
    assert {"rank_memory", "study", "study_tables", "vllm_rollout", "gpu_check"} <= set(found)
    assert "provenance" not in found and not any(name.startswith("_") for name in found)
    assert all(summary for summary in found.values()), found


def test_an_unknown_benchmark_is_one_error_line_and_exit_2():
    done = subprocess.run([sys.executable, "-m", "bench", "no_such_benchmark"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["error: no benchmark 'no_such_benchmark'; python -m bench --list names them"]


def test_there_are_results_to_check():
    assert RESULTS


@pytest.mark.parametrize("path", [pytest.param(p, id=str(p.relative_to(ROOT))) for p in RESULTS])
def test_every_result_records_its_provenance_and_a_listed_command(path):
    result = json.loads(path.read_text())
    assert [k for k in PROVENANCE if k not in result] == []
    assert result["git_sha"] and {"python", "torch"} <= set(result["versions"])
    assert {"cpu", "cores"} <= set(result["machine"])
    assert result.get("description"), "a result says in one line what it measured"
    command = shlex.split(result["command"])
    assert command[:3] == ["python", "-m", "bench"], result["command"]
    assert command[3] in listed(), f"{result['command']}: not a benchmark python -m bench --list knows"


def test_gpu_check_runs_the_sharded_combinations_only_with_two_gpus_and_vllm_only_where_installed():
    from bench.gpu_check import combinations

    one = combinations(1, vllm=False)
    assert {processes for processes, _ in one.values()} == {1} and not any("vllm" in f for _, f in one.values())
    two = combinations(2, vllm=True)
    assert {n for n, (processes, _) in two.items() if processes == 2} >= {"ddp", "fsdp-lora", "fsdp-bf16", "fsdp-vllm",
                                                                          "fsdp-ema"}
    assert all("--fsdp" in flags for name, (_, flags) in two.items() if name.startswith("fsdp"))
