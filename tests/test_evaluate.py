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
from unisd import models, report
from unisd.cli import main
from unisd.train import train

ROWS = [{"prompt": "Which animal barks? A. cat B. dog", "answer": "B", "rationale": "dogs bark",
         "question": "Which animal barks?", "choices": ["cat", "dog"], "label": 1},
        {"prompt": "Where do fish live? A. water B. trees", "answer": "A", "rationale": "fish need water",
         "question": "Where do fish live?", "choices": ["water", "trees"], "label": 0},
        {"prompt": "What is two plus two? A. 4 B. 5", "answer": "A", "rationale": "2+2=4",
         "question": "What is two plus two?", "choices": ["4", "5"], "label": 0}]


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: tiny_mc\n{data}output_type: multiple_choice\ndoc_to_text: \"Question: {{{{question}}}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    (folder / "gen.yaml").write_text(
        f"task: tiny_gen\n{data}output_type: generate_until\ndoc_to_text: \"{{{{prompt}}}}\"\ndoc_to_target: \"{{{{answer}}}}\"\n"
        "generation_kwargs:\n  until: [\"<|im_end|>\"]\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n")
    return folder


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
                                       two_checkpoints["base"]])
    assert result.exit_code == 0, result.output
    combined = json.loads((out / "results.json").read_text())
    for name, path in two_checkpoints.items():
        direct = ev.run_lm_eval(path, ["tiny_mc", "tiny_gen"], None, [str(tiny_tasks)], 4)
        assert combined["scores"][name]["tiny_mc"] == pytest.approx(100 * direct["results"]["tiny_mc"]["acc,none"])
        assert combined["scores"][name]["tiny_gen"] == pytest.approx(
            100 * direct["results"]["tiny_gen"]["exact_match,none"])
        per_model = json.loads((out / name / "results.json").read_text())
        assert per_model["results"]["tiny_mc"]["acc,none"] == direct["results"]["tiny_mc"]["acc,none"]
        for task in ("tiny_gen",):
            r = combined["retention"][name][task]
            assert r["ppl_ret"] > 1.0 and r["ppl_fit"] > 1.0
    table = (out / "table.md").read_text()
    assert table.splitlines()[0] == "| run | tiny_mc | tiny_gen | Overall |"
    mean = (combined["scores"]["sd"]["tiny_mc"] + combined["scores"]["sd"]["tiny_gen"]) / 2
    assert f"| sd | {combined['scores']['sd']['tiny_mc']:.1f} | {combined['scores']['sd']['tiny_gen']:.1f} | {mean:.1f} |" in table
    assert "PPL_ret" in table
    image = matplotlib.image.imread(out / "scores.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
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
    total, count = 0.0, 0
    with torch.no_grad():
        for c, y in zip(contexts, completions):
            ctx = tok(c, add_special_tokens=False)["input_ids"]
            cont = tok(y, add_special_tokens=False)["input_ids"]
            loss = model(input_ids=torch.tensor([ctx + cont]), labels=torch.tensor([[-100] * len(ctx) + cont])).loss
            total += float(loss) * len(cont)
            count += len(cont)
    assert got == pytest.approx(math.exp(total / count), rel=1e-5)


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
