"""Every example of the README and the docs pages runs as written (issue 39), on the tiny model, offline.

Each page's fenced blocks are taken in order (tests/doc_examples.py): every command of its sh blocks (`\\`
continuations joined), every python block whole, and every yaml/json block whose first line names a file
(`# run.yaml`). Every example is in exactly one class:

- NOT-RUN (`NOT_RUN`, with the reason): installs, tox and dev.py environments, the docs' own tooling, a GPU-only
  script, the vLLM backend where vLLM does not import, a fragment of a file that no command reads.
- DRY (`DRY`): the multi-GPU torchrun commands. tests/test_memory.py dry-runs each on the GPUs it is written for
  (test_every_documented_gpu_command_fits_its_gpus); `test_the_dry_examples_are_the_memory_tests_gpu_commands`
  checks that it holds every one of them.
- RUN: every other `unisd`, `lm_eval` or `export` command, python block and named yaml/json file (written to the
  page's folder under its name), run in page order in one temporary folder per page, so a command uses what the
  page's earlier commands made (`unisd eval --model first=runs/first` scores the run `--out runs/first` trained).
  A command of any other program is unclassified, and `test_every_example_is_classified_once` fails until
  NOT_RUN or DRY names it.

"Runs as written" means after these substitutions, all made by `substitute` (sh commands) and `substitute_text`
(python and yaml), and nothing else:

- a Hub model id of an organisation in HUB_ORGS (Qwen/Qwen2.5-7B-Instruct, ...) and the alias smollm2-135m, wherever
  they appear: the tiny Llama of tests/conftest.py (fixture tiny_model);
- `--max-steps N`: at most 2, and `--max-steps 2` added to a `unisd train` or `unisd ablate` that trains (no
  `--dry-run`) without one;
- `--limit N` / `--eval-limit N`: at most 4, added to `unisd eval`, to `unisd ablate` and to a `unisd train` with
  `--eval-tasks` where absent; `lm_eval`'s `--limit`: at most 2, added where absent;
- `--max-new-tokens N`: at most 16, added to a training `unisd train` / `unisd ablate` without it;
  `--max-gen-toks N` / `--eval-max-gen-toks N`: at most 16, added to `unisd eval` / `unisd ablate` without it;
  `lm_eval` gets `--gen_kwargs max_gen_toks=16` (the tasks generate up to 1024 tokens);
- in python and yaml text: the same model ids, and the values of `max_steps`, `limit`, `eval_limit`,
  `max_new_tokens`, `max_gen_toks` and `eval_max_gen_toks` (`key=N` or `key: N`) capped as their flags are;
- benchmark data (mbpp, cos_e, scienceqa, toolalpaca, gpqa) reads tests/fixtures, rows in the Hub schema, through
  UNISD_DATA_DIR, which every page starts with; a page that sets UNISD_DATA_DIR (`export`, or `VAR=value` before a
  command) keeps its value where that folder exists in the page's folder (data.md downloads it first), and gets
  tests/fixtures otherwise;
- `unisd data download`: the Hub it downloads from is tests/fixtures (`datasets.load_dataset(hub_id, config,
  split)` returns the fixture rows of that benchmark, configuration and split);
- `train.jsonl`: the prompt/answer rows of tests/conftest.py (fixture tiny_data), in every page's folder, beside a
  copy of docs/examples/ (`--include-path docs/examples/heldout` reads the repository's example, as from its root);
- `$(unisd tasks-path)` and `$PWD` are expanded as the shell would (the first by running `unisd tasks-path`).

`unisd` commands run in-process through click's CliRunner, `lm_eval` commands through lm-eval's own command-line
entry (`lm_eval.__main__.cli_evaluate`) in-process (its index of task files built once for them all), python blocks
with exec(); torch uses one thread meanwhile (the tiny model runs several times faster so on a shared CPU).
Each RUN example must exit with status 0 and leave what it promises (`_check_promises`): a training run its model
in `--out` (and its adapter, best model or self-scores where its flags ask), an evaluation a `results.json` scoring
every model it names, `compare` its table, `data download` every file UNISD_DATA_DIR reads, a `--dry-run` nothing
at all, `lm_eval` a score for each task it names, and so on.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import shlex
import shutil
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from click.testing import CliRunner

from tests.doc_examples import PAGE_PATHS, ROOT, fenced, page_name, shell_lines
from unisd.cli import main

FIXTURES = ROOT / "tests" / "fixtures"

# --- what is not run, and why (a regex searched in the command as written, or in a block's text) ----------------
NOT_RUN = {
    r"^pip (install|uninstall) ": "installs or removes packages; tests/test_install.py installs unisd into a fresh "
                                  "virtual environment and runs its commands",
    r"^python3 dev\.py ": "builds a tox environment (installs packages); it runs `unisd demo` (tests/test_demo.py) or "
                          "the test suite this test is part of",
    r"^tox ": "a tox environment (installs packages); tox.ini says what each one runs",
    r"^unshare ": "mutation testing (tox -e mutation) as root in a private mount namespace: hours",
    r"^mkdocs serve": "a web server that runs until stopped; `python3 dev.py lint` builds the site strictly",
    r"^python docs/generate\.py": "rewrites the docs' generated regions; tests/test_docs.py checks that the pages hold "
                                  "what it writes",
    r"bench/gpu_smoke\.sh": "a GPU session's smoke test (several runs, up to 5 minutes); tests/test_gpu_smoke.py "
                             "runs it on CPU (marker torchrun)",
    r"^unisd eval .*--backend vllm": "needs vLLM (pip install -e '.[vllm]'), absent here; tests/test_vllm.py scores "
                                     "with --backend vllm (marker vllm)",
    r"^# its pyproject\.toml": "a fragment of plugins/contrib/unisd-surprisal-gate/pyproject.toml, whose "
                               "entry point tests/test_plugins_contrib.py registers and trains with",
}
DRY = {
    r"^torchrun --nproc_per_node [2-9]": "several GPUs: tests/test_memory.py dry-runs it on as many 80 GB GPUs "
                                        "(test_every_documented_gpu_command_fits_its_gpus)",
}
RUN_PROGRAMS = ("unisd", "lm_eval", "export")  # and python blocks, and yaml/json blocks that name their file

# --- the substitutions -----------------------------------------------------------------------------------------------
HUB_ORGS = ("Qwen", "meta-llama", "google", "mistralai", "HuggingFaceTB", "microsoft")
MODEL_ID = re.compile(rf"(?<![\w./-])(?:smollm2-135m|(?:{'|'.join(HUB_ORGS)})/[\w.-]+)(?![\w/-])")
CAPS = {"--max-steps": 2, "--limit": 4, "--eval-limit": 4, "--max-new-tokens": 16, "--max-gen-toks": 16,
        "--eval-max-gen-toks": 16}
LM_EVAL_LIMIT, LM_EVAL_GEN_TOKS = 2, 16
ADDED = {"train": ("--max-steps", "--max-new-tokens"),  # flags added, where absent, to a unisd command that runs
         "ablate": ("--max-steps", "--max-new-tokens", "--eval-limit", "--eval-max-gen-toks"),
         "eval": ("--limit", "--max-gen-toks")}
TEXT_CAPS = {"max_steps": 2, "limit": 4, "eval_limit": 4, "max_new_tokens": 16, "max_gen_toks": 16,
             "eval_max_gen_toks": 16}


def substitute(words: list[str], tiny: str) -> list[str]:
    """A command's words as the test runs them (the module docstring lists each substitution)."""
    words = [MODEL_ID.sub(tiny, w) for w in words]
    program, sub = words[0], (words[1] if len(words) > 1 else "")
    caps = {**CAPS, "--limit": LM_EVAL_LIMIT} if program == "lm_eval" else CAPS
    out: list[str] = []
    i = 0
    while i < len(words):
        flag, _, inline = words[i].partition("=")
        if flag in caps and inline:
            out.append(f"{flag}={min(int(inline), caps[flag])}")
        elif words[i] in caps and i + 1 < len(words):
            out += [words[i], str(min(int(words[i + 1]), caps[words[i]]))]
            i += 1
        else:
            out.append(words[i])
        i += 1
    given = {w.partition("=")[0] for w in words}
    if program == "unisd" and "--dry-run" not in given:
        added = list(ADDED.get(sub, ()))
        if sub == "train" and "--eval-tasks" in given:
            added.append("--eval-limit")
        out += [x for flag in added if flag not in given for x in (flag, str(caps[flag]))]
    if program == "lm_eval":
        out += ["--limit", str(LM_EVAL_LIMIT)] if "--limit" not in given else []
        out += ["--gen_kwargs", f"max_gen_toks={LM_EVAL_GEN_TOKS}"] if "--gen_kwargs" not in given else []
    return out


def substitute_text(text: str, tiny: str) -> str:
    """A python or yaml block as the test runs it: the model ids, and the capped settings."""
    text = MODEL_ID.sub(tiny, text)
    keys = "|".join(TEXT_CAPS)
    return re.sub(rf"\b({keys})(\s*[=:]\s*)(\d+)\b", lambda m: f"{m[1]}{m[2]}{min(int(m[3]), TEXT_CAPS[m[1]])}",
                  text)


def _data_dir(value: str, folder: Path) -> str:
    """The UNISD_DATA_DIR a page sets, where that folder exists in the page's folder; else the fixtures."""
    return value if (folder / value).is_dir() else str(FIXTURES)


# --- the examples ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    page: str
    kind: str        # "sh" (one command), "python" (a block), "file" (a yaml/json block that names its file), "other"
    text: str        # the command as written, or the block

    @property
    def head(self) -> str:
        """What the class rules read: the command, or the block's first line."""
        return self.text if self.kind == "sh" else self.text.splitlines()[0] if self.text.strip() else ""

    @property
    def file_name(self) -> str | None:
        found = re.fullmatch(r"# ([\w.-]+\.(?:ya?ml|json))", self.head.strip())
        return found.group(1) if self.kind in ("file", "other") and found else None


def _examples(path: Path) -> list[Example]:
    out: list[Example] = []
    for language, body in fenced(path.read_text()):
        if language == "sh":
            out += [Example(page_name(path), "sh", line) for line in shell_lines(body)]
        elif language == "python":
            out.append(Example(page_name(path), "python", body))
        else:
            example = Example(page_name(path), "other", body)
            out.append(Example(example.page, "file", body) if example.file_name else example)
    return out


EXAMPLES = [e for path in PAGE_PATHS for e in _examples(path)]


def _program(example: Example) -> str:
    words = shlex.split(example.text)
    while words and re.match(r"^[A-Z_]+=", words[0]):  # VAR=value before the command
        words.pop(0)
    return words[0] if words else ""


def classify(example: Example) -> tuple[str, str]:
    """(class, reason): NOT-RUN and DRY by their rules, RUN for what the runner runs; ("", why) when unclassified."""
    rules = [("NOT-RUN", pattern, reason) for pattern, reason in NOT_RUN.items()] + \
            [("DRY", pattern, reason) for pattern, reason in DRY.items()]
    matched = {(kind, reason) for kind, pattern, reason in rules if re.search(pattern, example.head)}
    if len(matched) > 1:
        return "", f"matched by several rules: {sorted(matched)}"
    if matched:
        return matched.pop()
    if example.kind == "python" or example.kind == "file" or (example.kind == "sh" and
                                                                 _program(example) in RUN_PROGRAMS):
        return "RUN", ""
    return "", "no rule: run it (a unisd, lm_eval or export command), or name it in NOT_RUN or DRY"


def test_every_example_is_classified_once():
    for path in PAGE_PATHS:  # every fence opens or closes a block the extraction found
        fences = re.findall(r"^ *```", path.read_text(), flags=re.M)
        assert len(fences) == 2 * len(fenced(path.read_text())), path
    unclassified = [(e.page, e.head, why) for e in EXAMPLES for kind, why in [classify(e)] if not kind]
    assert not unclassified, unclassified
    for rules in (NOT_RUN, DRY):  # a rule that matches nothing is stale
        for pattern in rules:
            assert any(re.search(pattern, e.head) for e in EXAMPLES), f"no example matches {pattern!r}"
    counts = {kind: sum(classify(e)[0] == kind for e in EXAMPLES) for kind in ("RUN", "DRY", "NOT-RUN")}
    assert counts["RUN"] >= 30 and counts["DRY"] >= 3, counts


def test_the_dry_examples_are_the_memory_tests_gpu_commands():
    from tests.test_memory import GPU_COMMANDS

    dry = [shlex.split(e.text) for e in EXAMPLES if classify(e)[0] == "DRY"]
    assert dry
    for words in dry:
        processes, args = int(words[words.index("--nproc_per_node") + 1]), words[words.index("train") + 1:]
        assert (processes, args) in GPU_COMMANDS, words


def test_the_substitutions():
    got = substitute(shlex.split("unisd train --model Qwen/Qwen2.5-7B-Instruct --data mbpp --max-steps 20 "
                                 "--max-new-tokens 1024 --out runs/x"), "TINY")
    assert got == ["unisd", "train", "--model", "TINY", "--data", "mbpp", "--max-steps", "2", "--max-new-tokens",
                   "16", "--out", "runs/x"]
    assert substitute(["unisd", "train", "--model", "runs/a", "--out", "b"], "TINY")[-4:] == \
        ["--max-steps", "2", "--max-new-tokens", "16"]
    assert substitute(["unisd", "eval", "--model", "base=smollm2-135m", "--model", "sd=runs/sd", "--limit", "3"],
                      "TINY") == ["unisd", "eval", "--model", "base=TINY", "--model", "sd=runs/sd", "--limit", "3",
                                  "--max-gen-toks", "16"]
    dry = ["unisd", "ablate", "--model", "smollm2-135m", "--max-steps", "10", "--dry-run"]
    assert substitute(dry, "TINY") == ["unisd", "ablate", "--model", "TINY", "--max-steps", "2", "--dry-run"]
    assert substitute(["lm_eval", "--model", "hf", "--model_args", "pretrained=Qwen/Qwen2.5-1.5B-Instruct,dtype=bf16",
                       "--limit=5"], "TINY") == \
        ["lm_eval", "--model", "hf", "--model_args", "pretrained=TINY,dtype=bf16", "--limit=2", "--gen_kwargs",
         "max_gen_toks=16"]
    assert substitute_text('model: smollm2-135m\nmax_new_tokens: 32\nmax_steps: 1\n', "TINY") == \
        "model: TINY\nmax_new_tokens: 16\nmax_steps: 1\n"
    assert substitute_text('evaluate(m, t, "e/", limit=20, max_gen_toks=8)', "T") == \
        'evaluate(m, t, "e/", limit=4, max_gen_toks=8)'


# --- running a page ----------------------------------------------------------------------------------------------
@pytest.fixture
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Every training run (its folder) and evaluation (its folder and models) the examples start, CLI or library."""
    import unisd.evaluate
    import unisd.train

    recorded: list[tuple[Any, ...]] = []
    real_train, real_evaluate = unisd.train.train, unisd.evaluate.evaluate

    def train(config: Any, *args: Any, **kwargs: Any) -> Any:
        folder = real_train(config, *args, **kwargs)
        recorded.append(("train", Path(folder)))
        return folder

    def evaluate(checkpoints: dict[str, str], tasks: list[str], out: Any, *args: Any, **kwargs: Any) -> Any:
        results = real_evaluate(checkpoints, tasks, out, *args, **kwargs)
        recorded.append(("evaluate", Path(out), tuple(checkpoints)))
        return results

    monkeypatch.setattr(unisd.train, "train", train)
    monkeypatch.setattr(unisd.evaluate, "evaluate", evaluate)
    return recorded


def _fixture_hub(hub_id: str, config: str | None = None, split: str = "train", **_: Any) -> Any:
    """datasets.load_dataset for `unisd data download`: the fixture rows of that benchmark, configuration, split."""
    import datasets

    from unisd.data import benchmarks

    [name] = [n for n, source in benchmarks._SOURCES.items() if source[0] == hub_id]
    rows = (FIXTURES / name / (config or "") / f"{split}.jsonl").read_text().splitlines()
    return datasets.Dataset.from_list([json.loads(row) for row in rows])


@contextlib.contextmanager
def _environment(assignments: dict[str, str]) -> Iterator[None]:
    with pytest.MonkeyPatch.context() as patch:
        for name, value in assignments.items():
            patch.setenv(name, value)
        yield


def _run_unisd(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """(exit status, stdout and stderr with any traceback, stdout alone) of `unisd ARGS`."""
    with _environment(env):
        result = CliRunner().invoke(main, args)
    failed = result.exception is not None and not isinstance(result.exception, SystemExit)
    trace = "".join(traceback.format_exception(result.exception)) if failed else ""
    return result.exit_code, result.output + trace, result.stdout


_TASK_INDEX: dict[tuple[Any, ...], dict[str, Any]] = {}


def _index_once(build: Any) -> Any:
    """lm-eval's task index (its thousands of task files, seconds to parse) built once per set of folders for this
    module's lm_eval runs: the same files give the same index, and lm-eval copies an entry's config before using it."""
    def cached(paths: Any, **kwargs: Any) -> dict[str, Any]:
        paths = list(paths)
        key = (tuple(str(p) for p in paths), tuple(sorted(kwargs.items())))
        if key not in _TASK_INDEX:
            _TASK_INDEX[key] = build(paths, **kwargs)
        return dict(_TASK_INDEX[key])

    return staticmethod(cached)


def _run_lm_eval(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """lm-eval's own command line, in-process; its logger is left as it was found."""
    import lm_eval.tasks._index
    import lm_eval.utils
    from lm_eval.__main__ import cli_evaluate

    logger = logging.getLogger("lm_eval")
    saved = (logger.level, list(logger.handlers), logger.propagate, lm_eval.utils._LOGGING_CONFIGURED)
    printed, code = io.StringIO(), 0
    try:
        with _environment(env), pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
            patch.setattr(sys, "argv", ["lm_eval", *args])
            index = getattr(lm_eval.tasks._index, "TaskIndex", None)
            if index is not None and hasattr(index, "build"):
                patch.setattr(index, "build", _index_once(index.build))
            try:
                cli_evaluate()
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.propagate = saved[2]
        lm_eval.utils._LOGGING_CONFIGURED = saved[3]
    return code, printed.getvalue()


def _value(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _check_promises(words: list[str], output: str, new: list[tuple[Any, ...]]) -> None:
    """What a command promises is there (paths relative to the page's folder, the working directory)."""
    for call in new:  # every run trained wrote its model; every evaluation scored each of its models
        if call[0] == "train":
            assert all((call[1] / name).is_file() for name in ("config.json", "model.safetensors", "unisd.json")), call
        else:
            results = json.loads((call[1] / "results.json").read_text())
            assert set(results["scores"]) >= set(call[2]) and (call[1] / "table.md").is_file(), call
    if words[0] == "lm_eval":
        for task in words[words.index("--tasks") + 1].split(","):
            assert re.search(rf"\|\s*-?\s*{re.escape(task)}\s*\|", output), f"no score printed for {task}"
        return
    if words[0] != "unisd":
        return
    sub, out = words[1], _value(words, "--out")
    trained = [Path(c[1]).resolve() for c in new if c[0] == "train"]
    evaluated = [c for c in new if c[0] == "evaluate"]
    if sub in ("train", "ablate") and "--dry-run" in words:
        assert out and not Path(out).exists() and not trained, "a --dry-run writes nothing"
    elif sub == "train":
        assert out and trained == [Path(out).resolve()]
        assert (Path(out) / "metrics.jsonl").is_file() and (Path(out) / "README.md").is_file()
        assert "--lora" not in words or (Path(out) / "adapter").is_dir()
        assert "--keep-best" not in words or (Path(out) / "best" / "model.safetensors").is_file()
        if "--eval-every" in words:  # the run scored itself: metrics.jsonl has eval/<task>
            rows = [json.loads(row) for row in (Path(out) / "metrics.jsonl").read_text().splitlines()]
            for task in (_value(words, "--eval-tasks") or "").split(","):
                assert any(f"eval/{task}" in row for row in rows), task
    elif sub == "eval":
        names = tuple(spec.partition("=")[0] for w, spec in zip(words, words[1:]) if w == "--model")
        assert out and [(Path(c[1]).resolve(), c[2]) for c in evaluated] == [(Path(out).resolve(), names)]
        assert (Path(out) / "scores.png").is_file()
    elif sub == "ablate":
        assert out and trained and (Path(out) / "results.json").is_file() and (Path(out) / "table.md").is_file()
    elif sub == "compare":
        assert out and (Path(out) / "table.md").is_file() and (Path(out) / "scores.png").is_file()
    elif words[1:3] == ["data", "download"]:
        from unisd.data import download

        names = [words[i + 1] for i, w in enumerate(words) if w == "--benchmark"] or list(download.DOWNLOADABLE)
        missing = [f for name in names for f in download.files(name) if not (Path(words[3]) / f).is_file()]
        assert not missing, missing
    elif sub == "plugins":
        from unisd.plugin import discover

        assert all(name in output for name in discover()), output
    elif sub == "presets":
        from unisd.config import PRESETS

        assert all(name in output for name in PRESETS), output
    else:
        pytest.fail(f"no promise known for `unisd {sub}`: add one to _check_promises")


def _run_sh(line: str, folder: Path, tiny: str, monkeypatch: pytest.MonkeyPatch,
            calls: list[tuple[Any, ...]]) -> None:
    def tasks_path(found: re.Match[str]) -> str:
        code, output, printed = _run_unisd(shlex.split(found.group(1))[1:], {})
        assert code == 0, output
        return printed.strip()

    expanded = re.sub(r"\$\((unisd [^)]*)\)", tasks_path, line).replace("$PWD", str(folder))
    words = shlex.split(expanded)
    env: dict[str, str] = {}
    while re.match(r"^[A-Z_]+=", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = _data_dir(value, folder) if name == "UNISD_DATA_DIR" else value
    if words[0] == "export":
        for name, _, value in (w.partition("=") for w in words[1:]):
            monkeypatch.setenv(name, _data_dir(value, folder) if name == "UNISD_DATA_DIR" else value)
        return
    words = substitute(words, tiny)
    before = len(calls)
    if words[1:3] == ["data", "download"]:
        import datasets

        with pytest.MonkeyPatch.context() as hub:
            hub.setattr(datasets, "load_dataset", _fixture_hub)
            code, output, _ = _run_unisd(words[1:], env)
    elif words[0] == "unisd":
        code, output, _ = _run_unisd(words[1:], env)
    else:
        code, output = _run_lm_eval(words[1:], env)
    assert code == 0, f"{line}\nran as: {shlex.join(words)}\n{output[-4000:]}"
    _check_promises(words, output, calls[before:])


PAGES_THAT_RUN = sorted({e.page for e in EXAMPLES if classify(e)[0] == "RUN"})


@pytest.mark.parametrize("page", PAGES_THAT_RUN)
def test_the_examples_of_a_page_run_in_order(page, tiny_model, tiny_data, tmp_path, monkeypatch, one_thread, calls):
    folder = tmp_path / "page"
    folder.mkdir()
    monkeypatch.chdir(folder)
    (folder / "train.jsonl").write_text(tiny_data.read_text())
    shutil.copytree(ROOT / "docs" / "examples", folder / "docs" / "examples")
    monkeypatch.setenv("UNISD_DATA_DIR", str(FIXTURES))
    for example in (e for e in EXAMPLES if e.page == page and classify(e)[0] == "RUN"):
        if example.kind == "file":
            (folder / str(example.file_name)).write_text(substitute_text(example.text, str(tiny_model)))
        elif example.kind == "python":
            before = len(calls)
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    exec(compile(substitute_text(example.text, str(tiny_model)), f"<{page} python block>", "exec"), {})
            except Exception:
                pytest.fail(f"{page}: the python block failed\n{example.text}\n{printed.getvalue()[-2000:]}\n"
                            f"{traceback.format_exc()}")
            _check_promises(["python"], printed.getvalue(), calls[before:])
        else:
            _run_sh(example.text, folder, str(tiny_model), monkeypatch, calls)
