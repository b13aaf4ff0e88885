"""Inputs people really mistype, through the real command in a subprocess: each is refused with exactly
one `error:` line, exit status 2, no traceback, and nothing written.

Most cases fail in click's types or the configuration, before torch is imported (well under a second);
the few that need a model or the data file pay one import of transformers each.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CONFLICT = '''
from unisd.plugin import Plugin

class TeacherA(Plugin):
    def teacher(self, run):
        return None

class TeacherB(Plugin):
    def teacher(self, run):
        return None
'''


def _snapshot(folder: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Path]:
    """Files the table points at, built once: data, broken models, a file in the way, a plugin pair."""
    root = tmp_path_factory.mktemp("bad-inputs")
    good = root / "good.jsonl"
    good.write_text(json.dumps({"prompt": "What is two plus two?", "answer": "4"}) + "\n")
    (root / "not-utf8.jsonl").write_bytes(b'{"prompt": "caf\xe9", "answer": "4"}\n')
    (root / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    (root / "data-folder").mkdir()
    arch = root / "unknown-arch"
    arch.mkdir()
    (arch / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    corrupt = root / "corrupt-model"
    shutil.copytree(tiny_model, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # truncated download
    (root / "a-file").write_text("in the way")
    site = root / "site"
    info = site / "conflict_dist-0.0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: conflict-dist\nVersion: 0.0.1\n")
    (info / "entry_points.txt").write_text("[unisd.plugins]\nteach_a = conflict_mod:TeacherA\n"
                                           "teach_b = conflict_mod:TeacherB\n")
    (site / "conflict_mod.py").write_text(CONFLICT)
    return {"root": root, "good": good, "model": tiny_model, "arch": arch, "corrupt": corrupt, "site": site}


def train(model: str = "{model}", data: str = "{good}", out: str = "{out}", *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", data, "--out", out, "--max-steps", "1", *extra]


FLAG_CASES = """
batch-size-0 | --batch-size 0 | '--batch-size': 0 is not in the range x>=1
batch-size-word | --batch-size four | 'four' is not a valid integer
grad-accum-0 | --grad-accum 0 | '--grad-accum': 0 is not in the range
max-steps-negative | --max-steps -1 | '--max-steps': -1 is not in the range x>=0
lr-zero | --lr 0 | '--lr': 0.0 is not in the range x>0
lr-negative | --lr -1e-5 | '--lr'
lr-nan | --lr nan | nan is not a finite number
lr-inf | --lr inf | inf is not a finite number
lr-comma | --lr 1e-5, | '1e-5,' is not a valid number
alpha-above-1 | --divergence jsd --alpha 1.5 | '--alpha': 1.5 is not in the range 0<x<1
alpha-0 | --alpha 0 | '--alpha': 0.0 is not in the range 0<x<1
loss-temperature-0 | --loss-temperature 0 | '--loss-temperature'
max-new-tokens-0 | --max-new-tokens 0 | '--max-new-tokens': 0 is not in the range
max-prompt-tokens-0 | --max-prompt-tokens 0 | '--max-prompt-tokens'
seed-negative | --seed -3 | '--seed': -3 is not in the range x>=0
save-every-negative | --save-every -1 | '--save-every'
max-bad-steps-0 | --max-bad-steps 0 | '--max-bad-steps'
divergence-typo | --divergence kl | 'kl' is not one of
unknown-flag | --max-step 3 | No such option '--max-step'
"""  # case | flags after `train --model --data --out --max-steps 1` | fragment of the error


# (case id, arguments with {placeholders}, a fragment the one error line must contain)
TABLE = [
    # click's types: refused before torch is imported
    *[(case, train("{model}", "{good}", "{out}", *flags.split()), fragment)
      for case, flags, fragment in (row.split(" | ") for row in FLAG_CASES.strip().splitlines())],
    ("missing-out", ["train", "--model", "{model}", "--data", "{good}"], "error: --out is missing"),
    ("unknown-command", ["trian", "--model", "{model}"], "No such command 'trian'"),
    ("eval-limit-0", ["eval", "--model", "a={model}", "--limit", "0", "--out", "{out}"], "'--limit': 0 is not in the range"),
    # the configuration: still before torch
    ("extend-without-resume", train("{model}", "{good}", "{out}", "--extend"), "--extend continues a run"),
    ("unknown-preset", train("{model}", "{good}", "{out}", "--preset", "unisd"), "unknown preset 'unisd'"),
    ("option-syntax", train("{model}", "{good}", "{out}", "--plugins", "clip", "-o", "clip.max"), "expected plugin.option=value"),
    ("resume-and-overwrite", train("{model}", "{good}", "{out}", "--resume", "--overwrite"), "contradict each other"),
    # the output folder: before anything loads
    ("out-under-a-file", train("{model}", "{good}", "{root}/a-file/run"), "a-file is a file, not a folder"),
    ("out-is-a-file", train("{model}", "{good}", "{root}/a-file"), "exists and is not a folder"),
    # plugins and data: one import of torch, no model
    ("unknown-plugin", train("{model}", "{good}", "{out}", "--plugins", "ema,clipp"), "unknown plugin 'clipp'"),
    ("two-teachers", train("{model}", "{good}", "{out}", "--plugins", "teach_a,teach_b"),
     "plugins 'teach_a' and 'teach_b' both provide the teacher hook"),
    ("missing-data", train("{model}", "{root}/trian.jsonl"), "trian.jsonl: no such file"),
    ("data-is-a-folder", train("{model}", "{root}/data-folder"), "data-folder is a folder"),
    ("data-not-utf8", train("{model}", "{root}/not-utf8.jsonl"), "not UTF-8 text"),
    ("data-bad-line", train("{model}", "{root}/bad.jsonl"), "bad.jsonl:2: not valid JSON"),
    ("unknown-benchmark", train("{model}", "gsm8k"), "unknown benchmark 'gsm8k'"),
    # models: the heavy cases
    ("model-path-typo", train("{root}/tiny-lama"), "tiny-lama: no such model folder"),
    ("model-hub-offline", train("nobody-here/no-such-model"), "nor in the Hugging Face cache"),
    ("model-unknown-architecture", train("{arch}"), "does not support its architecture"),
    ("model-corrupt-weights", train("{corrupt}"), "weights are corrupt or truncated"),
]


@pytest.mark.parametrize("args,message", [pytest.param(a, m, id=i) for i, a, m in TABLE])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(inputs, tmp_path, args, message):
    out = tmp_path / "out"
    values = {**{k: str(v) for k, v in inputs.items()}, "out": str(out)}
    args = [a.format(**values) for a in args]
    root = inputs["root"]
    before = _snapshot(root)
    # no bytecode cache: importing the test's own plugin module from `site` would write one there, which is
    # Python's doing, not the CLI's (the first case that discovers plugins would see it appear)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "UNISD_CACHE": str(tmp_path / "cache"),
           "PYTHONDONTWRITEBYTECODE": "1",
           "PYTHONPATH": os.pathsep.join([str(inputs["site"]), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "unisd", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [ln for ln in (done.stdout + done.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stdout + done.stderr
    assert message in lines[0]
    assert "Traceback" not in done.stderr
    assert not out.exists()
    assert _snapshot(root) == before  # nothing written next to the inputs either (e.g. under a-file/)


def test_the_table_is_long_enough():
    assert len(TABLE) >= 30 and len({i for i, _, _ in TABLE}) == len(TABLE)


def _hub_error(cls: type, status: int) -> Exception:
    import httpx

    return cls(f"{status} Client Error", response=httpx.Response(status, request=httpx.Request("GET", "https://hf.co/x")))


@pytest.mark.parametrize("cause,expected", [
    ("gated", "is gated on the Hugging Face Hub: accept its terms on its Hub page, then log in (hf auth login)"),
    ("missing", "is not on the Hugging Face Hub (check the id; for a private model, log in with hf auth login)"),
])
def test_hub_answers_that_need_a_network_map_to_one_line(cause, expected):
    """Gated and unknown repositories need the Hub to answer; their exceptions, as transformers chains them."""
    from huggingface_hub import errors as hub

    from unisd.errors import model_problem

    error = _hub_error(hub.GatedRepoError if cause == "gated" else hub.RepositoryNotFoundError,
                       401 if cause == "gated" else 404)
    try:
        raise OSError("You are trying to access a gated repo. Make sure to have access to it.") from error
    except OSError as wrapped:
        assert model_problem("org/model", wrapped) == f"model 'org/model' {expected}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: no permission error to provoke")
def test_out_in_a_folder_without_write_permission(tmp_path):
    from unisd.checkpoint import OutputDirError, check_out_dir

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(OutputDirError, match="permission denied; choose another --out"):
            check_out_dir(locked / "run", resume=False, overwrite=False)
    finally:
        locked.chmod(0o755)
