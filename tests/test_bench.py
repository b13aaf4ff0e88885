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
    assert {"rank_memory", "study", "study_tables", "vllm_rollout", "gpu_smoke"} <= set(found)
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


@pytest.mark.parametrize("name", ["bf16_views", "vllm_views"])
def test_a_tools_result_records_its_provenance_and_the_tools_own_command(name):
    result = json.loads((ROOT / "tools" / "results" / f"{name}.json").read_text())
    assert [k for k in PROVENANCE if k not in result] == []
    assert {"cpu", "cores", "bf16_flags"} <= set(result["machine"])
    command = shlex.split(result["command"])
    assert command[:3] == ["python", "-m", f"tools.{name}"], result["command"]
    assert command[command.index("--out") + 1] == f"tools/results/{name}.json"


def test_provenance_names_the_module_that_ran():
    from bench import provenance

    assert provenance.record(["roofline", "--quick"])["command"] == "python -m bench roofline --quick"
    assert provenance.record(["--out", "x y.json"], module="tools.bf16_views")["command"] == \
        "python -m tools.bf16_views --out 'x y.json'"


def test_gpu_smoke_runs_the_two_gpu_cases_only_with_two_gpus_and_vllm_only_on_cuda_where_installed():
    from bench.gpu_smoke import tiny_cases

    cpu = {c.name: c for c in tiny_cases(0, vllm=True)}
    assert list(cpu) == ["fp32", "bf16", "lora-bf16", "fsdp-1proc"]
    assert cpu["fp32"].resume and cpu["fsdp-1proc"].processes == 1 and "--fsdp" in cpu["fsdp-1proc"].flags
    assert list(c.name for c in tiny_cases(1, vllm=False)) == list(cpu)
    assert [c.name for c in tiny_cases(1, vllm=True)][len(cpu):] == ["vllm", "lora-bf16-vllm"]
    two = {c.name: c for c in tiny_cases(2, vllm=True)}
    assert set(two) - set(cpu) == {"ddp-2gpu", "fsdp-2gpu", "vllm", "lora-bf16-vllm"}
    assert two["ddp-2gpu"].processes == two["fsdp-2gpu"].processes == 2
    assert all("--rollout" in c.flags for name, c in two.items() if "vllm" in name)
