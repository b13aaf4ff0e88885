"""Under --lora the frozen initial teacher (the student with its adapter off) computes without dropout."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from unisd import config as cfg
from unisd import train as tr
from unisd.sequences import pack


def _dropout_model(tiny_model: Path, folder: Path) -> Path:
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.3}))
    return folder


def test_the_initial_teacher_is_deterministic_and_the_student_still_trains_with_dropout(tiny_model, tiny_data,
                                                                                         tmp_path):
    model = _dropout_model(tiny_model, tmp_path / "dropout")
    config = cfg.resolve("", (), {}, model=str(model), data=str(tiny_data), out=str(tmp_path / "run"), lora=True)
    policy = tr.prepare(config, echo=lambda m: None).policy
    packed = pack([[5, 6, 7, 8, 9], [10, 11]], torch.randint(3, 100, (2, 6)), torch.ones(2, 6), 0)
    inputs = {"input_ids": packed.ids, "attention_mask": packed.attention, "position_ids": packed.positions}

    with torch.no_grad():
        teacher = [policy.initial.hidden(**inputs) for _ in range(2)]
        student = [policy.student.hidden(**inputs) for _ in range(2)]
    torch.testing.assert_close(teacher[0], teacher[1], rtol=0, atol=0)
    assert not torch.allclose(student[0], student[1])  # the student's forward keeps its dropout
    assert policy.model.training
