"""The demo end to end on the tiny model (the real one runs in `tox -e demo`)."""
from __future__ import annotations

import json

import matplotlib.image

from unisd import demo


def test_demo_writes_model_metrics_table_and_charts(tiny_model, tmp_path):
    messages: list[str] = []
    paths = demo.run(tmp_path / "demo", steps=1, eval_limit=2, humaneval_limit=1, batch_size=2,
                     echo=messages.append, model=str(tiny_model))
    assert set(paths) == {"model", "metrics", "curves", "table", "chart"}
    for path in paths.values():
        assert path.exists(), path
    assert (paths["model"] / "model.safetensors").is_file() and (paths["model"] / "unisd.json").is_file()
    assert json.loads(paths["metrics"].read_text().splitlines()[0])["step"] == 1
    table = paths["table"].read_text().splitlines()
    assert table[0] == "| run | Demo | HumanEval | Overall |"
    assert [row.split("|")[1].strip() for row in table[2:]] == ["base", "unisd-star"]
    for png in (paths["chart"], paths["curves"]):
        assert matplotlib.image.imread(png).ndim == 3
    assert any("lm_eval --model hf --model_args pretrained=" in m for m in messages)
