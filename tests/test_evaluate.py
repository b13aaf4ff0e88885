"""`unisd eval` / `compare` / `plot`: same numbers as lm-eval itself, real PNGs, consistent retention."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib.image
import pytest
import torch
from click.testing import CliRunner

from unisd import config as cfg
from unisd import evaluate as ev
from unisd import card, models, report, stats
from unisd.cli import main
from unisd.train import train

ROWS = [{"prompt": "Which animal barks? A. cat B. dog", "answer": "B", "rationale": "dogs bark",
         "question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1},
        {"prompt": "Where do fish live? A. water B. trees", "answer": "A", "rationale": "fish need water",
         "question": "Where do fish live?", "choices": ["water", "trees"], "label": 0},
        {"prompt": "What is two plus two? A. 4 B. 5", "answer": "A", "rationale": "2+2=4",
         "question": "What is two plus two?", "choices": ["4", "5"], "label": 0}]


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory, tiny_task_writer) -> Path:
    return tiny_task_writer(tmp_path_factory.mktemp("tasks"), ROWS, "tiny")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_model) -> dict[str, str]:
    root = tmp_path_factory.mktemp("ckpts")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"], "answer": r["answer"]}) + "\n" for r in ROWS))
    trained = train(cfg.resolve("", (), {}, model=str(tiny_model), data=str(data), out=str(root / "sd"),
                                max_steps=2, batch_size=2, max_new_tokens=6, lr=5e-2), echo=lambda m: None)
    return {"base": str(tiny_model), "sd": str(trained)}


def test_eval_matches_direct_lm_eval_and_writes_table_and_chart(two_checkpoints, tiny_tasks, tmp_path):
    out = tmp_path / "eval"
    result = CliRunner().invoke(main, ["eval", "--model", f"base={two_checkpoints['base']}", "--model",
                                       f"sd={two_checkpoints['sd']}", "--tasks", "tiny_mc,tiny_gen", "--out", str(out),
                                       "--include-path", str(tiny_tasks), "--retention", "--base",
                                       two_checkpoints["base"], "--max-gen-toks", "4"])
    assert result.exit_code == 0, result.output
    combined = json.loads((out / "results.json").read_text())
    for name, path in two_checkpoints.items():
        direct = ev.run_lm_eval(path, ["tiny_mc", "tiny_gen"], None, [str(tiny_tasks)], 4, max_gen_toks=4)
        assert combined["scores"][name]["tiny_mc"] == pytest.approx(100 * direct["results"]["tiny_mc"]["acc,none"])
        assert combined["scores"][name]["tiny_gen"] == pytest.approx(
            100 * direct["results"]["tiny_gen"]["exact_match,none"])
        per_model = json.loads((out / name / "results.json").read_text())
        assert per_model["results"]["tiny_mc"]["acc,none"] == direct["results"]["tiny_mc"]["acc,none"]
        for task in ("tiny_gen",):
            r = combined["retention"][name][task]
            assert r["ppl_ret"] > 1.0 and r["ppl_fit"] > 1.0
            assert r["ppl_ret_ci95"][0] <= r["ppl_ret"] <= r["ppl_ret_ci95"][1]
        for task in ("tiny_mc", "tiny_gen"):  # per-item scores: their mean is the score, their interval is exact
            items = list(combined["items"][name][task].values())
            assert len(items) == 3 and 100 * sum(items) / 3 == pytest.approx(combined["scores"][name][task])
            low, high = stats.proportion_ci(int(sum(items)), 3)
            assert combined["ci95"][name][task] == pytest.approx([100 * low, 100 * high])
    assert combined["max_gen_toks"] == 4 and combined["gen_toks"] == {"tiny_gen": 4}
    for task in ("tiny_mc", "tiny_gen"):
        a, b = (list(combined["items"][n][task].values()) for n in ("sd", "base"))
        assert combined["paired"]["sd"]["base"][task] == stats.paired(a, b).as_json(scale=100.0)
    assert set(combined["paired"]) == {"sd"}
    assert combined["runs"]["base"] == {} and combined["runs"]["sd"]["preset"] == ""
    mc = combined["answers"]["base"]["tiny_mc"]
    assert mc["constant_baseline"] == pytest.approx(100 * 2 / 3) and mc["constant_answer"] == "0"
    assert mc["n"] == 3 and not mc["collapsed"]  # 3 items are too few to call a collapse
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| run | tiny_mc | tiny_gen | Overall |"
    sd, ci = combined["scores"]["sd"], combined["ci95"]["sd"]
    mean = (sd["tiny_mc"] + sd["tiny_gen"]) / 2
    cells = [f"{sd[t]:.1f} [{ci[t][0]:.1f}, {ci[t][1]:.1f}]" for t in ("tiny_mc", "tiny_gen")]
    whole = combined["overall_ci95"]["sd"]
    assert whole[0] <= mean <= whole[1]
    overall_cell = f"{mean:.1f} [{whole[0]:.1f}, {whole[1]:.1f}]"
    assert f"| sd | {cells[0]} | {cells[1]} | {overall_cell} |" in table  # 3 items: no difference is significant
    assert "New tokens per answer at most: tiny_gen 4, capped with --max-gen-toks 4" in table
    assert "| constant answer | 66.7 (always 0) |" in table
    assert "| sd | base | tiny_mc |" in table and "PPL_ret" in table
    image = matplotlib.image.imread(out / "scores.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    # the trained run's model card now shows its own scores; the base folder (not a run) is left alone
    model_card = (Path(two_checkpoints["sd"]) / "README.md").read_text()
    assert card.RESULTS_HEADING in model_card and f"| tiny_mc | {sd['tiny_mc']:.1f} |" in model_card
    assert not (Path(two_checkpoints["base"]) / "README.md").exists()
    # compare rebuilds the same table from the saved results
    again = CliRunner().invoke(main, ["compare", str(out / "results.json"), "--out", str(tmp_path / "cmp")])
    assert again.exit_code == 0
    assert (tmp_path / "cmp" / "table.md").read_text() == table


def test_ppl_ret_against_itself_is_its_own_perplexity(two_checkpoints):
    path = two_checkpoints["sd"]
    tok = models.load_tokenizer(path)
    model = models.load_model(path).eval()
    contexts = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                        add_generation_prompt=True) for r in ROWS]
    completions = ["B because dogs", "water", "four"]
    samples = {"t": [{"arguments": {"gen_args_0": {"arg_0": c, "arg_1": {}}}, "resps": [[y]],
                      "doc": {"prompt": r["prompt"], "answer": r["answer"], "rationale": r["rationale"]}}
                     for c, y, r in zip(contexts, completions, ROWS)]}
    got = ev.retention(samples, path, path)["t"]["ppl_ret"]
    first_two = ev.retention(samples, path, path, documents=2)["t"]["ppl_ret"]
    totals, counts = [], []
    with torch.no_grad():
        for c, y in zip(contexts, completions):
            ctx = tok(c, add_special_tokens=False)["input_ids"]
            cont = tok(y, add_special_tokens=False)["input_ids"]
            loss = model(input_ids=torch.tensor([ctx + cont]), labels=torch.tensor([[-100] * len(ctx) + cont])).loss
            totals.append(float(loss) * len(cont))
            counts.append(len(cont))
    assert got == pytest.approx(math.exp(sum(totals) / sum(counts)), rel=1e-5)
    assert first_two == pytest.approx(math.exp(sum(totals[:2]) / sum(counts[:2])), rel=1e-5)
    assert first_two != pytest.approx(got, rel=1e-3)


def test_eval_errors_are_one_line(tmp_path):
    bad = CliRunner().invoke(main, ["eval", "--model", "=x", "--out", str(tmp_path / "e")])
    assert bad.exit_code == 2 and bad.output.startswith("error: --model '=x'")
    need_base = CliRunner().invoke(main, ["eval", "--model", "a=b", "--retention", "--out", str(tmp_path / "e")])
    assert need_base.exit_code == 2 and "--retention needs --base" in need_base.output


def test_training_curves_png(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s, "distill": 0.9 / s, "contrast": 0.01, "agree/weight_mean": 0.99,
             "clip/rate": 0.1, "step_time_s": 1.0, "skipped": False} for s in range(1, 6)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    keys = report.training_curves(metrics, tmp_path / "curves.png")
    assert keys == ["loss", "distill", "contrast", "agree/weight_mean", "clip/rate"]
    image = matplotlib.image.imread(tmp_path / "curves.png")
    assert image.shape[:2] == (520, 1200)  # 2 rows x 3 columns of 4 x 2.6 inches at 100 dpi
    result = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert result.exit_code == 0 and "curves.png" in result.output


def _mc_sample(doc_id: int, reply: str, gold: str) -> dict:
    meta = json.dumps({"benchmark": "cos_e", "n_options": 4, "gold": gold})
    return {"doc_id": doc_id, "doc": {"meta": meta}, "resps": [[reply]], "filtered_resps": [reply], "acc": 0.0}


def test_collapsed_answers_are_flagged_with_the_constant_answer_baseline(tmp_path):
    golds = list("AABBCCCCDD") * 2
    constant = {"t": [_mc_sample(i, "Reasoning: it fits.\nAnswer: D", g) for i, g in enumerate(golds)]}
    spread = {"t": [_mc_sample(i, f"The answer is {'ABCD'[i % 4]}.", g) for i, g in enumerate(golds)]}
    code = {"t": [{"doc_id": i, "doc": {}, "resps": [["def f():\n    return 1"]], "filtered_resps": [""]}
                  for i in range(12)]}
    flagged = ev.answer_spread(constant)["t"]
    assert flagged == {"n": 20, "top_share": 100.0, "collapsed": True, "top_answer": "D", "constant_answer": "C",
                       "constant_baseline": 40.0}
    assert ev.answer_spread(spread)["t"]["top_share"] == 25.0 and not ev.answer_spread(spread)["t"]["collapsed"]
    assert ev.answer_spread(code)["t"] == {"n": 12, "top_share": 100.0, "collapsed": True}
    combined = {"scores": {"base": {"t": 20.0}, "sd": {"t": 25.0}}, "ci95": {}, "paired": {},
                "answers": {"base": ev.answer_spread(constant), "sd": ev.answer_spread(spread)}}
    report.write_comparison(combined, tmp_path)
    table = (tmp_path / "table.md").read_text()
    assert "| constant answer | 40.0 (always C) |" in table
    assert "| base | D 100% ⚠ collapsed |" in table and "| sd | A 25% |" in table


def test_pairs_each_run_with_the_base_and_unisd_star_with_the_best_baseline():
    combined = {"tasks": ["t"], "scores": {"base": {"t": 20.0}, "sft": {"t": 33.3}, "gkd": {"t": 30.0},
                                          "star": {"t": 35.0}, "mine": {"t": 10.0}},
                "runs": {"base": {}, "sft": {"preset": "sft"}, "gkd": {"preset": "gkd"},
                         "star": {"preset": "unisd-star"}, "mine": {"preset": ""}}}
    assert ev.comparisons(combined) == [("sft", "base"), ("gkd", "base"), ("star", "base"), ("mine", "base"),
                                        ("star", "sft")]
    # the best baseline is chosen on the evaluated tasks only (a stray column does not count), or on every
    # column when the tasks named a group whose leaves are the columns
    runs = {"base": {}, "sft": {"preset": "sft"}, "gkd": {"preset": "gkd"}, "star": {"preset": "unisd-star"}}
    stray = {"base": {"t": 10.0, "x": 10.0}, "sft": {"t": 30.0, "x": 0.0}, "gkd": {"t": 20.0, "x": 90.0},
             "star": {"t": 25.0, "x": 50.0}}
    assert ev.comparisons({"tasks": ["t"], "scores": stray, "runs": runs})[-1] == ("star", "sft")
    assert ev.comparisons({"tasks": ["group"], "scores": stray, "runs": runs})[-1] == ("star", "gkd")
    same, other = {"order_sha256": "a" * 64}, {"order_sha256": "b" * 64}
    assert ev.order_warning({"base": {}, "sd": same, "star": same}) is None
    warning = ev.order_warning({"base": {}, "sd": same, "star": other})
    assert warning == ("warning: these runs were trained on different data orders (sd aaaaaaaa, star bbbbbbbb); "
                       "their differences mix method and data")


def test_overall_interval_of_one_task_is_that_tasks_interval():
    hits = {str(i): float(i < 7) for i in range(20)}
    got = ev.overall_intervals({"one": {"t": hits}, "two": {"t": hits, "u": hits}})
    assert got["one"] == pytest.approx([100 * x for x in stats.proportion_ci(7, 20)])
    assert got["two"][0] < 35.0 < got["two"][1] and got["two"] != got["one"]  # bootstrap over both tasks


def test_compare_merges_items_recomputes_tests_and_warns_on_different_orders(tmp_path):
    def saved(run: str, hits: int, order: str) -> Path:
        path = tmp_path / f"{run}.json"
        path.write_text(json.dumps({"tasks": ["t"], "scores": {run: {"t": 100 * hits / 20}},
                                    "items": {run: {"t": {str(i): float(i < hits) for i in range(20)}}},
                                    "runs": {run: {"preset": "sd", "order_sha256": order * 64} if order else {}}}))
        return path

    result = CliRunner().invoke(main, ["compare", str(saved("base", 4, "")), str(saved("sd", 14, "a")),
                                       str(saved("star", 15, "b")), "--out", str(tmp_path / "c")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines() == ["warning: these runs were trained on different data orders "
                                          "(sd aaaaaaaa, star bbbbbbbb); their differences mix method and data"]
    table = (tmp_path / "c" / "table.md").read_text()
    # sd wins 10 items and loses none against base: exact McNemar p = 2 / 2^10
    assert "| sd | base | t | +50.0 ↑ | " in table and f"| {2 / 2 ** 10:.3g} | exact McNemar | 20 |" in table
    assert "| sd | 70.0 [" in table and " ↑ |" in table.splitlines()[3]
