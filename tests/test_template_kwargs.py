"""--chat-template-kwargs / --teacher-chat-template-kwargs: a thinking-style template rendered with the variables
wherever unisd renders a prompt (student, teacher, rollouts) and in evaluation; recorded in unisd.json."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from transformers import AutoTokenizer

from unisd import config as cfg
from unisd import evaluate
from unisd.cli import main
from unisd.sequences import render
from unisd.train import make_batch, prepare, train

# Qwen3-style: the generation prompt closes an empty think block when thinking is switched off
THINKING = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n"
            "{% if enable_thinking is defined and enable_thinking is false %}no thinking\n{% endif %}{% endif %}")


@pytest.fixture
def thinking_model(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "thinking"
    shutil.copytree(tiny_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = THINKING
    tokenizer.save_pretrained(folder)
    return folder


def _text(tokenizer: Any, prompt: Any) -> str:
    return tokenizer.decode(render(tokenizer, prompt))


def test_student_and_teacher_prompts_render_with_their_own_variables(thinking_model: Path, tiny_data: Path,
                                                                    tmp_path: Path) -> None:
    config = cfg.resolve("", (), {}, model=str(thinking_model), data=str(tiny_data), out=str(tmp_path / "run"),
                         batch_size=2, max_new_tokens=4, max_steps=1,
                         chat_template_kwargs='{"enable_thinking": false}',
                         teacher_chat_template_kwargs='{"enable_thinking": true}')
    run = prepare(config, echo=lambda m: None)
    batch = make_batch(run)
    student = _text(run.tokenizer, batch.prompts["student"][0])
    teacher = _text(run.teacher_tokenizer, batch.prompts["teacher"][0])
    assert student.endswith("assistant\nno thinking\n") and "no thinking" not in teacher
    plain = AutoTokenizer.from_pretrained(thinking_model)
    assert "no thinking" not in _text(plain, batch.prompts["student"][0])  # the loaded tokenizer is left as it was
    same = cfg.resolve("", (), {}, model=str(thinking_model), data=str(tiny_data), out="unused",
                       chat_template_kwargs='{"enable_thinking": false}')
    assert same.template_kwargs(teacher=True) == {"enable_thinking": False}  # the teacher's default: the student's


def test_a_run_records_the_variables(thinking_model: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = cfg.resolve("", (), {}, model=str(thinking_model), data=str(tiny_data), out=str(tmp_path / "run"),
                         batch_size=2, max_new_tokens=4, max_steps=1, chat_template_kwargs='{"enable_thinking": false}')
    out = train(config, echo=lambda m: None)
    assert json.loads((out / "unisd.json").read_text())["config"]["chat_template_kwargs"] == '{"enable_thinking": false}'


@pytest.mark.parametrize("value", ["{not json", "[1, 2]"])
def test_a_value_that_is_not_a_json_object_is_one_line(tiny_data: Path, tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(main, ["train", "--model", "smollm2-135m", "--data", str(tiny_data), "--out",
                                       str(tmp_path / "o"), "--chat-template-kwargs", value])
    assert result.exit_code == 2 and result.output.startswith("error: --chat-template-kwargs must be a JSON object")
    assert result.output.count("\n") == 1 and not (tmp_path / "o").exists()


def test_evaluation_passes_the_variables_to_lm_eval(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(**kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return {}

    monkeypatch.setattr("lm_eval.simple_evaluate", fake)
    evaluate.run_lm_eval(str(tiny_model), ["unisd_demo"], 1, [], 1, template_kwargs={"enable_thinking": False})
    assert seen["model_args"]["chat_template_args"] == {"enable_thinking": False}
    assert seen["model_args"]["pretrained"] and seen["apply_chat_template"] is True
    evaluate.run_lm_eval(str(tiny_model), ["unisd_demo"], 1, [], 1)
    assert isinstance(seen["model_args"], str)  # without variables, lm-eval's usual string
