"""Conversations as the chat template renders them: tool calls kept, refusals named by row, no template, end of turn."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from unisd.cli import main
from unisd.data import DataError, Example, load_data
from unisd.data.prompts import student_prompt, teacher_prompt
from unisd.rollout import eos_ids, from_texts
from unisd.sequences import RenderError, end_of_turn_id, render

# ChatML that writes tool calls and tool results, as Qwen2.5's template does (shortened)
TOOLS_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if 'tool_calls' in m %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function']['name'] }}"
    "{{ c['function']['arguments'] | tojson }}</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Gemma-style: no system turn
NO_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_ROWS = [
    {"messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [CALL]},
                  {"role": "tool", "name": "get_weather", "content": "18 degrees"},
                  {"role": "assistant", "content": "It is 18 degrees."}]},
]
SYSTEM = {"role": "system", "content": "You are terse."}


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def with_template(tiny_model: Path, folder: Path, template: str) -> Path:
    shutil.copytree(tiny_model, folder)
    (folder / "chat_template.jinja").write_text(template)
    return folder


def train(model: Path, data: Path, out: Path):
    return CliRunner().invoke(main, ["train", "--model", str(model), "--data", str(data), "--out", str(out),
                                     "--max-steps", "1", "--batch-size", "1", "--max-new-tokens", "4"])


def one_error(result) -> str:
    lines = [ln for ln in result.output.splitlines() if ln.strip() and not ln.startswith("Loading")]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# tool calls

def test_tool_turns_are_kept_and_the_answer_after_a_tool_turn_is_the_gold(tmp_path):
    chat = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "tool_call_id": "c1", "content": "18 degrees"}]
    completion = [{"prompt": chat, "completion": [{"role": "assistant", "content": "It is 18 degrees."}]}]
    for e in [*load_data(str(write(tmp_path / "m.jsonl", TOOL_ROWS))),
              *load_data(str(write(tmp_path / "c.jsonl", completion)))]:
        assert (e.prompt, e.answer, e.context) == ("Weather in Paris?", "It is 18 degrees.", ())
        call, result = e.after
        assert call == {"role": "assistant", "content": "", "tool_calls": [CALL]}  # content null: empty
        assert result["role"] == "tool" and result["content"] == "18 degrees"
        assert {"name", "tool_call_id"} & set(result)
        student, teacher = student_prompt(e), teacher_prompt(e)
        assert student == [{"role": "user", "content": "Weather in Paris?"}, *map(dict, e.after)]
        assert teacher[1:] == student[1:] and teacher[0]["content"].endswith("Problem: Weather in Paris?")


def test_a_template_with_tools_renders_them_and_trains(tiny_model, tmp_path):
    model = with_template(tiny_model, tmp_path / "tools-model", TOOLS_TEMPLATE)
    [e] = load_data(str(write(tmp_path / "t.jsonl", TOOL_ROWS)))
    text = AutoTokenizer.from_pretrained(model).decode(render(AutoTokenizer.from_pretrained(model), student_prompt(e)))
    assert '<tool_call>get_weather{"city": "Paris"}</tool_call>' in text and "18 degrees" in text
    assert text.endswith("<|im_start|>tool\n18 degrees<|im_end|>\n<|im_start|>assistant\n")
    result = train(model, tmp_path / "t.jsonl", tmp_path / "run")
    assert result.exit_code == 0, result.output


def test_a_template_that_drops_tool_calls_is_refused_by_row(tiny_model, tmp_path):
    plain = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    data = write(tmp_path / "t.jsonl", [plain, *TOOL_ROWS])
    out = tmp_path / "run"
    line = one_error(train(tiny_model, data, out))  # the tiny template writes content only
    assert line.startswith(f"error: {data}:2: the chat template does not render tool calls or tool results"), line
    assert not out.exists()


# a template that refuses a conversation

def test_a_template_refusing_a_system_turn_is_one_line_naming_the_row_before_the_model_loads(tiny_model, tmp_path,
                                                                                             monkeypatch):
    from unisd import train as train_module

    model = with_template(tiny_model, tmp_path / "gemma-like", NO_SYSTEM_TEMPLATE)
    data = write(tmp_path / "d.jsonl", [{"prompt": "Hi?", "answer": "Hello."},
                                        {"prompt": [SYSTEM, {"role": "user", "content": "2+2?"}], "answer": "4"}])

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(train_module, "Policy", no_model)
    out = tmp_path / "run"
    line = one_error(train(model, data, out))
    assert line == (f"error: {data}:2: the chat template refuses this conversation (System role not supported) "
                    f"(model {model})")
    assert not out.exists()


# no chat template

def test_without_a_chat_template_turns_are_written_with_their_roles(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    e = Example("What is 2+2?", "4", context=(SYSTEM, {"role": "user", "content": "Hi"},
                                              {"role": "assistant", "content": "Hello"}))
    assert tok.decode(render(tok, student_prompt(e))) == (
        "System:\nYou are terse.\n\nUser:\nHi\n\nAssistant:\nHello\n\nUser:\nWhat is 2+2?\n\nAssistant:\n")
    assert tok.decode(render(tok, "What is 2+2?")) == "What is 2+2?"  # one user turn: raw, as lm-eval prompts it


# the end of a gold completion

def qwen_base_like(tiny_model: Path):
    """The tiny tokenizer with its EOS moved off the template's end of turn (Qwen2.5 base: <|endoftext|>)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.eos_token = "<pad>"
    return tok


def test_gold_completions_end_with_the_templates_end_of_turn(tiny_model):
    tok = qwen_base_like(tiny_model)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert end != tok.eos_token_id and end_of_turn_id(tok) == end
    gold = from_texts(tok, ["It is 4."], 32)
    assert gold.tokens[0, :int(gold.mask[0].sum())].tolist() == tok("It is 4.", add_special_tokens=False)["input_ids"] + [end]
    model = type("M", (), {"generation_config": type("G", (), {"eos_token_id": tok.eos_token_id})()})()
    assert eos_ids(model, tok) == {tok.eos_token_id, end}  # the student's samples stop where the template ends a turn


def test_the_end_of_turn_is_the_eos_without_a_template_or_a_special_end(tiny_model):
    tok = qwen_base_like(tiny_model)
    tok.chat_template = None
    assert end_of_turn_id(tok) == tok.eos_token_id
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"  # plain text
    assert end_of_turn_id(tok) == tok.eos_token_id


def test_render_error_is_a_value_error_with_the_templates_reason(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = NO_SYSTEM_TEMPLATE
    with pytest.raises(RenderError, match=r"^the chat template refuses this conversation \(System role not supported\)$"):
        render(tok, [SYSTEM, {"role": "user", "content": "x"}])


def test_empty_tool_call_lists_are_no_tool_calls_and_malformed_ones_are_named(tmp_path):
    plain = [{"role": "user", "content": "Hi?", "tool_calls": []}, {"role": "assistant", "content": "Hello.", "tool_calls": []}]
    [e] = load_data(str(write(tmp_path / "p.jsonl", [{"messages": plain}])))
    assert (e.prompt, e.answer, e.after) == ("Hi?", "Hello.", ())
    bad = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": None, "tool_calls": ["get_weather"]},
           {"role": "assistant", "content": "x"}]
    with pytest.raises(DataError, match=r"b.jsonl:1: field 'messages' must hold messages .* tool calls with a function name"):
        load_data(str(write(tmp_path / "b.jsonl", [{"messages": bad}])))
    gold_call = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [CALL]}]
    with pytest.raises(DataError, match=r"g.jsonl:1: field 'messages' ends with a tool call; the gold demonstration"):
        load_data(str(write(tmp_path / "g.jsonl", [{"messages": gold_call}])))
