"""What --resume is for: a line torn by a kill is repaired, a full disk stops with one line and resumes after."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors import SafetensorError

from unisd import checkpoint
from unisd.cli import main

SAFETENSORS_FULL = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                    'message: "No space left on device" })')
TORCH_FULL = ("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
              "PytorchStreamWriter failed writing file data/0: file write failed")


def rows(*steps: int) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.5}) + "\n" for s in steps)


def test_a_torn_last_line_is_dropped_with_the_steps_to_run_again(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(rows(1, 2, 3) + '{"step": 4, "lo')
    checkpoint.truncate_metrics(path, 2)
    assert path.read_text() == rows(1, 2)
    path.write_bytes(rows(1).encode() + '{"step": 2, "prompt": "caf\u00e9"}'.encode()[:-4])  # cut inside "é"
    checkpoint.truncate_metrics(path, 2)
    assert path.read_text() == rows(1)


def test_a_damaged_line_before_the_last_is_named(tmp_path):
    path = tmp_path / "samples.jsonl"
    path.write_text(rows(1) + "garbage\n" + rows(2))
    with pytest.raises(checkpoint.OutputDirError, match=rf"^{path}:2: not a JSON object with a step; repair or delete"):
        checkpoint.truncate_metrics(path, 2)
    assert path.read_text() == rows(1) + "garbage\n" + rows(2)  # untouched


def train(model: Path, data: Path, out: Path, steps: int, *extra: str):
    return CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(data), "--out", str(out),
                                     "--max-steps", str(steps), "--batch-size", "2", "--max-new-tokens", "4",
                                     "--save-every", "1", "--log-samples", "1", *extra])


def test_resume_after_a_kill_mid_write_repairs_metrics_and_samples(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    assert train(tiny_model, tiny_data, out, 2).exit_code == 0
    (out / "unisd.json").unlink()  # killed after step 2's checkpoint, while writing its lines
    for name in ("metrics.jsonl", "samples.jsonl"):
        with (out / name).open("a") as f:
            f.write('{"step": 3, "loss": 0.')
    result = train(tiny_model, tiny_data, out, 3, "--resume", "--extend")
    assert result.exit_code == 0, result.output
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert {json.loads(ln)["step"] for ln in (out / "samples.jsonl").read_text().splitlines()} == {1, 2, 3}


@pytest.mark.parametrize("writer", ["safetensors", "torch"])
def test_a_full_disk_at_a_checkpoint_is_one_line_and_resume_continues_once_space_is_freed(
        tiny_model, tiny_data, tmp_path, monkeypatch, writer):
    out = tmp_path / "run"
    save_file, save = checkpoint.save_file, torch.save
    calls = {"n": 0}

    def full_on_the_second_checkpoint(real, error):
        def write(obj, where, *args, **kwargs):
            calls["n"] += "trainable" in str(where) or str(where).endswith("optimizer.pt")
            if calls["n"] >= 2:
                Path(where).write_bytes(b"half")
                raise error
            return real(obj, where, *args, **kwargs)
        return write

    if writer == "safetensors":
        monkeypatch.setattr(checkpoint, "save_file", full_on_the_second_checkpoint(save_file,
                                                                                   SafetensorError(SAFETENSORS_FULL)))
    else:
        monkeypatch.setattr(torch, "save", full_on_the_second_checkpoint(save, RuntimeError(TORCH_FULL)))
    result = train(tiny_model, tiny_data, out, 3)
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("Loading", "warning:", "step "))]
    assert result.exit_code == 2 and lines == [
        f"error: cannot write checkpoint {out / 'checkpoints' / 'step-000002'}: the disk is full; the earlier "
        "checkpoints are intact (newest: step-000001): free some space, then the same command with --resume "
        "continues from it"], result.output
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000001"]  # nothing half-written
    monkeypatch.undo()  # space freed
    resumed = train(tiny_model, tiny_data, out, 3, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at step 1 of 3" in resumed.output and (out / "unisd.json").is_file()


def test_a_full_disk_while_writing_the_final_model_names_the_checkpoint_to_resume_from(tiny_model, tiny_data, tmp_path,
                                                                                      monkeypatch):
    from unisd import models

    def full(*args, **kwargs):
        raise SafetensorError(SAFETENSORS_FULL)

    monkeypatch.setattr(models, "save_final", full)
    out = tmp_path / "run"
    result = train(tiny_model, tiny_data, out, 1)
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("Loading", "warning:", "step "))]
    assert result.exit_code == 2 and lines == [
        f"error: cannot write the final model into {out}: the disk is full; the earlier checkpoints are intact "
        "(newest: step-000001): free some space, then the same command with --resume continues from it"], result.output
    assert not list(out.glob(".final-*")) and not (out / "unisd.json").exists()
    monkeypatch.undo()
    resumed = train(tiny_model, tiny_data, out, 1, "--resume")
    assert resumed.exit_code == 0 and (out / "unisd.json").is_file(), resumed.output
