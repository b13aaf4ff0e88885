"""Crashes and faults: exact resume after SIGKILL, corrupted checkpoints, SIGTERM, NaN steps, failing plugins."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unisd import checkpoint
from unisd import config as cfg
from unisd.plugin import Plugin, PluginInfo
from unisd.train import TrainError, prepare, train


def _args(model: Path, data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unisd", "train", "--model", str(model), "--data", str(data), "--out", str(out),
            "--max-steps", str(steps), "--batch-size", "2", "--max-new-tokens", "6", "--lr", "1e-3",
            "--save-every", "1", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _kill_after(args: list[str], metrics: Path, steps_done: int) -> None:
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while _lines(metrics) < steps_done and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("extra", [[], ["--lora"], ["--plugins", "ema,agree,clip", "-o", "ema.every=1",
                                                   "-o", "agree.contexts=random", "-o", "clip.max=0.5"]],
                         ids=["full", "lora", "plugins"])
def test_sigkill_then_resume_is_bitwise_equal(tiny_model, tiny_data, tmp_path, extra):
    steps = 4
    reference = tmp_path / "reference"
    subprocess.run(_args(tiny_model, tiny_data, reference, steps, *extra), env=_env(), check=True,
                   capture_output=True)
    killed = tmp_path / "killed"
    at = random.Random(len(extra)).randint(1, steps - 2)  # a random step whose checkpoint is surely written
    _kill_after(_args(tiny_model, tiny_data, killed, steps, *extra), killed / "metrics.jsonl", at + 1)
    assert not (killed / "unisd.json").exists()  # it really died before the end
    done = subprocess.run(_args(tiny_model, tiny_data, killed, steps, *extra, "--resume"), env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed at step" in done.stderr
    a, b = load_file(str(reference / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ref_metrics = [json.loads(x)["loss"] for x in (reference / "metrics.jsonl").read_text().splitlines()]
    got_metrics = [json.loads(x)["loss"] for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert got_metrics == ref_metrics


def _config(model: Path, data: Path, out: Path, **kw) -> cfg.TrainConfig:
    plugins = tuple(kw.pop("plugins", ()))
    settings = dict(max_steps=3, batch_size=2, max_new_tokens=6, lr=1e-3, save_every=1, keep_checkpoints=5)
    settings.update(kw)
    return cfg.resolve("", plugins, {}, model=str(model), data=str(data), out=str(out), **settings)


def test_corrupted_newest_checkpoint_falls_back_to_the_previous(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model, tiny_data, out), echo=lambda m: None)
    newest = out / "checkpoints" / "step-000003"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated on disk
    (out / "unisd.json").unlink()  # pretend the run died before finishing
    messages: list[str] = []
    train(_config(tiny_model, tiny_data, out, max_steps=4), resume=True, echo=messages.append, extend=True)
    assert any("skipping checkpoint step-000003" in m and "checksum" in m for m in messages)
    assert "resumed at step 2 of 4" in messages
    assert checkpoint.verify(out / "checkpoints" / "step-000004") == ""
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_unfinished_or_damaged_checkpoints_are_detected(tmp_path):
    assert checkpoint.verify(Path("/nonexistent-checkpoint")) == "no manifest (it was not finished)"
    (tmp_path / checkpoint.MANIFEST).write_text("{cut sho")
    assert checkpoint.verify(tmp_path) == "unreadable manifest"
    (tmp_path / checkpoint.MANIFEST).write_text(json.dumps({"state.pt": "0" * 64}))
    assert checkpoint.verify(tmp_path) == "state.pt is missing"


class Terminates(Plugin):
    """Sends this process SIGTERM after the first step, as a scheduler's preemption would."""

    def after_step(self, run):
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_in_process_stops_after_the_step_with_a_checkpoint(tiny_model, tiny_data, tmp_path, monkeypatch):
    _with(monkeypatch, "terminates", Terminates)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"^stopped by SIGTERM at step 1; resume with --resume$"):
        train(_config(tiny_model, tiny_data, out, plugins=("terminates",), save_every=0), echo=lambda m: None)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000001"]
    assert checkpoint.verify(out / "checkpoints" / "step-000001") == ""
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handler is gone again


def test_sigterm_leaves_a_resumable_checkpoint(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    args = _args(tiny_model, tiny_data, out, 50)
    args[args.index("--save-every") + 1] = "0"
    proc = subprocess.Popen(args, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while _lines(out / "metrics.jsonl") < 1 and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "stopped by SIGTERM" in err and "--resume" in err
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert saved and checkpoint.verify(saved[-1]) == ""
    assert not (out / "unisd.json").exists()


class NaNAt(Plugin):
    """Makes the loss non-finite on chosen steps."""

    bad_steps: set[int] = set()
    seen = 0

    def token_loss(self, D, out):
        NaNAt.seen += 1
        return D * float("nan") if NaNAt.seen in NaNAt.bad_steps else D


class NaNGradAt(NaNAt):
    """A finite loss whose gradient is not: d/dx sqrt(|0 * x|) at 0 is inf * 0."""

    def token_loss(self, D, out):
        NaNAt.seen += 1
        return D + (D * 0).abs().sqrt() if NaNAt.seen in NaNAt.bad_steps else D


class Explodes(Plugin):
    def weights(self, out):
        raise RuntimeError("boom")


def _with(monkeypatch, name: str, cls: type[Plugin]) -> None:
    monkeypatch.setattr("unisd.plugin.discover", lambda: {name: PluginInfo(name, "tests", "0", cls)})


@pytest.mark.parametrize("plugin", [NaNAt, NaNGradAt])
def test_non_finite_step_is_skipped_and_logged(tiny_model, tiny_data, tmp_path, monkeypatch, plugin):
    _with(monkeypatch, "nan", plugin)
    NaNAt.bad_steps, NaNAt.seen = {2}, 0
    messages: list[str] = []
    out = train(_config(tiny_model, tiny_data, tmp_path / "run", plugins=("nan",)), echo=messages.append)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped"] for m in metrics] == [False, True, False]
    assert (metrics[1]["loss"] == metrics[1]["loss"]) is (plugin is NaNGradAt)  # NaNGradAt: only the gradient
    assert any("step 2: non-finite" in m for m in messages)
    # the skipped step changed no weight
    a = load_file(str(out / "checkpoints" / "step-000001" / "trainable.safetensors"))
    b = load_file(str(out / "checkpoints" / "step-000002" / "trainable.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_many_non_finite_steps_stop_the_run(tiny_model, tiny_data, tmp_path, monkeypatch):
    _with(monkeypatch, "nan", NaNAt)
    NaNAt.bad_steps, NaNAt.seen = {2, 3, 4}, 0
    out = tmp_path / "run"
    with pytest.raises(TrainError, match="3 non-finite steps in a row"):
        train(_config(tiny_model, tiny_data, out, plugins=("nan",), max_steps=6, max_bad_steps=3),
              echo=lambda m: None)
    good = load_file(str(out / "checkpoints" / "step-000001" / "trainable.safetensors"))
    last = load_file(str(sorted((out / "checkpoints").glob("step-*"))[-1] / "trainable.safetensors"))
    assert all(torch.equal(good[k], last[k]) for k in good)
    assert not (out / "unisd.json").exists()


def test_failing_plugin_is_named_and_the_run_saves(tiny_model, tiny_data, tmp_path, monkeypatch):
    _with(monkeypatch, "explodes", Explodes)
    out = tmp_path / "run"
    with pytest.raises(TrainError, match=r"plugin 'explodes' failed in weights: RuntimeError: boom \(checkpoint step-000000"):
        train(_config(tiny_model, tiny_data, out, plugins=("explodes",)), echo=lambda m: None)
    assert checkpoint.verify(out / "checkpoints" / "step-000000") == ""


# ------------------------------------------------------------------------------------------------
# --resume refuses a different run; writing errors; data encodings; exclusive hooks
# ------------------------------------------------------------------------------------------------

def _unfinished(tiny_model: Path, tiny_data: Path, out: Path, **kw) -> None:
    """A run of 2 steps whose final model is gone, as if it had been killed after its last checkpoint."""
    train(_config(tiny_model, tiny_data, out, max_steps=2, **kw), echo=lambda m: None)
    (out / "unisd.json").unlink()


def test_resume_refuses_changed_settings_with_a_one_line_diff(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    _unfinished(tiny_model, tiny_data, out, plugins=("clip",))
    changed = cfg.resolve("", ("clip",), {"clip": {"max": "3"}}, model=str(tiny_model), data=str(tiny_data),
                          out=str(out), max_steps=2, batch_size=2, max_new_tokens=6, lr=2e-3, save_every=1)
    with pytest.raises(checkpoint.OutputDirError) as refused:
        train(changed, resume=True, echo=lambda m: None)
    message = str(refused.value)
    assert "\n" not in message
    assert "lr: 0.001 -> 0.002" in message
    assert "plugins.clip.options.max: 10.0 -> 3.0" in message  # the resolved option, not only the flag
    assert "settings.options" not in message and "\noptions" not in message  # the typed value only, once
    assert "batch_size" not in message and "max_new_tokens" not in message  # unchanged settings are not listed
    assert not (out / "unisd.json").exists()


def test_resume_refuses_other_data_and_plugins(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    _unfinished(tiny_model, tiny_data, out)
    other = tmp_path / "other.jsonl"
    other.write_text(tiny_data.read_text().replace("blue", "azure"))
    with pytest.raises(checkpoint.OutputDirError, match=r"data fingerprint: [0-9a-f]{64} -> [0-9a-f]{64}"):
        train(_config(tiny_model, other, out, max_steps=2), resume=True, echo=lambda m: None)
    with pytest.raises(checkpoint.OutputDirError, match=r"plugins\.clip\.options\.max: \(none\) -> 10\.0"):
        train(_config(tiny_model, tiny_data, out, max_steps=2, plugins=("clip",)), resume=True, echo=lambda m: None)


def test_more_steps_need_extend(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    _unfinished(tiny_model, tiny_data, out)
    with pytest.raises(checkpoint.OutputDirError, match=r"total_steps: 2 -> 3 \(--extend accepts more steps\)"):
        train(_config(tiny_model, tiny_data, out, max_steps=3), resume=True, echo=lambda m: None)
    with pytest.raises(checkpoint.OutputDirError, match="total_steps: 2 -> 1"):  # fewer steps: never
        train(_config(tiny_model, tiny_data, out, max_steps=1), resume=True, echo=lambda m: None, extend=True)
    messages: list[str] = []
    # operational settings (how often to save, how many to keep) may change freely
    train(_config(tiny_model, tiny_data, out, max_steps=3, save_every=2, keep_checkpoints=3), resume=True,
          echo=messages.append, extend=True)
    assert "resumed at step 2 of 3" in messages
    assert json.loads((out / "unisd.json").read_text())["steps"] == 3


def test_resume_check_names_each_changed_leaf(tmp_path):
    stored = {"settings": {"lr": 0.1, "gone": 1, "was_none": None}, "plugins": {}, "data": "x", "total_steps": 2,
              "world_size": 1}
    current = {"settings": {"lr": 0.2, "new": 3, "now_none": None}, "plugins": {}, "data": "y", "total_steps": 2,
               "world_size": 1}
    assert checkpoint.changes(stored, current) == ["data fingerprint: x -> y", "gone: 1 -> (none)", "lr: 0.1 -> 0.2",
                                                    "new: (none) -> 3", "now_none: (none) -> None",
                                                    "was_none: None -> (none)"]
    folder = tmp_path / "run" / "checkpoints" / "step-000002"
    config = cfg.resolve("", (), {}, model="m", data="d.jsonl", out="o").to_json()
    defaults = {k: v for k, v in config.items() if k not in checkpoint.NOT_IDENTITY}
    with pytest.raises(checkpoint.OutputDirError) as refused:
        # a setting the checkpoint does not record (added to unisd later) counts as its default
        older = {k: v for k, v in defaults.items() if k != "mask_truncated"}
        checkpoint.check_same_run(folder, {**stored, "settings": {**older, "lr": 0.1}},
                                  {**current, "settings": {**defaults, "lr": 0.2}}, extend=False)
    assert str(refused.value) == (f"--resume: this is not the run in {tmp_path / 'run'}: data fingerprint: x -> y; "
                                  "lr: 0.1 -> 0.2; resume with the same settings, or start again with --overwrite")
    with pytest.raises(checkpoint.OutputDirError) as old:
        checkpoint.check_same_run(folder, None, current, extend=False)
    assert str(old.value) == (f"{folder} records no run configuration (written by an older unisd); "
                              "start again with --overwrite")


def test_only_the_newest_checkpoints_are_kept(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model, tiny_data, out, max_steps=3, keep_checkpoints=2), echo=lambda m: None)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002", "step-000003"]


def test_resume_without_a_checkpoint_starts_from_the_beginning(tiny_model, tiny_data, tmp_path):
    said: list[str] = []
    assert checkpoint.restore(prepare(_config(tiny_model, tiny_data, tmp_path / "run")), said.append, extend=False) is False
    assert said == ["no intact checkpoint found; starting from the beginning"]


def test_checkpoint_without_a_selected_plugins_state_is_an_error(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    _unfinished(tiny_model, tiny_data, out, plugins=("clip",))
    for folder in (out / "checkpoints").glob("step-*"):  # a checkpoint whose plugin state was lost
        state = torch.load(folder / "state.pt", weights_only=False)
        del state["plugins"]["clip"]
        torch.save(state, folder / "state.pt")
        manifest = json.loads((folder / checkpoint.MANIFEST).read_text())
        manifest["state.pt"] = checkpoint._sha256(folder / "state.pt")
        (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(checkpoint.OutputDirError, match="holds no state for plugin clip; resume with the plugins it "
                                                        "was written with, or --overwrite"):
        train(_config(tiny_model, tiny_data, out, max_steps=2, plugins=("clip",)), resume=True, echo=lambda m: None)


def test_a_save_killed_before_it_lands_is_cleaned_up_by_the_next_resume(tiny_model, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _unfinished(tiny_model, tiny_data, out)

    rename = os.rename

    def killed(src, dst):
        if Path(dst).parent != out / "checkpoints":  # datasets renames its own cache files while reading the data
            return rename(src, dst)
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(os, "rename", killed)  # the first checkpoint rename is step 3's finished checkpoint landing
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_model, tiny_data, out, max_steps=3), resume=True, extend=True, echo=lambda m: None)
    monkeypatch.undo()
    root = out / "checkpoints"
    assert [p.name[:17] for p in root.glob(".*")] == [".tmp-step-000003-"]
    (root / ".discard-step-000001").mkdir()  # and a deletion cut short
    messages: list[str] = []
    train(_config(tiny_model, tiny_data, out, max_steps=3), resume=True, extend=True, echo=messages.append)
    assert "resumed at step 2 of 3" in messages
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000002", "step-000003"]


def test_disk_full_while_saving_is_one_line_and_leaves_no_partial_checkpoint(tiny_model, tiny_data, tmp_path,
                                                                             monkeypatch):
    import errno

    from click.testing import CliRunner

    from unisd.cli import main

    def full(tensors, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(checkpoint, "save_file", full)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(out),
                                       "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith(("Loading", "warning:", "step "))]
    assert lines == [f"error: cannot write checkpoint {out / 'checkpoints' / 'step-000001'}: the disk is full; "
                     "free some space or choose another --out"], result.output
    assert "Traceback" not in result.output
    assert list((out / "checkpoints").iterdir()) == []  # the temporary folder went with the error
    assert not (out / "unisd.json").exists()


def test_bom_and_crlf_files_read_like_plain_ones(tmp_path, tiny_data):
    from unisd.data import load_jsonl

    text = tiny_data.read_text()
    odd = tmp_path / "windows.jsonl"
    odd.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert load_jsonl(odd) == load_jsonl(tiny_data)
    assert len(load_jsonl(odd)) == len(text.splitlines())


class Teaches(Plugin):
    def teacher(self, run):
        return None


class TeachesSometimes(Plugin):
    composes = ("teacher",)

    def teacher(self, run):
        return None


class Samples(Plugin):
    def completions(self, batch, run):
        return None


def test_two_providers_of_an_exclusive_hook_are_refused_at_load_time():
    from unisd.hooks import Hooks
    from unisd.plugin import PluginError, load

    found = {n: PluginInfo(n, "tests", "0", cls) for n, cls in
             [("a", Teaches), ("b", Teaches), ("c", TeachesSometimes), ("s", Samples), ("t", Samples)]}
    with pytest.raises(PluginError, match="plugins 'a' and 'b' both provide the teacher hook"):
        Hooks(load(["a", "b"], {}, found))
    with pytest.raises(PluginError, match="plugins 's' and 't' both provide the completions hook"):
        Hooks(load(["s", "a", "t"], {}, found))
    assert [p.name for p in Hooks(load(["a", "c", "s"], {}, found)).plugins] == ["a", "c", "s"]  # c composes


def test_resume_extend_lengthens_a_finished_run(tiny_model, tiny_data, tmp_path):
    out = tmp_path / "run"
    train(_config(tiny_model, tiny_data, out, max_steps=2, save_every=0), echo=lambda m: None)
    with pytest.raises(checkpoint.OutputDirError, match="holds a finished run; .* or --resume --extend"):
        train(_config(tiny_model, tiny_data, out, max_steps=3, save_every=0), resume=True, echo=lambda m: None)
    messages: list[str] = []
    train(_config(tiny_model, tiny_data, out, max_steps=3, save_every=0), resume=True, extend=True,
          echo=messages.append)
    assert "resumed at step 2 of 3" in messages
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert json.loads((out / "unisd.json").read_text())["steps"] == 3
