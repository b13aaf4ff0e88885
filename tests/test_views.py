"""The no-grad views run grouped by length, a repeated row once: the same log-probs as one padded batch."""
from __future__ import annotations

import torch

from unisd import config as cfg, losses, train as tr, views
from unisd.data import Example
from unisd.data.prompts import student_prompt, teacher_prompt
from unisd.sequences import render


def test_a_repeated_row_is_run_once_and_groups_hold_rows_of_similar_length():
    prompts = [[1] * 10, [1] * 10, [2] * 30, [3] * 29, [1] * 10, [4] * 12]   # row r scores completion r % 2
    plan = views.by_length(prompts, completions=2, width=4, slack=0.1)
    assert plan.source == [0, 1, 2, 3, 0, 5]   # row 4 repeats row 0; row 1 has its prompt but another completion
    assert plan.groups == [[2, 3], [5], [0, 1]]   # longest first; 12 + 4 is under 0.9 of 30 + 4, 10 + 4 of 12 + 4
    for group in plan.groups:
        widest = len(prompts[group[0]]) + 4
        assert all(len(prompts[r]) + 4 >= 0.9 * widest for r in group)
    assert views.by_length(prompts, 2, 4, slack=1.0).groups == [[2, 3, 5, 0, 1]]  # any padding allowed: one group
    assert views.one_batch(3) == views.Plan([[0, 1, 2]], [0, 1, 2])


def test_grouped_views_give_the_log_probs_of_one_padded_batch(tiny_model, tiny_data, tmp_path):
    config = cfg.resolve("", (), {}, model=str(tiny_model), data=str(tiny_data), out=str(tmp_path / "out"),
                         max_steps=2, batch_size=2, max_new_tokens=8)
    run = tr.prepare(config)
    examples = [Example("What is two plus two?", "4", "two and two"),
                Example("Name a colour of the sky, please, in one word only and nothing else.", "blue", "it scatters blue")]
    prompts = [student_prompt(e) for e in examples] + [teacher_prompt(e) for e in examples] \
        + [teacher_prompt(e, "a much longer wrong demonstration " * 6) for e in examples] + [student_prompt(examples[0])] * 2
    rows = [render(run.tokenizer, p) for p in prompts]
    tokens = torch.tensor([[40, 41, 42, 43, 44, 45], [50, 51, 52, 0, 0, 0]])
    mask = torch.tensor([[1.0] * 6, [1.0] * 3 + [0.0] * 3])
    teacher = run.policy.initial
    encode, head, pad = teacher.hidden, teacher.head, run.tokenizer.pad_token_id
    plan = views.by_length(rows, 2, 6)
    assert len(plan.groups) > 1 and len(set(plan.source)) < len(rows)   # the test exercises both savings
    with torch.no_grad():
        plain = views.hidden(encode, rows, tokens, mask, pad, views.one_batch(len(rows)))
        grouped = views.hidden(encode, rows, tokens, mask, pad, plan)
    where = mask.bool().repeat(len(rows) // 2, 1)
    sampled = tokens.repeat(len(rows) // 2, 1)[where]
    lp_plain = losses.logprobs_in_chunks(head, plain[where], sampled)
    lp_grouped = losses.logprobs_in_chunks(head, grouped[where], sampled)
    torch.testing.assert_close(lp_grouped, lp_plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(lp_plain[:9], lp_plain[9:18])  # different prompts: the rows are not all one


def test_no_forward_runs_more_than_size_rows() -> None:
    """The no-grad views run at most B rows a forward (memory of the student's batch, whatever the plugins add),
    in order under FSDP (every rank the same forwards) and by length otherwise; every row is still scored."""
    prompts = [[1] * n for n in (5, 5, 5, 5, 5, 4, 4, 3)]
    plan = views.by_length(prompts, completions=2, width=4, slack=1.0, size=3)
    assert all(len(g) <= 3 for g in plan.groups) and sorted(sum(plan.groups, [])) == sorted(set(plan.source))
    assert views.by_length(prompts, 2, 4, slack=1.0).groups == [sorted(set(plan.source), key=lambda r: -len(prompts[r]))]
    assert views.one_batch(7, 3) == views.Plan([[0, 1, 2], [3, 4, 5], [6]], list(range(7)))
