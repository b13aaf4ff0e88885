"""Users' data: every row format trains from a file, columns map, bad rows are one line naming file, row, field."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from unisd.cli import main
from unisd.config import ConfigError, TrainConfig
from unisd.data import DataError, Example, load_data
from unisd.data.formats import detect, parse_columns
from unisd.data.prompts import TEACHER_TEMPLATE, student_prompt, teacher_prompt
from unisd.sequences import render

REAL = Path(os.environ.get("UNISD_REAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
SYSTEM = {"role": "system", "content": "You are terse."}
ROWS = {
    "messages": [{"messages": [SYSTEM, {"role": "user", "content": "What is 2+2?"},
                               {"role": "assistant", "content": "4"}]},
                 {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red?"},
                               {"role": "user", "content": "Another one."}, {"role": "assistant", "content": "Blue"}]}],
    "completion": [{"prompt": "What is 3+3?", "completion": "6"}, {"prompt": "Capital of France?", "completion": "Paris"}],
    "completion-chat": [{"prompt": [SYSTEM, {"role": "user", "content": "What is 3+3?"}],
                         "completion": [{"role": "assistant", "content": "6"}]},
                        {"prompt": [{"role": "user", "content": "Say hi."}],
                         "completion": [{"role": "assistant", "content": "hi"}]}],
    "privileged": [{"prompt": "What is 5+5?", "privileged_context": "The answer is 10, since 5+5=10."},
                   {"prompt": "Opposite of up?", "privileged_context": "down"}],
    "answer": [{"prompt": "What is 1+1?", "answer": "2", "rationale": "one and one"},
               {"prompt": "What is 2+1?", "answer": "3"}],
}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def train(model: Path, data: Path | str, out: Path, *extra: str):
    return CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(data), "--out", str(out),
                                     "--max-steps", "1", "--batch-size", "2", "--max-new-tokens", "4", *extra])


def one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# detection and mapping

def test_each_format_is_detected_from_its_columns():
    assert detect(["messages", "id"], "f") == "messages"
    assert detect(["prompt", "completion"], "f") == "prompt/completion"
    assert detect(["prompt", "privileged_context"], "f") == "prompt/privileged_context"
    assert detect(["prompt", "answer", "rationale"], "f") == "prompt/answer"
    assert detect(["prompt", "id"], "f") == "prompt/answer"  # then each row lacks its answer: named by row
    with pytest.raises(DataError, match=r"^f: unknown format \(columns: question, label\).*--columns"):
        detect(["question", "label"], "f")


def test_columns_map_old_names_to_format_names():
    assert parse_columns("prompt=question, answer=label") == {"question": "prompt", "label": "answer"}
    assert parse_columns("") == {}
    with pytest.raises(ValueError, match="expected new=old"):
        parse_columns("prompt")
    with pytest.raises(ValueError, match="'question' is not a format column"):
        parse_columns("question=prompt")
    with pytest.raises(ValueError, match="^--columns: 'prompt' is named twice; map one column to it$"):
        parse_columns("prompt=q, prompt=r")
    with pytest.raises(ValueError, match="^--columns: column 'q' is mapped twice"):
        parse_columns("prompt=q,answer=q")


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_file_type_reads_through_datasets(tmp_path, suffix, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    frame = pd.DataFrame([{"question": "Q1?", "label": "A1", "id": 7}, {"question": "Q2?", "label": "A2", "id": 8}])
    path = tmp_path / f"data{suffix}"
    {".jsonl": lambda: frame.to_json(path, orient="records", lines=True), ".json": lambda: frame.to_json(path, orient="records"),
     ".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    examples = load_data(str(path), columns="prompt=question,answer=label")
    ids = ["7", "8"] if suffix == ".csv" else [7, 8]  # CSV cells are text
    assert [(e.prompt, e.answer, e.meta["id"]) for e in examples] == [("Q1?", "A1", ids[0]), ("Q2?", "A2", ids[1])]
    assert list(tmp_path.iterdir()) == [path]  # no cache written beside the user's file


def test_messages_split_at_the_last_assistant_turn(tmp_path):
    first, second = load_data(str(write(tmp_path / "m.jsonl", ROWS["messages"])))
    assert (first.prompt, first.answer, first.context) == ("What is 2+2?", "4", (SYSTEM,))
    assert second.prompt == "Another one." and second.answer == "Blue"
    assert [m["content"] for m in second.context] == ["Name a colour.", "Red?"]


def test_conversational_completion_and_privileged_context(tmp_path):
    chat = load_data(str(write(tmp_path / "c.jsonl", ROWS["completion-chat"])))
    assert (chat[0].prompt, chat[0].answer, chat[0].context) == ("What is 3+3?", "6", (SYSTEM,))
    sdft = load_data(str(write(tmp_path / "p.jsonl", ROWS["privileged"])))
    assert sdft[0].answer == "The answer is 10, since 5+5=10." and sdft[0].rationale == ""
    assert "Reference solution:\nThe answer is 10, since 5+5=10.\n" in teacher_prompt(sdft[0])  # verbatim


def test_context_reaches_both_views_and_the_chat_template(tiny_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    e = Example("What is 2+2?", "4", context=(SYSTEM,))
    student, teacher = student_prompt(e), teacher_prompt(e)
    assert student == [SYSTEM, {"role": "user", "content": "What is 2+2?"}]
    assert teacher[0] == SYSTEM and teacher[1]["content"].endswith("Problem: What is 2+2?")
    text = tok.decode(render(tok, student))
    assert "You are terse." in text and text.index("You are terse.") < text.index("What is 2+2?")
    assert render(tok, "What is 2+2?") == render(tok, [{"role": "user", "content": "What is 2+2?"}])
    assert student_prompt(Example("plain", "x")) == "plain"  # benchmarks keep one user turn


def test_teacher_template_is_validated_and_used():
    e = Example("Q?", "A")
    assert teacher_prompt(e, template="Gold: {demonstration} | Task: {prompt}") == "Gold: A | Task: Q?"
    assert teacher_prompt(e) == TEACHER_TEMPLATE.format(demonstration="A", prompt="Q?")
    with pytest.raises(ConfigError, match="both {demonstration} and {prompt}"):
        TrainConfig(model="m", data="d", out="o", teacher_template="no placeholders {prompt}")


def test_teacher_template_and_data_settings_are_run_identity():
    from unisd.checkpoint import NOT_IDENTITY

    settings = TrainConfig(model="m", data="d", out="o", teacher_template="{demonstration}{prompt}").to_json()
    assert settings["teacher_template"] == "{demonstration}{prompt}"
    assert not {"teacher_template", "data_config", "data_split", "columns"} & set(NOT_IDENTITY)


# end to end: one step per format

@pytest.mark.parametrize("fmt", list(ROWS))
def test_each_format_trains_one_step(tiny_model, tmp_path, fmt):
    data = write(tmp_path / f"{fmt}.jsonl", ROWS[fmt])
    result = train(tiny_model, data, tmp_path / "run")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "run" / "unisd.json").read_text())
    assert record["config"]["teacher_template"] == TEACHER_TEMPLATE
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_mapped_csv_with_a_custom_teacher_template_trains_and_resume_compares_it(tiny_model, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("question,label\nWhat is 1+1?,2\nWhat is 2+2?,4\n")
    out = tmp_path / "run"
    template = "Known answer: {demonstration}\n\n{prompt}"
    ok = train(tiny_model, data, out, "--columns", "prompt=question,answer=label", "--teacher-template", template,
               "--save-every", "1")
    assert ok.exit_code == 0, ok.output
    assert json.loads((out / "unisd.json").read_text())["config"]["teacher_template"] == template
    (out / "unisd.json").unlink()  # as if interrupted after its checkpoint: --resume compares the run
    line = one_error(train(tiny_model, data, out, "--columns", "prompt=question,answer=label", "--resume"))
    assert f"teacher_template: {json.dumps(template)} -> {json.dumps(TEACHER_TEMPLATE)}" in line, line


# errors: one line naming the file, the row and the field; nothing written

@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "a", "answer": "b"}, {"prompt": "c"}], "{path}:2: missing field 'answer'"),
    ([{"prompt": "a", "answer": "b"}, {"prompt": "", "answer": "b"}], "{path}:2: field 'prompt' is empty"),
    ([{"question": "a", "label": "b"}], "{path}: unknown format (columns: question, label)"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "{path}:1: field 'messages' needs a user turn followed by"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}],
     "{path}:1: field 'messages' must hold messages with string 'role' and 'content'"),
    ([{"prompt": [{"role": "assistant", "content": "x"}], "completion": "y"}],
     "{path}:1: field 'prompt' must end with a user turn"),
    # an empty demonstration: the teacher would see no solution, SFT would train on a lone end token
    ([{"prompt": "a", "answer": "b"}, {"prompt": "c", "answer": " \n "}],
     "{path}:2: field 'answer' is empty (a demonstration needs text)"),
    ([{"prompt": "a", "completion": ""}], "{path}:1: field 'completion' is empty"),
    ([{"prompt": "a", "privileged_context": "\t"}], "{path}:1: field 'privileged_context' is empty"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]}],
     "{path}:1: field 'messages' is empty"),
    # turns after the gold answer were dropped
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                    {"role": "user", "content": "and?"}]}],
     "{path}:1: field 'messages' has a 'user' turn after the last assistant answer"),
    # several completion messages were joined with newlines, user turns included
    ([{"prompt": [{"role": "user", "content": "hi"}],
       "completion": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]}],
     "{path}:1: field 'completion' must be one assistant message with text, got assistant, user"),
])
def test_bad_rows_are_one_line_naming_file_row_and_field(tiny_model, tmp_path, rows, message):
    data = write(tmp_path / "bad.jsonl", rows)
    out = tmp_path / "run"
    assert message.format(path=data) in one_error(train(tiny_model, data, out))
    assert not out.exists()


def test_the_same_target_named_twice_in_columns_is_one_line(tiny_model, tmp_path):
    data = write(tmp_path / "d.jsonl", [{"q": "a", "r": "b", "s": "c"}])
    out = tmp_path / "run"
    assert "--columns: 'prompt' is named twice" in one_error(train(tiny_model, data, out, "--columns", "prompt=q,prompt=r"))
    assert not out.exists()


@pytest.mark.parametrize("flag,value", [("--lora-r", "8"), ("--lora-alpha", "128"), ("--lora-dropout", "0.1"),
                                        ("--lora-targets", "q_proj")])
def test_adapter_flags_without_lora_are_refused(tiny_model, tmp_path, flag, value):
    data = write(tmp_path / "d.jsonl", ROWS["answer"])
    out = tmp_path / "run"
    assert f"{flag} only apply to a LoRA adapter: add --lora" in one_error(train(tiny_model, data, out, flag, value))
    assert not out.exists()


def test_adapter_settings_from_a_file_count_when_they_differ_from_the_default(tmp_path):
    from unisd.config import resolve

    given = {"model": "m", "data": "d", "out": "o"}
    with pytest.raises(ConfigError, match="^--lora-r only apply"):
        resolve("", (), {}, {**given, "lora_r": 8})
    record = TrainConfig(**given).to_json()  # a run record lists every field, lora off: accepted
    assert resolve("", (), {}, {k: v for k, v in record.items() if k not in ("preset", "plugins", "options")}).lora_r == 64
    assert resolve("", (), {}, given, lora=True, lora_r=8).lora_r == 8


def test_json_numbers_as_answers_read_as_text_like_csv(tmp_path):
    mixed = load_data(str(write(tmp_path / "m.jsonl", [{"prompt": "6*7?", "answer": 42}, {"prompt": "x?", "answer": "y"}])))
    floats = load_data(str(write(tmp_path / "f.jsonl", [{"prompt": "6*7?", "answer": 42}, {"prompt": "7/2?", "answer": 3.5}])))
    assert [e.answer for e in mixed] == ["42", "y"]
    assert [e.answer for e in floats] == ["42", "3.5"]  # a column of ints and floats is read as floats: 42.0 -> "42"
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'answer' must be a string"):
        load_data(str(write(tmp_path / "b.jsonl", [{"prompt": "true?", "answer": True}])))


def test_a_column_to_map_that_is_missing_is_named(tiny_model, tmp_path):
    data = write(tmp_path / "d.jsonl", ROWS["answer"])
    line = one_error(train(tiny_model, data, tmp_path / "run", "--columns", "prompt=question"))
    assert f"--columns: {data} has no column 'question'" in line


def test_unknown_file_type_and_unreadable_parquet(tiny_model, tmp_path):
    txt = tmp_path / "d.txt"
    txt.write_text("hello")
    assert "d.txt: unknown file type" in one_error(train(tiny_model, txt, tmp_path / "run"))
    parquet = tmp_path / "d.parquet"
    parquet.write_bytes(b"not parquet at all")
    assert f"{parquet}: cannot read it as parquet" in one_error(train(tiny_model, parquet, tmp_path / "run"))


@pytest.mark.parametrize("name", ["gpqa", "humaneval"])
def test_evaluation_only_benchmarks_are_refused_for_training(tiny_model, tmp_path, name):
    assert f"{name} is an evaluation-only benchmark" in one_error(train(tiny_model, name, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_hub_id_goes_to_load_dataset_with_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake(path, name=None, split=None, **kw):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"prompt": "Q?", "completion": "A"}])

    monkeypatch.setattr(datasets, "load_dataset", fake)
    examples = load_data("org/name", "test", "cfg")
    assert calls == [("org/name", "cfg", "test")] and examples[0].answer == "A"


# the real files, as users' local data

@pytest.mark.realdata
@pytest.mark.parametrize("path,columns,count", [
    ("mbpp/full/train.jsonl", "prompt=text,answer=code", 374),
    ("cos_e/v1.11/validation.jsonl", "prompt=question,rationale=abstractive_explanation", 1221),
    ("toolalpaca/test.jsonl", "prompt=instruction,privileged_context=documentation", 214),  # golden_answer: a list
])
def test_real_files_load_as_local_data(path, columns, count, monkeypatch):
    if not (REAL / path).is_file():
        pytest.skip(f"no real data at {REAL}")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    examples = load_data(str(REAL / path), columns=columns)
    assert len(examples) == count and all(e.prompt.strip() and e.answer for e in examples)
