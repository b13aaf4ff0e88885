"""The `reward` plugin: a verifier's reward as a policy-gradient term, its gradient by hand, group-normalised
advantages with several samples per prompt, a batch-mean baseline with one, and a run that trains with it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from unisd import config as cfg
from unisd.data import Example
from unisd.train import train
from unisd_plugins.reward import advantages, policy_gradient, verified, verifier_of


def test_advantages_are_group_normalised_or_against_the_batch_mean() -> None:
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    groups = [7, 7, 7, 7, 3, 3]  # a prompt sampled 4 times, another twice
    a = advantages(rewards, groups)
    first = rewards[:4]
    assert torch.allclose(a[:4], (first - first.mean()) / (first.std() + 1e-6))
    assert torch.equal(a[4:], torch.zeros(2))  # siblings that agree carry no signal
    single = advantages(torch.tensor([1.0, 0.0, 0.0]), [0, 1, 2])
    assert torch.allclose(single, torch.tensor([2 / 3, -1 / 3, -1 / 3]))


def test_the_policy_gradient_term_by_hand() -> None:
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -4.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    advantage = torch.tensor([2.0, -1.0])
    loss = policy_gradient(logps, mask, advantage)
    expected = -((2.0 * (-3.0 / 2)) + (-1.0 * (-5.0 / 3))) / 2
    assert loss.item() == pytest.approx(expected)
    loss.backward()
    # d/d logp_it = -A_i m_it / (n_i R): raise the log-prob of rewarded samples, lower the others'
    by_hand = torch.tensor([[-2.0 / 2 / 2, -2.0 / 2 / 2, 0.0], [1.0 / 3 / 2, 1.0 / 3 / 2, 1.0 / 3 / 2]])
    assert torch.allclose(logps.grad, by_hand)


def test_the_verifier_is_the_benchmarks_own_or_the_final_answer() -> None:
    demo = Example("What is 12 + 30?", "42", meta={"benchmark": "demo", "number": "42"})
    assert verified(demo, "Reasoning: ...\nAnswer: 42") == 1.0 and verified(demo, "Answer: 41") == 0.0
    own = Example("Capital of France?", "Paris")
    assert verified(own, "I think so.\nAnswer: paris.") == 1.0 and verified(own, "Answer: Lyon") == 0.0
    assert verifier_of("auto") is verified
    with pytest.raises(ValueError, match="module:function"):
        verifier_of("no.such.module:f")


def test_a_run_trains_with_the_reward_term(tiny_model: Path, tiny_data: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path / "cache"))
    config = cfg.resolve("", ("reward",), {"reward": {"weight": "0.5"}}, model=str(tiny_model), data=str(tiny_data),
                         out=str(tmp_path / "run"), batch_size=2, num_generations=2, max_new_tokens=5, max_steps=2,
                         lr=1e-3)
    out = train(config, echo=lambda m: None)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("reward" in r and "reward/mean" in r and 0.0 <= r["reward/mean"] <= 1.0 for r in rows)
    assert all(r["loss"] == pytest.approx(r["distill"] + r["reward"]) for r in rows)


def test_siblings_accepted_by_the_verifier_are_shown_to_the_teacher() -> None:
    from unisd_plugins.sibling import accepted_siblings

    groups = [5, 5, 5, 9, 9]
    assert accepted_siblings(groups, [False, True, True, False, False]) == [1, 2, 1, None, None]


def test_a_run_whose_teacher_sees_accepted_siblings(tiny_model: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Every completion accepted (a verifier that accepts anything): each row's teacher prompt is its sibling's
    completion in the teacher template, never the gold demonstration."""
    from unisd.data.prompts import teacher_prompt
    from unisd.sequences import render
    from unisd.train import make_batch, prepare

    monkeypatch.setenv("UNISD_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "answer": w}) + "\n" for w in ("yes", "no", "maybe")))
    accept_all = {"sibling": {"verifier": "operator:ne"}}  # example != text: every completion accepted
    config = cfg.resolve("", ("sibling",), accept_all, model=str(tiny_model),
                         data=str(data), out=str(tmp_path / "run"), batch_size=1, num_generations=2, max_new_tokens=5,
                         max_steps=1)
    run = prepare(config, echo=lambda m: None)
    batch = make_batch(run)
    rollout = run.policy.sample([render(run.tokenizer, p) for p in batch.prompts["student"]], 5, 1.0, 1.0)
    batch.tokens, batch.mask = rollout.tokens, rollout.mask
    shown = run.hooks.views(batch)["teacher"]
    texts = [run.tokenizer.decode(r[:int(n)].tolist(), skip_special_tokens=True)
             for r, n in zip(rollout.tokens, rollout.mask.sum(-1))]
    example = batch.examples[0]
    assert shown == [teacher_prompt(example, texts[1], template=config.teacher_template),
                     teacher_prompt(example, texts[0], template=config.teacher_template)]
