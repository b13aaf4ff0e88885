"""`unisd ablate`: plan, train and score runs alike; a killed ablation finishes only what is missing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib.image
import pytest
from click.testing import CliRunner

import unisd.evaluate
import unisd.plugin
import unisd.train
from unisd import ablation_plan, ablation_report, stats
from unisd import config as cfg
from unisd.ablate import evaluate_one
from unisd.cli import main

ANIMALS = [("barks", "dog"), ("says moo", "cow"), ("lives in water", "fish"), ("flies", "bird")]
QUESTIONS = [(f"What is {a} plus {b}?", [str(a + b), str(a + b + 1)][::1 - 2 * (a % 2)], a % 2)
             for a in range(1, 7) for b in range(1, 5)]
QUESTIONS += [(f"Which animal {does}?", [name, other], 0) for does, name in ANIMALS for _, other in ANIMALS
              if other != name]
RUNS = ["sd", "clip", "match", "clip+match", "clip[max=0.5]", "clip[max=3]"]


def write_tasks(folder: Path) -> Path:
    """Two tiny multiple-choice log-likelihood tasks: sums (24 questions) and animals (12)."""
    folder.mkdir(parents=True)
    for name, rows in (("tiny_a", QUESTIONS[:24]), ("tiny_b", QUESTIONS[24:])):
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in rows))
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
            "output_type: multiple_choice\ndoc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
            "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n"
            "metadata:\n  version: 1.0\n")
    return folder


def args(tiny_model: Path, data: Path, tasks: Path, out: Path, *extra: str) -> list[str]:
    return ["ablate", "--model", str(tiny_model), "--data", str(data), "--plugins", "clip,match",
            "--combos", "pairs", "--grid", "clip.max=0.5,3", "--eval-tasks", "tiny_a,tiny_b",
            "--include-path", str(tasks), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
            "--max-new-tokens", "6", "--lr", "0.05", "-o", "match.weight=1.0", "-o", "clip.max=2", *extra]


class Recorder:
    """Wraps train / run_lm_eval: records what ran; can be killed during the n-th training."""

    def __init__(self, die_at: int = 0) -> None:
        self.trained: list[str] = []
        self.resumed: list[str] = []
        self.evaluated: list[str] = []
        self.die_at = die_at

    def train(self, config, **kwargs):
        out = Path(config.out)
        if len(self.trained) + 1 == self.die_at:  # killed after its first step was logged
            out.mkdir(parents=True)
            (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0, "step_time_s": 0.1}) + "\n")
            raise RuntimeError("killed")
        self.trained.append(out.name)
        if kwargs["resume"]:
            self.resumed.append(out.name)
        return REAL_TRAIN(config, **kwargs)

    def run_lm_eval(self, path, *rest):
        self.evaluated.append(Path(path).name)
        return REAL_EVAL(path, *rest)


REAL_TRAIN, REAL_EVAL = unisd.train.train, unisd.evaluate.run_lm_eval


def invoke(argv: list[str], recorder: Recorder):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unisd.train, "train", recorder.train)
        mp.setattr(unisd.evaluate, "run_lm_eval", recorder.run_lm_eval)
        return CliRunner().invoke(main, argv)


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model):
    """An ablation killed before its 3rd training, rerun to the end, then rerun once more."""
    root = tmp_path_factory.mktemp("ablation")
    tasks = write_tasks(root / "tasks")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{q} A. {c[0]} B. {c[1]}", "answer": "AB"[y]}) + "\n"
                            for q, c, y in QUESTIONS[::4]))
    out = root / "out"
    argv = args(tiny_model, data, tasks, out)
    first = Recorder(die_at=3)
    killed = invoke(argv, first)
    mtimes = {f: (out / "runs" / f / "unisd.json").stat().st_mtime for f in first.trained}
    second = Recorder()
    finished = invoke(argv, second)
    third = Recorder()
    again = invoke(argv, third)
    return {"out": out, "argv": argv, "killed": killed, "first": first, "mtimes": mtimes, "second": second,
            "finished": finished, "third": third, "again": again}


def test_killed_ablation_finishes_only_the_missing_runs(study):
    assert isinstance(study["killed"].exception, RuntimeError)
    assert study["first"].trained == ["sd", "clip"] and study["first"].evaluated == []
    assert study["finished"].exit_code == 0, study["finished"].output
    assert study["second"].trained == ["match", "clip+match", "clip_max_0.5", "clip_max_3"]
    assert study["first"].resumed == [] and study["second"].resumed == ["match"]  # the killed one resumes
    assert "[3/6] match: resuming" in study["finished"].output
    assert "sd: finished earlier, not retrained" in study["finished"].output
    for folder, mtime in study["mtimes"].items():
        assert (study["out"] / "runs" / folder / "unisd.json").stat().st_mtime == mtime
    assert study["second"].evaluated[0] == Path(study["argv"][2]).name  # the base model is scored first
    assert len(study["second"].evaluated) == len(RUNS) + 1
    # a third pass trains and evaluates nothing and writes the same results
    assert study["again"].exit_code == 0
    assert study["third"].trained == [] and study["third"].evaluated == []
    results = json.loads((study["out"] / "results.json").read_text())
    assert list(results["scores"]) == ["base", *RUNS]


def test_table_and_interactions_match_the_scores(study):
    out = study["out"]
    results = json.loads((out / "results.json").read_text())
    scores = results["scores"]
    overall = {n: (row["tiny_a"] + row["tiny_b"]) / 2 for n, row in scores.items()}
    gain = {n: overall[n] - overall["sd"] for n in overall}
    assert results["gains"]["clip+match"] == pytest.approx(gain["clip+match"])
    by_hand = gain["clip+match"] - gain["clip"] - gain["match"]
    assert results["interactions"] == {"clip+match": pytest.approx(by_hand)}
    assert len({round(v, 3) for v in overall.values()}) > 1, "all runs scored alike: the task tells nothing apart"
    table = (out / "table.md").read_text()
    lines = table.splitlines()
    assert lines[0] == "| run | tiny_a | tiny_b | Overall |"
    assert [ln.split(" | ")[0][2:] for ln in lines[2:2 + len(scores)]] == ["base", *RUNS]
    row, ci = scores["clip+match"], results["ci95"]["clip+match"]
    cell = {t: f"{row[t]:.1f} [{ci[t][0]:.1f}, {ci[t][1]:.1f}]" for t in ci}
    assert f"| clip+match | {cell['tiny_a']} | {cell['tiny_b']} |" in table
    for name, per_task in results["items"].items():  # per-item scores: exact intervals of the 0/1 accuracies
        for task, values in per_task.items():
            assert len(values) == {"tiny_a": 24, "tiny_b": 12}[task]
            assert 100 * sum(values.values()) / len(values) == pytest.approx(scores[name][task])
            low, high = stats.proportion_ci(int(sum(values.values())), len(values))
            assert results["ci95"][name][task] == pytest.approx([100 * low, 100 * high])
    inter, inter_ci = results["interactions"]["clip+match"], results["interactions_ci95"]["clip+match"]
    assert inter_ci[0] <= inter <= inter_ci[1]
    assert f"| clip | – | {inter:+.1f} [{inter_ci[0]:+.1f}, {inter_ci[1]:+.1f}]" in table
    for name, gain in results["gains"].items():
        assert results["gains_ci95"][name][0] <= gain <= results["gains_ci95"][name][1]
    assert "New tokens per answer at most: each task's own limit (the paper: 1024)." in table
    gold_a = [y for _, _, y in QUESTIONS[:24]]  # the best constant answer on tiny_a: its most frequent label
    best = max(gold_a.count(0), gold_a.count(1)) / 24
    assert results["answers"]["sd"]["tiny_a"]["constant_baseline"] == pytest.approx(100 * best)
    assert f"| constant answer | {100 * best:.1f} (always " in table
    assert results["settings"]["max_steps"] == 1 and results["settings"]["eval"]["tasks"] == ["tiny_a", "tiny_b"]
    for png in ("interactions.png", "sensitivity_clip.max.png"):
        image = matplotlib.image.imread(out / png)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_grid_runs_carry_their_value(study):
    results = json.loads((study["out"] / "results.json").read_text())
    grid = {p["name"]: p for p in results["plan"] if p["grid"]}
    assert grid["clip[max=3]"]["options"] == {"clip": {"max": "3"}}
    stored = json.loads((study["out"] / "runs" / "clip_max_3" / "unisd.json").read_text())
    assert stored["plugins"]["clip"]["options"]["max"] == 3.0
    single = json.loads((study["out"] / "runs" / "clip" / "unisd.json").read_text())
    assert single["plugins"]["clip"]["options"]["max"] == 2.0  # the -o value, where no grid value replaces it


def test_finished_runs_with_other_settings_are_refused(study):
    argv = [a if a != "0.05" else "0.01" for a in study["argv"]]
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2
    assert result.output.splitlines()[-1].startswith("error: runs/sd (sd) was trained with other settings (lr)")


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_model):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, args(tiny_model, tmp_path / "d.jsonl", tmp_path, out, "--dry-run",
                                           "--sec-per-step", "2", "--baselines", "sft", "--combos", "all,unisd-star"))
    assert result.exit_code == 0, result.output
    names = [ln.split()[0] for ln in result.output.splitlines()[1:9]]
    assert names == [*RUNS[:4], "preset:unisd-star", "clip[max=0.5]", "clip[max=3]", "preset:sft"]
    assert "8 runs x 1 steps = 8 steps" in result.output and "estimated training time" in result.output
    assert "agree,contrast" in result.output  # unisd-star's plugins
    assert not out.exists()


def test_cost_model():
    available = unisd.plugin.discover()
    cost = lambda plugins, options=None: ablation_plan.step_cost(  # noqa: E731
        cfg.resolve("", plugins, options or {}, model="m", data="d", out="o"), available)
    assert cost(()) == 1.0 and cost(("clip", "match")) == 1.0
    assert cost(("agree",), {"agree": {"k": "5"}}) == pytest.approx(1 + 5 * ablation_plan.TEACHER_FORWARD)
    assert cost(("agree", "contrast"), {"agree": {"k": "3"}}) == pytest.approx(1 + 4 * ablation_plan.TEACHER_FORWARD)
    assert cost(("ema",), {"ema": {"every": "4"}}) == pytest.approx(1 + 0.25 * ablation_plan.TEACHER_FORWARD)


def test_interactions_by_hand():
    overall = {"sd": 50.0, "a": 53.0, "b": 51.0, "c": 49.0, "a+b": 52.0, "a+c": 56.0}
    got = ablation_report.interactions(overall, ("a", "b", "c"))
    assert got == {("a", "b"): pytest.approx(-2.0), ("a", "c"): pytest.approx(4.0)}  # b+c was not run


@pytest.mark.parametrize("extra, message", [
    (["--plugins", "clip,match,nope"], "error: unknown plugin 'nope' (available:"),
    (["--grid", "clip.nope=1,2"], "error: unknown option clip.nope"),
    (["--grid", "clip.max"], "error: --grid 'clip.max': expected plugin.key=v1,v2"),
    (["--combos", "pairs,clip+ema"], "error: --combos 'clip+ema': 'ema' is not in --plugins"),
    (["-o", "ema.beta=0.5"], "error: -o given for 'ema', which is not in --plugins"),
    (["--baselines", "nope"], "error: unknown preset 'nope'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, tiny_model, extra, message):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, args(tiny_model, tmp_path / "d.jsonl", tmp_path, out, *extra))
    assert result.exit_code == 2, result.output
    assert result.output.startswith(message) and len(result.output.strip().splitlines()) == 1, result.output
    assert not out.exists()


def test_third_party_plugin_by_name(tmp_path, tiny_model, plugin_dist):
    plugin_dist("unisd-extra", {"halve": "halve_plugin:Halve"}, {"halve_plugin": (
        "from dataclasses import dataclass\nfrom unisd.plugin import Plugin\n\n"
        "class Halve(Plugin):\n    @dataclass(frozen=True)\n    class Config:\n        factor: float = 0.5\n\n"
        "    def token_loss(self, D, out):\n        return D * self.config.factor\n")})
    result = CliRunner().invoke(main, ["ablate", "--model", str(tiny_model), "--data", "d.jsonl", "--plugins",
                                       "clip,halve", "--combos", "pairs", "--grid", "halve.factor=0.1,0.9",
                                       "--eval-tasks", "t", "--out", str(tmp_path / "o"), "--dry-run",
                                       "--max-steps", "2"])
    assert result.exit_code == 0, result.output
    assert "clip+halve" in result.output and "halve[factor=0.9]" in result.output
    assert f"{1 + ablation_plan.TEACHER_FORWARD:.2f}" in result.output  # an unknown plugin counts as one extra view


def test_eval_backend_vllm_needs_the_engine_before_anything_trains(tiny_model, tmp_path, monkeypatch):
    from unisd import engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["ablate", "--model", str(tiny_model), "--data", "demo", "--plugins", "clip",
                                       "--eval-tasks", "unisd_demo", "--eval-backend", "vllm", "--out", str(out),
                                       "--max-steps", "1"])
    assert result.exit_code == 2 and result.output.strip() == f"error: {engine.MISSING}"
    assert not out.exists()


def test_the_eval_backend_reaches_lm_eval_and_a_record_serves_either(tmp_path, monkeypatch):
    seen: list[str] = []

    class Stop(Exception):
        pass

    def run_lm_eval(model, tasks, limit, include, batch_size, max_gen_toks, backend, template_kwargs):
        seen.append(backend)
        raise Stop

    monkeypatch.setattr(unisd.evaluate, "run_lm_eval", run_lm_eval)
    record = tmp_path / "base.json"
    with pytest.raises(Stop):
        evaluate_one("base", "m", record, ["t"], 4, [], 4, lambda m: None, backend="vllm")
    assert seen == ["vllm"]
    kept = {"scores": {"t": 0.5}, "items": {}, "answers": {}, "gen_toks": {}}
    record.write_text(json.dumps({"settings": {"tasks": ["t"], "limit": 4, "max_gen_toks": None}, **kept}))
    assert evaluate_one("base", "m", record, ["t"], 4, [], 4, lambda m: None, backend="hf") == kept
