"""The hook host: each hook's combination rule, in command-line order, and the plugin named on failure."""
from __future__ import annotations

import pytest
import torch

from unisd.api import Plugin, PluginError, TrainError
from unisd.hooks import Hooks


class Recorder(Plugin):
    """Answers every hook with what it was built with, and records the calls it got."""

    def __init__(self, name: str, calls: list[str], answer: dict | None = None) -> None:
        super().__init__()
        self.name, self.calls, self.answer = name, calls, answer or {}

    def views(self, batch):
        return self.answer.get("views", {})

    def token_loss(self, D, out):
        self.calls.append(f"{self.name}.token_loss")
        return self.answer.get("token_loss", lambda d: d)(D)

    def weights(self, out):
        return self.answer.get("weights")

    def aux_losses(self, out):
        return self.answer.get("aux_losses", {})

    def after_step(self, run):
        self.calls.append(f"{self.name}.after_step")

    def state_dict(self):
        return {"of": self.name}

    def load_state_dict(self, state):
        self.calls.append(f"{self.name}.load:{state['of']}")


class Composing(Recorder):
    """Answers the exclusive hooks only sometimes, so several may be selected together."""

    composes = ("completions", "teacher")

    def completions(self, batch, run):
        self.calls.append(f"{self.name}.completions")
        return self.answer.get("completions")

    def teacher(self, run):
        return self.answer.get("teacher")


def test_completions_come_from_the_first_plugin_that_answers_and_later_ones_are_not_asked():
    calls: list[str] = []
    hooks = Hooks([Composing("a", calls), Composing("b", calls, {"completions": "rollout-b"}),
                   Composing("c", calls, {"completions": "rollout-c"})])
    assert hooks.completions(None, None) == "rollout-b"
    assert calls == ["a.completions", "b.completions"]
    assert Hooks([Composing("a", calls)]).completions(None, None) is None


def test_teacher_is_the_last_answer_and_none_without_one():
    hooks = Hooks([Composing("a", [], {"teacher": "ta"}), Composing("b", []), Composing("c", [], {"teacher": "tc"})])
    assert hooks.teacher(None) == "tc"
    assert Hooks([Composing("a", [])]).teacher(None) is None


def test_token_loss_chains_in_command_line_order():
    calls: list[str] = []
    add = Recorder("add", calls, {"token_loss": lambda d: d + 1})
    double = Recorder("double", calls, {"token_loss": lambda d: d * 2})
    D = torch.tensor([1.0])
    assert float(Hooks([add, double]).token_loss(D, None)) == 4.0
    assert float(Hooks([double, add]).token_loss(D, None)) == 3.0
    assert calls == ["add.token_loss", "double.token_loss", "double.token_loss", "add.token_loss"]


def test_weights_multiply_and_none_means_no_weight():
    w = [torch.tensor([2.0, 1.0]), None, torch.tensor([0.5, 3.0])]
    hooks = Hooks([Recorder(str(i), [], {"weights": x}) for i, x in enumerate(w)])
    assert hooks.weights(None).tolist() == [1.0, 3.0]
    assert Hooks([Recorder("x", [])]).weights(None) is None


def test_views_and_aux_losses_merge_and_after_step_and_state_go_to_each_plugin_in_order():
    calls: list[str] = []
    a = Recorder("a", calls, {"views": {"a:0": ["p"]}, "aux_losses": {"a": torch.tensor(1.0)}})
    b = Recorder("b", calls, {"views": {"b:0": ["q"]}, "aux_losses": {"b": torch.tensor(2.0)}})
    hooks = Hooks([a, b])
    assert hooks.views(None) == {"a:0": ["p"], "b:0": ["q"]}
    assert set(hooks.aux_losses(None)) == {"a", "b"}
    hooks.after_step(None)
    hooks.load_state_dict(hooks.state_dict())
    assert calls == ["a.after_step", "b.after_step", "a.load:a", "b.load:b"]


def test_a_failing_hook_names_its_plugin_and_the_hook():
    class Broken(Plugin):
        def weights(self, out):
            raise KeyError("logps")

    broken = Broken()
    broken.name = "gate"
    with pytest.raises(TrainError, match=r"plugin 'gate' failed in weights: KeyError: 'logps'"):
        Hooks([Recorder("ok", []), broken]).weights(None)


def test_two_teachers_are_refused_when_the_host_is_built():
    class Teacher(Plugin):
        def teacher(self, run):
            return None

    first, second = Teacher(), Teacher()
    first.name, second.name = "t1", "t2"
    with pytest.raises(PluginError, match="plugins 't1' and 't2' both provide the teacher hook"):
        Hooks([first, second])
