"""unisd.policy: the one owner of the weights. Each form (student, initial model, follower, bf16 sampler,
engine) computes with the weights it should, LoRA merged or switched off, without a whole merged copy."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from unisd import config as cfg
from unisd import models, rollout
from unisd import train as tr
from unisd.sequences import render

pytestmark = pytest.mark.integration


def _run(tiny_model: Path, tiny_data: Path, out: Path, **overrides):
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(out), batch_size=2,
                         max_new_tokens=6, max_steps=2, **overrides)
    return tr.prepare(config, echo=lambda m: None)


@torch.no_grad()
def _perturb_adapter(model: torch.nn.Module) -> None:
    """LoRA's B starts at 0 (adapter off = on); give every adapter weight a value so the forms differ."""
    generator = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def test_lora_weights_are_the_merged_ones_and_the_initial_model_the_base(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8)
    _perturb_adapter(run.policy.model)
    merged = copy.deepcopy(run.policy.model).merge_and_unload().state_dict()
    base = models.load_model(str(tiny_model)).state_dict()
    student, initial = dict(run.policy.student.weights()), dict(run.policy.initial.weights())
    assert student.keys() == initial.keys() == {n for n in base if n != "lm_head.weight"} | (
        {"lm_head.weight"} & set(dict(run.policy.model.named_parameters())))
    for name, w in student.items():
        torch.testing.assert_close(w, merged[name], rtol=0, atol=1e-6)
        assert torch.equal(initial[name], base[name])  # adapter off: the base weights exactly
    assert any(not torch.equal(student[n], base[n]) for n in student)


def test_lora_initial_model_samples_what_the_base_model_samples(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8)
    _perturb_adapter(run.policy.model)
    prompts = [render(run.tokenizer, p) for p in ("What is two plus two?", "Name a colour.")]
    base = models.load_model(str(tiny_model))
    drawn = {}
    for name, draw in {"initial": lambda: run.policy.sample(prompts, 8, 1.0, 1.0, initial=True),
                       "student": lambda: run.policy.sample(prompts, 8, 1.0, 1.0),
                       "base": lambda: rollout.sample(base, run.tokenizer, prompts, 8, 1.0, 1.0)}.items():
        torch.manual_seed(3)
        drawn[name] = draw().tokens
    assert torch.equal(drawn["initial"], drawn["base"])
    assert not torch.equal(drawn["student"], drawn["base"])  # the adapter is on for the student's own samples


def test_bf16_sampler_follows_the_current_weights(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", bf16=True)
    prompts = [render(run.tokenizer, "What is two plus two?")]
    run.policy.sample(prompts, 2, 1.0, 1.0)
    shadow = run.policy._shadow
    with torch.no_grad():  # an optimizer step changes the student; the next rollout must see it
        for p in run.policy.model.parameters():
            p.add_(0.01)
    run.policy.sample(prompts, 2, 1.0, 1.0)
    assert run.policy._shadow is shadow  # built once, refreshed in place
    current = dict(run.policy.model.named_parameters())
    for name, p in shadow.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, current[name].detach().to(torch.bfloat16)), name


class FakeEngine:
    """Records what the policy loads and answers every prompt with two tokens."""

    held = None

    def __init__(self) -> None:
        self.loaded: list[dict[str, torch.Tensor]] = []

    def load(self, weights, label=None):
        self.loaded.append({n: w.clone() for n, w in weights})
        self.held = label

    def generate(self, prompts, max_new_tokens, temperature, top_p, stops, seeds, min_new_tokens, top_k):
        return [[7, min(stops)] for _ in prompts]


def test_the_engine_gets_the_forms_weights_before_each_draw(tiny_model, tiny_data, tmp_path, monkeypatch):
    from unisd import engine as vllm_engine

    monkeypatch.setattr(vllm_engine, "require", lambda: None)
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8, rollout="vllm")
    _perturb_adapter(run.policy.model)
    run.policy._engine = engine = FakeEngine()  # as if vLLM had started
    prompts = [render(run.tokenizer, "What is two plus two?")]
    drawn = run.policy.sample(prompts, 4, 1.0, 1.0)
    run.policy.sample(prompts, 4, 1.0, 1.0, initial=True)
    assert drawn.tokens[0, 0] == 7 and not drawn.truncated[0]
    student, initial = dict(run.policy.student.weights()), dict(run.policy.initial.weights())
    assert [sorted(w) for w in engine.loaded] == [sorted(student)] * 2
    assert all(torch.equal(engine.loaded[0][n], student[n]) for n in student)
    assert all(torch.equal(engine.loaded[1][n], initial[n]) for n in initial)


@pytest.mark.parametrize("lora", [False, True])
def test_a_follower_is_a_frozen_copy_of_the_current_weights(tiny_model, tiny_data, tmp_path, lora):
    adapter = {"lora": True, "lora_r": 4, "lora_alpha": 8} if lora else {}
    run = _run(tiny_model, tiny_data, tmp_path / "out", **adapter)
    if lora:
        _perturb_adapter(run.policy.model)
    trainable = [n for n, _ in run.policy.trainable()]
    follower = run.policy.follower()
    student = dict(run.policy.student.weights())
    copied = dict(follower.weights())
    assert copied.keys() == student.keys() and all(torch.equal(copied[n], student[n]) for n in student)
    assert not any(p.requires_grad for p in follower.parameters())
    assert [n for n, _ in run.policy.trainable()] == trainable  # the optimizer's weights are the same
    if lora:  # a second adapter on the student's own base: no copy of the base
        assert follower.model is run.policy.model
        assert sum(p.numel() for p in follower.parameters()) == sum(p.numel() for _, p in run.policy.trainable())
    else:
        assert all(torch.equal(b, dict(models.base_model(run.policy.model).named_buffers())[n])
                   for n, b in follower.model.named_buffers())  # rotary frequencies come along
    ids = torch.tensor([render(run.tokenizer, "What is two plus two?")])
    positions = torch.arange(ids.shape[1])[None]
    run.policy.model.eval()  # no LoRA dropout: the two must compute the same function
    with torch.no_grad():
        torch.testing.assert_close(follower.hidden(ids, torch.ones_like(ids), positions),
                                   run.policy.student.hidden(ids, torch.ones_like(ids), positions), rtol=1e-5,
                                   atol=1e-5)


def test_a_lora_follower_averages_the_factors_and_leaves_the_student_alone(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8)
    _perturb_adapter(run.policy.model)
    follower = run.policy.follower()
    before = {n: p.detach().clone() for n, p in models.adapter_factors(run.policy.model, "default").items()}
    with torch.no_grad():
        for p in models.adapter_factors(run.policy.model, "default").values():
            p.mul_(3.0)  # the student moves: A and B both triple, so B @ A grows nine-fold
    run.policy.follow_student(follower, 0.5)
    held = dict(follower.own())
    assert held.keys() == before.keys()
    for name, factor in before.items():  # each factor halfway: 0.5·x + 0.5·3x = 2x
        torch.testing.assert_close(held[name], 2.0 * factor)
    base, teacher, student = (dict(m.weights()) for m in (run.policy.initial, follower, run.policy.student))
    scale = 8 / 4
    for key in (k for k in base if k.endswith("q_proj.weight")):  # θ̄ = W + s·(2B)(2A): a product of averages
        module = key.removesuffix(".weight")
        A, B = (before[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
        torch.testing.assert_close(teacher[key], base[key] + scale * 4.0 * (B @ A))
        torch.testing.assert_close(student[key], base[key] + scale * 9.0 * (B @ A))  # streamed side by side


def test_bf16_copies_are_on_with_bf16_and_always_on_cuda():
    from unisd.policy import bf16_copies

    assert bf16_copies(False, torch.device("cuda")) and bf16_copies(True, torch.device("cuda"))
    assert bf16_copies(True, torch.device("cpu")) and not bf16_copies(False, torch.device("cpu"))


def test_the_lora_base_is_held_in_bf16_under_bf16_and_only_the_adapter_in_fp32(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8, bf16=True)
    head = models.base_model(run.policy.model).get_output_embeddings()
    for name, p in run.policy.model.named_parameters():
        if "lora_" in name:
            assert p.dtype == torch.float32 and p.requires_grad, name  # fp32 master weights
        elif name.endswith("proj.weight"):
            assert p.dtype == torch.bfloat16 and not p.requires_grad, name  # as autocast computes them
    assert head.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for _, p in run.policy.trainable())
    run.policy.sample([render(run.tokenizer, "What is two plus two?")], 2, 1.0, 1.0)
    assert run.policy._shadow is None  # the base is bf16 already: no sampling copy


def test_the_final_folder_holds_the_merged_weights_and_the_adapter(tiny_model, tiny_data, tmp_path):
    run = _run(tiny_model, tiny_data, tmp_path / "out", lora=True, lora_r=4, lora_alpha=8)
    _perturb_adapter(run.policy.model)
    weights, adapter = run.policy.gathered()
    out = tmp_path / "final"
    out.mkdir()
    models.save_final(run.policy.model, run.tokenizer, out, "card", {"x": 1}, weights, adapter)
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[n], w) for n, w in weights.items() if n in saved)
    saved_adapter = load_file(str(out / models.ADAPTER / "adapter_model.safetensors"))
    assert len(saved_adapter) == len(adapter) > 0
