"""--report-to: a real `unisd train` run read back with each tracker's own reader; bad choices fail first."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from unisd.cli import main
from unisd.config import ConfigError
from unisd.tracking import parse


def test_report_to_parses_names_and_none():
    assert parse("none") == ()
    assert parse("") == ()
    assert parse("tensorboard, trackio,tensorboard") == ("tensorboard", "trackio")


def test_an_unknown_tracker_is_refused():
    with pytest.raises(ConfigError, match="--report-to neptune: unknown tracker"):
        parse("neptune")


@pytest.mark.parametrize("command", ["train", "ablate"])
def test_a_missing_extra_is_one_line_naming_it(command, tmp_path, tiny_model, tiny_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib then reports the library as absent
    args = [command, "--model", str(tiny_model), "--data", str(tiny_data), "--out", str(tmp_path / "run"),
            "--report-to", "tensorboard,wandb"]
    if command == "ablate":
        args += ["--eval-tasks", "unisd_cose"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2
    assert result.output == "error: --report-to wandb needs its library: pip install 'unisd[wandb]'\n"
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model):
    """One 2-step `unisd train` subprocess reporting to tensorboard, trackio and a local mlflow store."""
    root = tmp_path_factory.mktemp("tracked")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n"
                            for i in range(4)))
    out = root / "run-a"
    env = {**os.environ, "TRACKIO_DIR": str(root / "trackio"), "MLFLOW_TRACKING_URI": (root / "mlruns").as_uri(),
           "MLFLOW_ALLOW_FILE_STORE": "true", "MLFLOW_EXPERIMENT_NAME": "unisd-test", "TRACKIO_PROJECT": "unisd-test"}
    subprocess.run([sys.executable, "-m", "unisd", "train", "--model", str(tiny_model), "--data", str(data),
                    "--out", str(out), "--max-steps", "2", "--batch-size", "2", "--max-new-tokens", "4",
                    "--report-to", "tensorboard,trackio,mlflow"], env=env, check=True, capture_output=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    return root, out, env, rows


def test_tensorboard_event_files_hold_every_metric_and_the_config(tracked_run, tiny_model):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, rows = tracked_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    for key in ("loss", "grad_norm", "lr", "step_time_s"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    [config] = events.Tensors("config/text_summary")
    assert json.loads(config.tensor_proto.string_val[0].decode())["model"] == str(tiny_model)


def test_trackio_project_holds_every_metric_and_the_config(tracked_run, tiny_model):
    _, out, env, rows = tracked_run
    read = ("import json; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps([S.get_logs('unisd-test', {out.name!r}), S.get_run_config('unisd-test', {out.name!r})]))")
    logs, config = json.loads(subprocess.run([sys.executable, "-c", read], env=env, check=True,
                                             capture_output=True, text=True).stdout.splitlines()[-1])
    assert [(log["step"], log["loss"], log["lr"]) for log in logs] == [(r["step"], r["loss"], r["lr"]) for r in rows]
    assert config["model"] == str(tiny_model) and config["max_steps"] == 2


def test_mlflow_run_holds_every_metric_and_the_flat_config(tracked_run, tiny_model, monkeypatch):
    from mlflow.tracking import MlflowClient

    root, out, env, rows = tracked_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    [run] = client.search_runs([client.get_experiment_by_name("unisd-test").experiment_id])
    assert run.info.run_name == out.name
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in rows]
    assert run.data.params["model"] == str(tiny_model) and run.data.params["max_steps"] == "2"
