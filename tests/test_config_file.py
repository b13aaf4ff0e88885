"""`--config FILE`: YAML or JSON settings under the flags and over the preset; a run's unisd.json repeats the run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from unisd import config as cfg
from unisd import ablate as ablate_module
from unisd import config_file
from unisd.cli import main


def _write(tmp_path: Path, settings: dict, suffix: str = ".yaml") -> Path:
    path = tmp_path / f"run{suffix}"
    path.write_text(json.dumps(settings) if suffix == ".json" else yaml.safe_dump(settings))
    return path


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_the_file_sits_over_the_preset_and_under_the_flags(tmp_path: Path, suffix: str) -> None:
    path = _write(tmp_path, {"model": "m", "data": "d.jsonl", "out": "runs/x", "preset": "sdft", "plugins": ["clip"],
                             "temperature": 0.9, "batch_size": 8, "lr": 1e-4, "options": {"ema": {"beta": 0.5}}},
                  suffix)
    config = cfg.resolve("", (), {"ema": {"every": "3"}}, config_file.load(path), lr=3e-4, out=None)
    assert (config.model, config.data, config.out, config.preset) == ("m", "d.jsonl", "runs/x", "sdft")
    assert config.plugins == ("ema", "clip")            # the preset's plugins, then the file's
    assert config.skip_first_tokens == 3                 # the preset's, the file says nothing
    assert config.temperature == 0.9                     # the file over the preset's 1.0
    assert (config.batch_size, config.lr) == (8, 3e-4)   # the file over the default; the flag over the file
    assert config.options["ema"] == {"beta": 0.5, "every": "3"}  # preset < file < -o
    assert config.max_new_tokens == cfg.TrainConfig.__dataclass_fields__["max_new_tokens"].default


def test_plugins_may_be_a_comma_separated_string_and_flags_replace_them(tmp_path: Path) -> None:
    file = config_file.load(_write(tmp_path, {"model": "m", "data": "d", "out": "o", "plugins": "ema, clip"}))
    assert cfg.resolve("", (), {}, file).plugins == ("ema", "clip")
    assert cfg.resolve("", ("agree",), {}, file).plugins == ("agree",)
    assert cfg.resolve("sft", (), {}, file).preset == "sft"


def test_keyword_arguments_win_over_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": "m", "data": "d", "out": "o", "max_steps": 3, "seed": 7})
    config = config_file.load_config(path, max_steps=10, plugins=("clip",), options={"clip": {"max": 2.0}})
    assert (config.max_steps, config.seed, config.plugins, config.options) == (10, 7, ("clip",), {"clip": {"max": 2.0}})


@pytest.mark.parametrize("settings, message", [
    ({"batchsize": 4}, "unknown key 'batchsize' (did you mean batch_size?)"),
    ({"zzz": 1}, "unknown key 'zzz' (keys: model, data, out,"),
    ({"batch_size": "4"}, "batch_size: expected an integer, found '4'"),
    ({"batch_size": 2.5}, "batch_size: expected an integer, found 2.5"),
    ({"batch_size": True}, "batch_size: expected an integer, found True"),
    ({"batch_size": 0}, "batch_size: 0 is not in the range x>=1"),
    ({"lr": 0}, "lr: 0.0 is not in the range x>0"),
    ({"lr": "fast"}, "lr: expected a finite number, found 'fast'"),
    ({"top_p": 1.5}, "top_p: 1.5 is not in the range 0<x<=1"),
    ({"divergence": "kl"}, "divergence: 'kl' is not one of"),
    ({"bf16": "yes please"}, "bf16: expected true or false"),
    ({"lora_targets": 3}, "lora_targets: expected a string, found 3"),
    ({"plugins": [1]}, "plugins: expected a list of plugin names"),
    ({"options": {"clip": 5}}, "options: expected a mapping plugin -> option -> value"),
    ({"warmup_ratio": 1.5}, "warmup_ratio: 1.5 is not in the range 0<=x<1"),
])
def test_a_bad_key_or_value_is_one_line_naming_it_and_nothing_is_written(tmp_path: Path, tiny_data: Path,
                                                                         settings: dict, message: str) -> None:
    out = tmp_path / "out"
    path = _write(tmp_path, {"model": "m", "data": str(tiny_data), "out": str(out), **settings})
    result = CliRunner().invoke(main, ["train", "--config", str(path)])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output
    assert not out.exists()


@pytest.mark.parametrize("text, name, message", [
    ("batch_size: [1\n", "run.yaml", "run.yaml: not valid YAML: "),
    ('{"batch_size": }', "run.json", "run.json: not valid JSON: Expecting value at line 1"),
    ("- 1\n- 2\n", "run.yaml", "expected a mapping of settings (key: value), found a list"),
    ("batch_size = 1\n", "run.toml", "expected a .yaml, .yml or .json file"),
])
def test_a_file_that_is_not_a_config_is_one_line(tmp_path: Path, text: str, name: str, message: str) -> None:
    (tmp_path / name).write_text(text)
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / name)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and message in result.output, result.output


def test_model_data_and_out_come_from_a_flag_or_the_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["train", "--config", str(_write(tmp_path, {"model": "m", "data": "d"}))])
    assert result.exit_code == 2
    assert result.output == "error: --out is missing: give it on the command line or in the --config file\n"
    result = CliRunner().invoke(main, ["train", "--data", "d", "--out", "o"])
    assert result.output == "error: --model is missing: give it on the command line or in the --config file\n"
    result = CliRunner().invoke(main, ["train", "--config", str(tmp_path / "nope.yaml")])
    assert result.output == f"error: --config {tmp_path / 'nope.yaml'}: no such file\n"


def test_a_plugin_option_of_the_wrong_type_is_refused_by_the_plugin(tmp_path: Path, tiny_data: Path) -> None:
    path = _write(tmp_path, {"model": "m", "data": str(tiny_data), "out": str(tmp_path / "o"), "plugins": ["ema"],
                             "options": {"ema": {"every": 2.5}}})
    result = CliRunner().invoke(main, ["train", "--config", str(path)])
    assert result.exit_code == 2 and result.output == "error: ema.every=2.5: expected int\n", result.output


def _train(*args: str) -> None:
    result = CliRunner().invoke(main, ["train", *args])
    assert result.exit_code == 0, result.output


def _record(out: Path) -> dict:
    return json.loads((out / "unisd.json").read_text())


def _first_loss(out: Path) -> float:
    return json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["loss"]


@pytest.fixture(scope="module")
def run_a(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("run-a")
    (folder / "train.jsonl").write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)})
                                                + "\n" for i in range(4)))
    _train("--model", str(tiny_model), "--data", str(folder / "train.jsonl"), "--out", str(folder / "a"),
           "--preset", "sdft", "--plugins", "clip", "-o", "clip.max=5", "--max-steps", "1", "--batch-size", "2",
           "--lr", "1e-3", "--seed", "3", "--max-new-tokens", "8")
    return folder / "a"


def test_a_runs_unisd_json_repeats_the_run(run_a: Path, tmp_path: Path) -> None:
    _train("--config", str(run_a / "unisd.json"), "--out", str(tmp_path / "b"))
    a, b = _record(run_a)["config"], _record(tmp_path / "b")["config"]
    assert b == {**a, "out": str(tmp_path / "b")}
    assert (a["preset"], a["plugins"], a["options"]["clip"]) == ("sdft", ["ema", "clip"], {"max": "5"})
    assert _first_loss(tmp_path / "b") == _first_loss(run_a)


def test_flags_win_over_a_runs_unisd_json(run_a: Path, tmp_path: Path) -> None:
    _train("--config", str(run_a / "unisd.json"), "--out", str(tmp_path / "c"), "--lr", "2e-3", "-o", "clip.max=7")
    c = _record(tmp_path / "c")["config"]
    assert (c["lr"], c["options"]["clip"], c["seed"], c["skip_first_tokens"]) == (2e-3, {"max": "7"}, 3, 3)


def test_ablate_takes_a_config_file(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    path = _write(tmp_path, {"model": str(tiny_model), "data": str(tiny_data), "out": str(tmp_path / "abl"),
                             "plugins": ["ema", "clip"], "options": {"clip": {"max": 4.0}}, "max_steps": 2})
    args = ["ablate", "--config", str(path), "--eval-tasks", "unisd_cose", "--max-steps", "5", "-o", "ema.every=2"]
    result = CliRunner().invoke(main, [*args, "--dry-run", "--sec-per-step", "1"])
    assert result.exit_code == 0, result.output
    assert "ema.every=2" in result.output and "clip.max=4.0" in result.output and "3 runs x 5 steps" in result.output
    assert not (tmp_path / "abl").exists()
    seen = {}

    def planned(model, data, out, plugins, combos, grid, baselines, overrides, *args, **settings):
        seen.update(model=model, out=out, plugins=plugins, overrides=overrides, settings=settings)

    monkeypatch.setattr(ablate_module, "ablate", planned)
    assert CliRunner().invoke(main, args).exit_code == 0
    assert (seen["model"], seen["out"], seen["plugins"]) == (str(tiny_model), tmp_path / "abl", ("ema", "clip"))
    assert seen["overrides"] == {"clip": {"max": 4.0}, "ema": {"every": "2"}}  # -o beside the file's options
    assert seen["settings"]["max_steps"] == 5 and "model" not in seen["settings"]  # the flag wins


def test_ablate_refuses_a_preset_in_its_config_file(tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": "m", "data": "d", "out": "o", "preset": "sdft"})
    result = CliRunner().invoke(main, ["ablate", "--config", str(path), "--eval-tasks", "t"])
    assert result.exit_code == 2 and "preset: unisd ablate compares presets through --combos" in result.output


@pytest.mark.parametrize("option, value, expected", [
    ("ema.beta", 1, 1.0), ("ema.every", 3, 3), ("agree.level", "sequence", "sequence"),
    ("ema.every", True, "expected int"), ("ema.beta", "0.5", 0.5), ("ema.beta", [1], "expected float"),
    ("agree.level", 3, "expected str"), ("ema.every", 2.0, "expected int"),
])
def test_option_values_from_a_file_keep_the_options_types(option: str, value, expected) -> None:
    from unisd.plugin import PluginError, configure, discover

    plugin, key = option.split(".")
    cls = discover()[plugin].cls
    if isinstance(expected, str) and expected.startswith("expected"):
        with pytest.raises(PluginError, match=f"{option}=.*: {expected}"):
            configure(cls, {key: value}, plugin)
    else:
        got = getattr(configure(cls, {key: value}, plugin), key)
        assert got == expected and type(got) is type(expected)


@pytest.mark.parametrize("text, lr", [("lr: 1e-5", 1e-5), ("lr: 2E-4", 2e-4), ("lr: 1.5e-5", 1.5e-5), ("lr: 1e5", 1e5)])
def test_yaml_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path, text: str, lr: float) -> None:
    # PyYAML (YAML 1.1) reads 1e-5 as text; YAML 1.2 and JSON read it as a number, as a user means it
    path = tmp_path / "run.yaml"
    path.write_text(f"{text}\noptions: {{ema: {{beta: 9e-1}}}}\n")
    loaded = config_file.load(path)
    assert loaded["lr"] == lr and type(loaded["lr"]) is float
    assert loaded["options"] == {"ema": {"beta": 0.9}}


def test_a_preset_given_with_a_file_that_overrules_it_is_refused(run_a: Path, tmp_path: Path) -> None:
    # run a's unisd.json names sdft and holds every setting: under it, opsd's settings would never apply
    result = CliRunner().invoke(main, ["train", "--config", str(run_a / "unisd.json"), "--preset", "opsd",
                                       "--out", str(tmp_path / "d")])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: --preset opsd and the --config file disagree (preset: sdft, ")
    assert "temperature: 1.0" in result.output and "max_grad_norm: 1.0" in result.output
    assert not (tmp_path / "d").exists()
    path = _write(tmp_path, {"model": "m", "data": "d", "out": "o", "temperature": 0.9, "options": {"ema": {"beta": 0.5}}})
    with pytest.raises(cfg.ConfigError, match=r"\(temperature: 0\.9, options\.ema\.beta: 0\.5\)"):
        cfg.resolve("sdft", (), {}, config_file.load(path))


def test_a_preset_given_with_a_file_that_agrees_with_it_applies(run_a: Path, tmp_path: Path) -> None:
    path = _write(tmp_path, {"model": "m", "data": "d", "out": "o", "plugins": ["clip"], "lr": 1e-4})
    config = cfg.resolve("opsd", (), {}, config_file.load(path))
    assert (config.preset, config.temperature, config.max_grad_norm, config.lr) == ("opsd", 1.1, 0.1, 1e-4)
    assert config.plugins == ("clip",)
    same = cfg.resolve("sdft", (), {}, config_file.load(run_a / "unisd.json"))  # run a's own preset
    assert same == cfg.resolve("", (), {}, config_file.load(run_a / "unisd.json"))
    spelled = _write(tmp_path, {"model": "m", "data": "d", "out": "o", "options": {"ema": {"beta": "0.99"}}})
    assert cfg.resolve("sdft", (), {}, config_file.load(spelled)).preset == "sdft"  # -o text kept by a run record
