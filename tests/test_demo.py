"""The demo task, its scorer and the demo end to end on the tiny model (the real one runs in `unisd demo`)."""
from __future__ import annotations

import json
import re
from collections import Counter

import matplotlib.image

from unisd import config as cfg
from unisd import demo
from unisd.data import benchmarks, scoring
from unisd.data import demo as demo_data


def test_demo_splits_are_disjoint_seeded_and_no_constant_answer_beats_chance():
    train, test = demo_data.rows("train"), demo_data.rows("test")
    assert (len(train), len(test)) == (demo_data.SIZES["train"], demo_data.SIZES["test"])
    assert not {r["question"] for r in train} & {r["question"] for r in test}
    assert demo_data.rows("test") == test  # seeded: the same rows every time
    top = Counter(r["answer"] for r in test).most_common(1)[0][1]
    assert top / len(test) < 0.05  # always giving one number scores under 5%


def test_demo_rationale_is_the_worked_sum_and_the_answer_is_its_result():
    for r in demo_data.rows("test")[:50]:
        a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", r["question"]).groups())
        assert r["answer"] == str(a + b)
        assert r["rationale"].endswith(f"So {a} + {b} = {a + b}.")
    assert demo_data.rationale(47, 38) == ("Ones: 7 + 8 = 15, write 5 and carry 1. Tens: 4 + 3 + 1 = 8. "
                                           "So 47 + 38 = 85.")


def test_demo_scorer_reads_the_answer_line_else_the_last_number():
    example = benchmarks.load("demo", "test")[0]
    gold = example.answer
    assert scoring.score(f"Tens: 1 + 2 = 3.\nAnswer: {gold}", example.meta) == {"acc": 1.0}
    assert scoring.score(f"Answer: {gold}\nAnswer: {int(gold) + 1}", example.meta) == {"acc": 0.0}
    assert scoring.score(f"The sum is {gold}.", example.meta) == {"acc": 1.0}
    assert scoring.score(f"{gold} is close; the sum is {int(gold) - 1}", example.meta) == {"acc": 0.0}
    assert scoring.score("I cannot add.", example.meta) == {"acc": 0.0}
    assert scoring.extract_number("Answer: 1,234.") == "1234"


def _paired(diff, low, high, p):
    return {"unisd_demo": {"difference": diff, "ci95": [low, high], "p_value": p, "n": 200, "test": "exact McNemar"}}


def test_scale_finding_is_one_line_that_cites_its_sources():
    line = demo.SCALE_FINDING
    assert "\n" not in line and "1B" in line
    assert "2601.19897, Figure 5" in line and "2601.18734" in line  # SDFT behind SFT at 3B; OPSD at 1.7B-8B


def test_verdict_claims_only_what_the_intervals_allow():
    combined = {"paired": {"sft": {"base": _paired(12.0, 5.5, 18.5, 0.001)},
                           "unisd-star": {"base": _paired(3.0, -2.0, 8.0, 0.25), "sft": _paired(-9.0, -16.0, -2.0, 0.01)}}}
    sentence = demo.verdict(combined)
    assert sentence.startswith("sft vs base: +12.0 points [+5.5, +18.5], p=0.001; unisd-star vs base: +3.0 points "
                               "[-2.0, +8.0], p=0.25; unisd-star vs sft: -9.0 points [-16.0, -2.0], p=0.01: ")
    assert "the interval excludes 0 for sft vs base, unisd-star vs sft; unisd-star vs base cannot be told" in sentence
    none = demo.verdict({"paired": {"sft": {"base": _paired(1.0, -4.0, 6.0, 0.7)}}})
    assert "no difference is distinguishable from 0" in none and "excludes" not in none


def test_the_last_line_reads_the_result_beside_the_scale_finding():
    gain, none, loss = _paired(20.0, 14.0, 26.5, 1e-6)["unisd_demo"], _paired(1.0, -4.0, 6.0, 0.7)["unisd_demo"], \
        _paired(-9.0, -16.0, -2.0, 0.01)["unisd_demo"]

    def read(over_base, over_sft=None):
        against = {"base": {"unisd_demo": over_base}} | ({"sft": {"unisd_demo": over_sft}} if over_sft else {})
        return demo.meaning({"paired": {"unisd-star": against}})

    assert "gained nothing measurable" in read(none) and "gained nothing measurable" in read(loss)
    assert "cannot be told from SFT" in read(gain, none)
    assert "SFT did better" in read(gain, loss)
    assert "beat SFT on this one synthetic task" in read(gain, gain)
    assert "right where it is wrong alone" in read(gain, none)
    assert "gained nothing" in demo.meaning({})  # no test at all claims no gain


def test_demo_trains_both_runs_and_writes_intervals_retention_and_charts(tiny_model, tmp_path):
    messages: list[str] = []
    paths = demo.run(tmp_path / "demo", steps=1, eval_limit=2, batch_size=2, echo=messages.append,
                     model=str(tiny_model))
    for path in paths.values():
        assert path.exists(), path
    for run in ("sft", "unisd-star"):
        saved = json.loads((paths[run] / "unisd.json").read_text())
        assert saved["config"]["preset"] == run and (paths[run] / "model.safetensors").is_file()
        assert saved["config"]["lr"] == demo.LR
    star = json.loads((paths["unisd-star"] / "unisd.json").read_text())["config"]
    paper = cfg.PRESETS["unisd-star"]
    assert star["lora"] and not json.loads((paths["sft"] / "unisd.json").read_text())["config"]["lora"]
    assert {key: star[key] for key in paper.settings} == dict(paper.settings)  # the paper's values, not SDFT's
    assert star["options"]["ema"] == {k: v for k, v in paper.options["ema"].items()}
    assert json.loads(paths["metrics"].read_text().splitlines()[0])["step"] == 1
    table = paths["table"].read_text()
    rows = table.splitlines()
    assert rows[0] == "| run | Demo | Overall |"
    assert [row.split("|")[1].strip() for row in rows[2:rows.index("")]] == ["base", "sft", "unisd-star"]
    assert re.search(r"\| base \| \d+\.\d \[\d+\.\d, \d+\.\d\]", rows[2]) and "Retention" in table and "Paired differences" in table
    results = json.loads(paths["results"].read_text())
    assert set(results["paired"]) == {"sft", "unisd-star"} and "sft" in results["paired"]["unisd-star"]
    assert set(results["retention"]) == {"base", "sft", "unisd-star"}
    assert results["retention_documents"] == demo.RETENTION
    assert f"bootstrap over the first {demo.RETENTION} documents of each task" in table
    for png in (paths["chart"], paths["curves"]):
        assert matplotlib.image.imread(png).ndim == 3
    assert messages[-len(paths) - 5] == demo.verdict(results)
    assert messages[-len(paths) - 4].startswith("What UniSD*'s mechanisms did in this run: ")  # from its metrics
    assert "ema/distance" in messages[-len(paths) - 4] and "clip/rate" in messages[-len(paths) - 4]
    assert messages[-len(paths) - 3] == demo.SCALE_FINDING
    assert messages[-len(paths) - 2] == demo.meaning(results)
