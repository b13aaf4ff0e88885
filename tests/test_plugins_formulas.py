"""Each mechanism's formula against hand-computed values, and its gradient through the real reduction."""
from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from unisd import losses
from unisd.data.prompts import TEACHER_TEMPLATE
from unisd.data.verify import final_answer
from unisd.plugin import PluginError, configure
from unisd_plugins.agree import Agree, sequence_weights, token_weights
from unisd_plugins.clip import Clip, clip
from unisd_plugins.contrast import hinge, negative_demo
from unisd_plugins.match import Match, feature_mse


def _out(mask: torch.Tensor, **kw) -> SimpleNamespace:
    return SimpleNamespace(mask=mask, metrics={}, logps=kw.get("logps", {}), hidden=kw.get("hidden", {}),
                           batch=kw.get("batch"))


class CharTokenizer:
    """One token per character, no chat template: prompt lengths are string lengths."""
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(ch) for ch in text]}


# ---------------------------------------------------------------- agree

def test_token_weights_by_hand() -> None:
    # K=2 views, one sequence of 3 tokens: unbiased var of (a, b) = (a-b)^2 / 2
    logps = torch.tensor([[[0.0, -1.0, -2.0]], [[0.0, -3.0, -2.0]]])
    mask = torch.ones(1, 3)
    # δ = [0, 2, 0]; q = quantile_0.95([0, 2, 0]) = 1.8; δ/q = [0, 1.111, 0]
    w = token_weights(logps, mask, gamma=0.5)
    q = 1.8
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0 / (1.0 + 0.5 * 2.0 / q), 1.0]]))
    # the cap bounds δ/q, the floor bounds w
    torch.testing.assert_close(token_weights(logps, mask, gamma=0.5, cap=0.5)[0, 1], torch.tensor(1 / 1.25))
    assert float(token_weights(logps, mask, gamma=1000.0)[0, 1]) == pytest.approx(0.01)
    # range statistic: δ = [0, 2, 0] as well here (two views); with three views it differs from var
    torch.testing.assert_close(token_weights(logps, mask, 0.5, stat="range")[0, 1], w[0, 1])
    three = torch.tensor([[[0.0, 0.0]], [[0.0, -3.0]], [[0.0, 0.0]]])   # unbiased var of (0, -3, 0) = 3; q = max = 3
    torch.testing.assert_close(token_weights(three, torch.ones(1, 2), 1.0, quantile=1.0), torch.tensor([[1.0, 0.5]]))


def test_token_weights_default_to_the_variance_which_ranks_unlike_the_range() -> None:
    logps = torch.tensor([[[0.0, 0.0, 0.0]], [[-1.0, -2.0, -4.0]]])   # K=2 views differing by 1, 2, 4
    mask = torch.ones(1, 3)
    var = torch.tensor([0.5, 2.0, 8.0])                                # unbiased variance of two views: d^2 / 2
    torch.testing.assert_close(token_weights(logps, mask, 1.0, quantile=1.0), 1 / (1 + var[None] / 8.0))
    torch.testing.assert_close(token_weights(logps, mask, 1.0, stat="range", quantile=1.0),
                               1 / (1 + torch.tensor([[1.0, 2.0, 4.0]]) / 4.0))


def test_agree_reports_the_mean_weight_over_counted_tokens_and_sequences() -> None:
    logps = {f"agree:{k}": torch.tensor([[0.0, -2.0 * k, -9.0 * k], [0.0, 0.0, 0.0]]) for k in range(2)}
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])            # row 1 has no completion token
    batch = SimpleNamespace(indices=[0, 1])
    token = Agree(configure(Agree, {"k": "2", "gamma": "1.0", "quantile": "1.0"}, "agree"))
    token.name, token.contexts = "agree", [["a", "b"], ["a", "b"]]
    out = _out(mask, logps=logps, batch=batch)
    w = token.weights(out)
    torch.testing.assert_close(w[0, :2], torch.tensor([1.0, 0.5]))     # δ = (0, 2), q = 2
    assert out.metrics["agree/weight_mean"] == pytest.approx(0.75) and out.metrics["agree/removed"] == pytest.approx(0.25)
    sequence = Agree(configure(Agree, {"k": "2", "gamma": "1.0", "level": "sequence"}, "agree"))
    sequence.name, sequence.contexts = "agree", [["a", "b"], ["a", "b"]]
    out = _out(mask, logps=logps, batch=batch)
    sequence.weights(out)
    # row 0: view means 0 and -1, population variance 0.25; the empty row 1 is not averaged in
    assert out.metrics["agree/weight_mean"] == pytest.approx(math.exp(-0.25))
    ranged = Agree(configure(Agree, {"k": "2", "gamma": "1.0", "level": "sequence", "stat": "range"}, "agree"))
    ranged.name, ranged.contexts = "agree", [["a", "b"], ["a", "b"]]
    out = _out(mask, logps=logps, batch=batch)
    ranged.weights(out)
    assert out.metrics["agree/weight_mean"] == pytest.approx(math.exp(-1.0))   # range of the view means: 1
    empty = _out(torch.zeros(2, 3), logps=logps, batch=batch)
    sequence.weights(empty)
    assert empty.metrics["agree/weight_mean"] == 1.0
    assert token.view_names() == ["agree:0", "agree:1"]
    token.name = ""
    assert token.view_names() == ["agree:0", "agree:1"]                 # unnamed: the plugin's own name


def test_token_weights_quantile_uses_masked_tokens_only() -> None:
    logps = torch.tensor([[[0.0, -1.0, -50.0]], [[0.0, -3.0, 50.0]]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])   # the huge disagreement is on a padding token
    # δ over masked = [0, 2] → q = 1.9
    assert float(token_weights(logps, mask, gamma=1.0)[0, 1]) == pytest.approx(1 / (1 + 2 / 1.9))


def test_sequence_weights_by_hand() -> None:
    logps = torch.tensor([[[-1.0, -1.0], [-1.0, -9.0]],
                          [[-3.0, -3.0], [-1.0, -9.0]]])       # [K=2, B=2, T=2]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    # seq 0: view means -1, -3 → population var 1 ; seq 1: means -1, -1 → var 0
    w = sequence_weights(logps, mask, gamma=0.3)
    torch.testing.assert_close(w, torch.tensor([[math.exp(-0.3)], [1.0]]))
    assert w.shape == (2, 1)
    torch.testing.assert_close(sequence_weights(logps, mask, 0.3, stat="range"), torch.tensor([[math.exp(-0.6)], [1.0]]))


def _grad_of_D(weights: torch.Tensor | None, D: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    D = D.clone().requires_grad_(True)
    losses.weighted_mean(D, mask, weights).backward()
    return D.grad


def test_disagreeing_token_gets_less_gradient() -> None:
    agree = Agree(configure(Agree, {"k": "2", "gamma": "1.0"}))
    agree.name = "agree"
    # token 1 has disagreeing views; tokens 0 and 2 agree
    logps = {"agree:0": torch.tensor([[-1.0, -1.0, -2.0]]), "agree:1": torch.tensor([[-1.0, -4.0, -2.0]])}
    mask = torch.ones(1, 3)
    agree.contexts = [["context 0", "context 1"]]
    out = _out(mask, logps=logps, batch=SimpleNamespace(indices=[0]))
    w = agree.weights(out)
    g = _grad_of_D(w, torch.ones(1, 3), mask)[0]
    assert g[1] < g[0] and g[0] == pytest.approx(float(g[2]))
    # delta = (0, 4.5, 0); q = 0.95-quantile = 4.05; w_1 = 1 / (1 + 4.5 / 4.05)
    w1 = 1 / (1 + 4.5 / 4.05)
    assert out.metrics["agree/weight_mean"] == pytest.approx((2 + w1) / 3)
    assert out.metrics["agree/removed"] == pytest.approx(1 - (2 + w1) / 3)
    assert out.metrics["agree/no_context"] == 0.0


def test_a_row_without_fitting_context_keeps_weight_one_and_stays_out_of_the_quantile() -> None:
    agree = Agree(configure(Agree, {"k": "2", "gamma": "1.0"}))
    agree.name = "agree"
    agree.contexts = [["context 0", "context 1"], []]     # example 1: no context fitted the prompt limit
    logps = {"agree:0": torch.tensor([[-1.0, -1.0, -2.0], [0.0, 0.0, 0.0]]),
             "agree:1": torch.tensor([[-1.0, -4.0, -2.0], [-9.0, -9.0, -9.0]])}
    out = _out(torch.ones(2, 3), logps=logps, batch=SimpleNamespace(indices=[0, 1]))
    w = agree.weights(out)
    assert torch.equal(w[1], torch.ones(3))
    # row 1's large deltas (40.5) would raise the quantile; it is taken over row 0 only, as above
    assert float(w[0, 1]) == pytest.approx(1 / (1 + 4.5 / 4.05))
    assert out.metrics["agree/no_context"] == 0.5


def test_disagreeing_sequence_gets_less_gradient() -> None:
    agree = Agree(configure(Agree, {"k": "3", "gamma": "1.0", "level": "sequence"}))
    agree.name = "agree"
    agreeing, disagreeing = torch.full((1, 2), -1.0), torch.full((1, 2), -1.0)
    logps = {f"agree:{k}": torch.cat([agreeing, disagreeing - k]) for k in range(3)}
    mask = torch.ones(2, 2)
    agree.contexts = [["a", "b", "c"], ["a", "b", "c"]]
    w = agree.weights(_out(mask, logps=logps, batch=SimpleNamespace(indices=[0, 1])))
    g = _grad_of_D(w, torch.ones(2, 2), mask)
    # sequence 1 as a whole counts less than sequence 0: the weight does not cancel in the reduction
    assert float(g[1].sum()) < float(g[0].sum())
    assert float(g[1].sum() / g[0].sum()) == pytest.approx(math.exp(-2 / 3), rel=1e-5)


def test_agree_k1_and_bad_options_are_errors() -> None:
    with pytest.raises(PluginError, match="agree.k must be at least 2"):
        configure(Agree, {"k": "1"}, "agree")
    with pytest.raises(PluginError, match="agree.level must be token or sequence"):
        configure(Agree, {"level": "word"}, "agree")



def test_sequence_weights_average_each_sequence_over_its_own_tokens() -> None:
    # B=2 sequences of T=3 tokens (B != T), one of them a single token; K=3 views
    logps = torch.tensor([[[-1.0, -2.0, -3.0], [-4.0, 0.0, 0.0]],
                          [[-1.0, -2.0, -3.0], [-1.0, 0.0, 0.0]],
                          [[-4.0, -5.0, -6.0], [-1.0, 0.0, 0.0]]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # sequence means per view: seq 0 (-2, -2, -5), seq 1 (-4, -1, -1): range 3 for both, population var 2 for both
    torch.testing.assert_close(sequence_weights(logps, mask, 0.5, stat="range"), torch.full((2, 1), math.exp(-1.5)))
    torch.testing.assert_close(sequence_weights(logps, mask, 0.5), torch.full((2, 1), math.exp(-1.0)))


def test_random_donors_are_distinct_other_examples_cycled_when_too_few() -> None:
    from unisd_plugins._contexts import random_donors

    for i, row in enumerate(random_donors(8, 4, seed=1)):
        assert len(set(row)) == 4 and i not in row and set(row) <= set(range(8))
    for i, row in enumerate(random_donors(3, 5, seed=1)):   # two others exist: both, cycled
        others = sorted({0, 1, 2} - {i})
        assert sorted(set(row)) == others and row == (row[:2] * 3)[:5]
    assert random_donors(8, 4, seed=1) == random_donors(8, 4, seed=1) != random_donors(8, 4, seed=2)


def test_retrieval_donors_rank_by_tfidf_over_one_letter_words_in_any_block_size() -> None:
    from unisd_plugins._contexts import retrieval_donors

    texts = ["x plus y", "x plus z", "a dog b", "a cat b", "a dog b"]   # words of one letter count too
    full = retrieval_donors(texts, 2)
    assert [row[0] for row in full] == [1, 0, 4, 2, 2]                  # a duplicate is nearest; ties by position
    assert all(i not in row for i, row in enumerate(full))
    assert retrieval_donors(texts, 2, block=2) == full                 # similarity rows computed two at a time
    assert retrieval_donors(texts[:2], 3) == [[1, 1, 1], [0, 0, 0]]   # one other example: cycled
    # sublinear term frequency (1 + log tf): a repeated word weighs less than its count (raw counts pick 1)
    assert retrieval_donors(["dog dog cat", "dog bird fish", "cat", "bird fish"], 1)[0] == [2]


def test_retrieval_with_minilm_uses_normalised_sentence_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from unisd_plugins._contexts import retrieval_donors

    calls = []

    class SentenceTransformer:
        def __init__(self, name: str) -> None:
            calls.append(name)

        def encode(self, texts: list[str], normalize_embeddings: bool) -> np.ndarray:
            calls.append((texts, normalize_embeddings))
            return np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], dtype=np.float32)

    monkeypatch.setitem(sys.modules, "sentence_transformers", SimpleNamespace(SentenceTransformer=SentenceTransformer))
    assert retrieval_donors(["a", "b", "c"], 1, backend="minilm") == [[1], [0], [1]]
    assert calls == ["sentence-transformers/all-MiniLM-L6-v2", (["a", "b", "c"], True)]
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)   # not installed
    missing = r"^agree.retriever=minilm needs sentence-transformers: pip install 'unisd\[retrieval\]'$"
    with pytest.raises(RuntimeError, match=missing):
        retrieval_donors(["a", "b"], 1, backend="minilm")


def test_a_donor_is_shown_by_its_instruction_or_its_question_and_options() -> None:
    from unisd.data import Example
    from unisd_plugins._contexts import donor_task

    tool = Example("API docs ... Find a cat.", "Action: search", "", {"instruction": " Find a cat. ", "question": "q"})
    assert donor_task(tool) == "Find a cat."                                   # the instruction, not the API docs
    mc = Example("long prompt", "B", "", {"question": "Where do fish live?", "options": ["land", "water"]})
    assert donor_task(mc) == "Question: Where do fish live?\nOptions:\nA. land\nB. water"
    assert donor_task(Example(" What is 2 + 2? ", "4", "", {"question": "q", "options": []})) == "What is 2 + 2?"
    assert donor_task(Example(" What is 2 + 2? ", "4", "", {"options": ["a", "b"]})) == "What is 2 + 2?"


def test_agree_scores_a_row_without_a_fitting_context_under_its_student_prompt() -> None:
    from unisd.data import Example

    agree = Agree(configure(Agree, {"k": "2"}, "agree"))
    agree.name, agree.contexts = "agree", [["c0", "c1"], []]
    batch = SimpleNamespace(indices=[1, 0], examples=[Example("no context", "x"), Example("with context", "y")])
    assert agree.views(batch) == {"agree:0": ["no context", "c0"], "agree:1": ["no context", "c1"]}


def test_induction_prompt_is_the_meta_prompt_with_numbered_solved_examples() -> None:
    from unisd.data import Example
    from unisd_plugins._contexts import induction_prompt

    demos = [Example("Add 1 and 2.", "3"), Example("Why is the sky blue?", "Scattering", "short waves scatter more")]
    assert induction_prompt(demos) == (
        "Here are solved examples of a task.\n\n"
        "### Example 1\nAdd 1 and 2.\n\nSolved answer:\n3\n\n"
        "### Example 2\nWhy is the sky blue?\n\nSolved answer:\nReasoning: short waves scatter more\nAnswer: Scattering\n\n"
        "Write ONE concise, high-level instruction (3-4 sentences) that would help someone solve new tasks of this kind. "
        "Do NOT mention example-specific details. Reply with the instruction only.")


def test_induction_draws_k_instructions_induced_from_disjoint_sets_of_solved_examples(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from unisd import generation
    from unisd.data import Example
    from unisd_plugins._contexts import INSTRUCTION_HEADER

    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    calls: list[tuple] = []
    replies = ["Add the numbers.", "Carry the tens.", "Check the sum.", "Write digits only."]

    def fake_generate(policy, prompts, max_new_tokens, seed, **kw):
        calls.append((list(prompts), max_new_tokens, seed, policy))
        return [(replies[i % len(replies)], True) for i in range(len(prompts))]

    monkeypatch.setattr(generation, "generate", fake_generate)
    examples = [Example(f"Add {i} and {i}.", str(2 * i)) for i in range(7)]
    policy = _policy()
    run = SimpleNamespace(examples=examples, config=SimpleNamespace(seed=3, model="m"), policy=policy, tokenizer=None)
    agree = Agree(configure(Agree, {"k": "3", "contexts": "induction", "induction_demos": "2",
                                    "induction_tokens": "5"}, "agree"))
    contexts = agree._induced(run, lambda text: True)
    [(prompts, tokens, seed, used)] = calls
    assert (tokens, seed, used) == (5, 3, policy)             # the run's policy samples, with its budget and seed
    assert len(prompts) == 3                                   # 7 // 2 sets of two solved examples
    shown = [[e.prompt for e in examples if f"\n{e.prompt}\n\nSolved answer:\n{e.answer}\n" in p] for p in prompts]
    assert [len(s) for s in shown] == [2, 2, 2] and len({x for s in shown for x in s}) == 6   # disjoint sets
    assert len(contexts) == 7 and all(len(views) == 3 for views in contexts)
    for e, views in zip(examples, contexts):
        assert all(v.startswith(INSTRUCTION_HEADER) and v.endswith(f"\n\n{e.prompt}") for v in views)
        assert all(any(v == f"{INSTRUCTION_HEADER}{r}\n\n{e.prompt}" for r in replies[:3]) for v in views)
    assert any(len(set(views)) > 1 for views in contexts)      # K draws, not one instruction repeated
    [entry] = (tmp_path / "plugins" / "agree").glob("*.json")  # the cache entry records what it depends on
    key = json.loads(entry.read_text())["key"]
    assert set(key) == {"kind", "data", "model", "weights", "seed", "demos", "max", "tokens"}
    assert {k: key[k] for k in ("kind", "model", "seed", "demos", "max", "tokens")} == \
        {"kind": "induction", "model": "m", "seed": 3, "demos": 2, "max": 16, "tokens": 5}
    agree._induced(run, lambda text: True)
    assert len(calls) == 1                                     # cached
    run.config.seed = 4
    agree._induced(run, lambda text: True)
    assert len(calls) == 2                                     # another seed is another pool
    few = SimpleNamespace(**{**vars(run), "examples": examples[:1]})
    agree._induced(few, lambda text: True)
    assert len(calls[-1][0]) == 1 and calls[-1][0][0].count("### Example") == 1   # fewer than a set: one set of all
    monkeypatch.setattr(generation, "generate", lambda *a, **kw: [(" ", True)] * len(a[1]))
    run.config.seed = 5
    with pytest.raises(ValueError, match="^agree: the model induced no usable instruction"):
        agree._induced(run, lambda text: True)


# ---------------------------------------------------------------- contrast

def test_hinge_by_hand() -> None:
    s = torch.tensor([[-1.0, -1.0]])
    pos = torch.tensor([[-1.5, -1.0]])
    neg = torch.tensor([[-4.0, -1.2]])
    # token 0: 0.5 + 0.5 - 3.0 < 0 → 0 ; token 1: 0.5 + 0 - 0.2 = 0.3
    torch.testing.assert_close(hinge(s, pos, neg, 0.5), torch.tensor([[0.0, 0.3]]))


def test_hinge_is_zero_when_the_margin_is_met_and_pushes_toward_the_positive() -> None:
    s = torch.tensor([[-2.0, -2.0]], requires_grad=True)
    pos = torch.tensor([[-1.0, -5.0]])     # positive above the student at token 0, below at token 1
    neg = torch.tensor([[-2.1, -1.9]])
    loss = losses.weighted_mean(hinge(s, pos, neg, 0.5), torch.ones(1, 2))
    loss.backward()
    # gradient descent moves ℓθ toward ℓ⁺: up at token 0, down at token 1
    assert s.grad[0, 0] < 0 and s.grad[0, 1] > 0
    far = torch.tensor([[-1.0]], requires_grad=True)
    met = hinge(far, torch.tensor([[-1.0]]), torch.tensor([[-5.0]]), 0.5)   # 0.5 + 0 - 4 < 0
    assert float(met.detach()) == 0.0
    met.sum().backward()
    assert float(far.grad) == 0.0


def test_contrast_masks_rows_without_negative() -> None:
    from unisd_plugins.contrast import Contrast

    plugin = Contrast(configure(Contrast, {"weight": "2.0", "margin": "0.5"}))
    plugin.name = "contrast"
    plugin.negatives = ["wrong", None]
    mask = torch.ones(2, 1)
    s = torch.tensor([[-1.0], [-1.0]], requires_grad=True)
    out = _out(mask, batch=SimpleNamespace(indices=[0, 1]),
               logps={"student": s, "teacher": torch.tensor([[-1.0], [-1.0]]),
                      "contrast:negative": torch.tensor([[-1.2], [-1.0]])})
    loss = plugin.aux_losses(out)["contrast"]
    assert float(loss.detach()) == pytest.approx(2.0 * 0.3)     # only row 0 counts: 0.5 + 0 - 0.2
    assert out.metrics["contrast/no_negative"] == 0.5
    loss.backward()
    assert float(s.grad[1]) == 0.0


def test_contrast_active_is_the_share_of_counted_tokens_with_a_nonzero_hinge() -> None:
    from unisd_plugins.contrast import Contrast

    plugin = Contrast(configure(Contrast, {"weight": "1.0", "margin": "0.5"}, "c2"))
    plugin.name = "c2"
    plugin.negatives = ["wrong", None]
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    s = torch.zeros(2, 4)
    # row 0 hinges: 0.5 + |0 - 0| - |0 - n|: n = -0.2 -> 0.3, -3 -> 0, -0.4 -> 0.1; the padding token's 0.5 and
    # row 1 (no negative) are not counted
    negative = torch.tensor([[-0.2, -3.0, -0.4, -0.2], [-0.2, -0.2, -0.2, -0.2]])
    out = _out(mask, batch=SimpleNamespace(indices=[0, 1]),
               logps={"student": s, "teacher": torch.zeros(2, 4), "c2:negative": negative})
    loss = plugin.aux_losses(out)["c2"]
    assert out.metrics["c2/active"] == pytest.approx(2 / 3)
    assert float(loss) == pytest.approx((0.3 + 0.0 + 0.1) / 3)
    plugin.name = ""
    out.logps["contrast:negative"] = negative
    assert set(plugin.aux_losses(out)) == {"contrast"}    # unnamed: the term keeps the plugin's own name


def test_mix_base_samples_the_initial_model_with_the_runs_sampling_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from unisd_plugins.mix import Mix

    module = sys.modules[Mix.__module__]
    calls = []
    monkeypatch.setattr(module, "render", lambda tokenizer, text: [len(text)])
    plugin = Mix(configure(Mix, {"source": "base"}, "mix"))
    plugin.setup(SimpleNamespace(config=SimpleNamespace(seed=0)))
    settings = SimpleNamespace(max_new_tokens=7, temperature=0.6, top_p=0.95, top_k=20)
    policy = SimpleNamespace(sample=lambda *a, **kw: calls.append((a, kw)) or "sampled")
    run = SimpleNamespace(tokenizer="tok", config=settings, policy=policy)
    batch = SimpleNamespace(prompts={"student": ["ab", "abc"]}, examples=[])
    assert plugin.completions(batch, run) == "sampled"
    # the initial model (the policy decides how: a frozen copy, or the LoRA student with its adapter off)
    assert calls == [(([[2], [3]], 7, 0.6, 0.95), {"top_k": 20, "initial": True})]


def test_negatives_are_verified_wrong() -> None:
    from unisd.data import Example

    meta = {"gold": "B", "n_options": 2, "options": ["land", "water"], "benchmark": "scienceqa"}
    mc = Example("Where do fish live? A. land B. water", "B", "fish breathe with gills", meta)
    argued = "Fish are often seen near the shore, so the answer is A."
    assert negative_demo(mc, argued, "A") == f"Reasoning: {argued}\nAnswer: A"
    assert negative_demo(mc, "They clearly live on land.", "A") == "Reasoning: They clearly live on land.\nAnswer: A"
    plain = Example("What is two plus two?", "4")
    assert negative_demo(plain, "It is obviously five.\nAnswer: 5", None) == "5"   # the gold shows no reasoning
    assert negative_demo(plain, "Two and two.\nAnswer: 4.", None) is None
    assert negative_demo(plain, "", None) is None
    assert negative_demo(plain, "It is five.", None) is None                      # no Answer line: no answer to check
    capital = Example("What is the capital of France?", "Paris", "it is the seat of government")
    assert negative_demo(capital, "It is Lyon, the old capital.\nAnswer: Lyon", None) == \
        "Reasoning: It is Lyon, the old capital.\nAnswer: Lyon"
    assert negative_demo(capital, "Surely.\nAnswer: Paris", None) is None
    assert final_answer("x\nAnswer: 7\nmore") == "7"
    tool = Example("call it", "Action: a\nAction Input: {}", "",
                   {"benchmark": "toolalpaca", "gold_calls": [{"Action": "a", "Action_Input": {}}]})
    assert negative_demo(tool, "Action: a\nAction Input: {}", None) is None
    assert negative_demo(tool, "Action: b\nAction Input: {}", None) is not None
    assert negative_demo(tool, "I would call b.", None) is None                  # not a ReAct call like the gold


def test_a_multiple_choice_negative_is_checked_on_its_reasoning() -> None:
    from unisd.data import Example

    meta = {"gold": "B", "n_options": 3, "options": ["land", "water", "air"], "benchmark": "cos_e"}
    mc = Example("Where do fish live?", "B", "fish breathe with gills", meta)
    # the letter we assign is wrong, but the argument supports the gold answer: not a wrong demonstration
    assert negative_demo(mc, "Fish need water to breathe, so the answer is B.", "A") is None
    assert negative_demo(mc, "Fish live in water.", "A") is None                  # names the gold option's text
    assert negative_demo(mc, "The answer is C, they fly.", "A") is None           # argues another letter than ours
    assert negative_demo(mc, "Hard to say.", "A") is None                         # argues for nothing checkable
    assert negative_demo(mc, "Fish need water to breathe, so the answer is B.", "B") is None   # the gold is no negative
    gold_only = Example("What is two plus two?", "4", "", {"gold": "4"})   # a gold field alone is not multiple choice
    assert negative_demo(gold_only, "It is five.\nAnswer: 5", None) == "5"
    no_rationale = Example("Where do fish live?", "B", "", meta)
    assert negative_demo(no_rationale, "The answer is A: fish walk.", "A") == "A"  # same format as the gold "B"


def test_a_code_negative_is_bare_code_like_the_positive_and_must_run() -> None:
    from unisd.data import Example

    meta = {"benchmark": "mbpp", "tests": ["assert add(1, 2) == 3"], "entry_point": "add"}
    mbpp = Example("Write add(a, b).", "def add(a, b):\n    return a + b", "", meta)
    buggy = "def add(a, b):\n    return a - b"
    assert negative_demo(mbpp, f"```python\n{buggy}\n```", None) == buggy        # no fenced block, as the gold
    assert negative_demo(mbpp, "```python\ndef add(a, b):\n    return a + b\n```", None) is None  # passes: not wrong
    assert negative_demo(mbpp, "```python\ndef add(a, b):\n    return (a +\n```", None) is None  # not a program


def test_replies_cut_off_at_the_length_limit_are_counted_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import unisd.generation as C
    from unisd.data import Example
    from unisd_plugins.contrast import build_negatives

    plain = [Example("What is two plus two?", "4"), Example("What is one plus one?", "2")]
    replies = iter([[("It is five.\nAnswer: 5", True), ("It is three.\nAnswer: ", False)],
                    [("It is three.\nAnswer: 3", False)]])
    monkeypatch.setattr(C, "generate", lambda *a, **k: next(replies))
    found = build_negatives(None, plain, seed=0, max_new_tokens=8, tries=2)
    assert found.demos == ["5", None]        # the unfinished reply is never taken as wrong, on either try
    assert (found.cut_off, found.not_wrong) == (2, 0)

def test_negative_requests_ask_for_a_mistake_each_checker_can_verify() -> None:
    import random

    from unisd.data import Example
    from unisd_plugins.contrast import BUGS, TOOL_CORRUPTIONS, negative_request

    meta = {"gold": "B", "n_options": 3, "options": ["land", "water", "air"], "benchmark": "cos_e"}
    mc = Example("Where do fish live?", "B", "gills", meta)
    letters = set()
    for seed in range(30):
        prompt, letter = negative_request(mc, random.Random(seed))
        letters.add(letter)
        option = meta["options"]["ABC".index(letter)]
        assert prompt == ("You are simulating a confident student who made a mistake.\n\nWhere do fish live?\n\n"
                          f"Argue convincingly, in 2-4 sentences, that the answer is {letter} ({option}). "
                          "Reply with the argument only.")
    assert letters == {"A", "C"}                                        # every wrong option, never the gold
    bare = Example("Where do fish live?", "B", "", {"gold": "B", "n_options": 2})   # options not shown
    assert negative_request(bare, random.Random(0)) == (
        "You are simulating a confident student who made a mistake.\n\nWhere do fish live?\n\n"
        "Argue convincingly, in 2-4 sentences, that the answer is A. Reply with the argument only.", "A")
    code = Example("Write add(a, b).", "def add(a, b): ...", "", {"benchmark": "mbpp"})
    prompt, extra = negative_request(code, random.Random(0))
    bug = random.Random(0).choice(BUGS)
    assert extra is None and prompt == (f"Write add(a, b).\n\nWrite a Python solution that LOOKS correct but has a {bug}, "
                                        "so that it fails at least one test. Reply with one ```python code block only.")
    tool = Example("Find a cat.", "Action: search", "", {"benchmark": "toolalpaca"})
    prompt, extra = negative_request(tool, random.Random(0))
    corruption = random.Random(0).choice(TOOL_CORRUPTIONS)
    assert extra is None and prompt == ("Find a cat.\n\nA correct response is:\nAction: search\n\nWrite a plausible but "
                                        f"WRONG response in the same format, with a {corruption}.")
    plain = Example("What is two plus two?", "4")
    assert negative_request(plain, random.Random(0)) == (
        "What is two plus two?\n\nEnd with a final line 'Answer: <your answer>'.", None)


def test_build_negatives_asks_each_example_its_seeded_request_and_checks_the_reply(monkeypatch: pytest.MonkeyPatch) -> None:
    import random

    import unisd.generation as G
    from unisd.data import Example
    from unisd_plugins.contrast import build_negatives, negative_request

    meta = {"gold": "B", "n_options": 2, "options": ["land", "water"], "benchmark": "cos_e"}
    mc = [Example(f"Where do fish {verb}?", "B", "gills", meta) for verb in ("live", "sleep", "swim")]
    calls = []

    def fake_generate(policy, prompts, max_new_tokens, seed, desc=""):
        calls.append((prompts, max_new_tokens, seed, policy))
        if len(calls) == 1:   # cut off, argues the gold, argues the assigned wrong option
            return [("Fish live on land, so A.", False), ("They need water, B.", True), ("On land, so the answer is A.", True)]
        return [("It is A, they walk on land.", True)] * len(prompts)

    monkeypatch.setattr(G, "generate", fake_generate)
    policy = object()
    found = build_negatives(policy, mc, seed=5, max_new_tokens=64, tries=3)
    assert [c[0] for c in calls] == [[negative_request(mc[i], random.Random(f"5:{attempt}:{i}"))[0] for i in todo]
                                     for attempt, todo in ((0, [0, 1, 2]), (1, [0, 1]))]
    assert [c[1:] for c in calls] == [(64, 5, policy), (64, 6, policy)]   # budget, seed + attempt, the run's policy
    assert found.demos == ["Reasoning: It is A, they walk on land.\nAnswer: A"] * 2 + \
        ["Reasoning: On land, so the answer is A.\nAnswer: A"]
    assert (found.cut_off, found.not_wrong) == (1, 1)                    # a third try is not needed


def _policy() -> SimpleNamespace:
    """What a plugin's setup reads of the policy: the student's weights (the same on every call: a cache key
    holds their digest)."""
    return SimpleNamespace(student=SimpleNamespace(weights=lambda: iter([("weight", torch.zeros(2, 2))])))


def _contrast_run(examples: list, limit: int) -> SimpleNamespace:
    return SimpleNamespace(examples=examples, scheduled=lambda: list(range(len(examples))), policy=_policy(),
                           tokenizer=CharTokenizer(),
                           config=SimpleNamespace(seed=0, model="m", max_prompt_tokens=limit,
                                                  teacher_template=TEACHER_TEMPLATE))


def test_contrast_setup_caches_checked_negatives_and_drops_those_too_long(monkeypatch: pytest.MonkeyPatch, tmp_path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    import unisd.generation as G
    from unisd.data import Example
    from unisd.data.prompts import teacher_prompt
    from unisd_plugins.contrast import Contrast

    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    calls = []
    long_reasoning = "It is " + "very " * 200 + "seven."

    def fake_generate(policy, prompts, max_new_tokens, seed, desc=""):
        calls.append(max_new_tokens)
        return [("It is five.\nAnswer: 5", True), (f"{long_reasoning}\nAnswer: 7", True), ("Two and two.\nAnswer: 4", True)]

    monkeypatch.setattr(G, "generate", fake_generate)
    examples = [Example(f"What is {q}?", "4", "two and two make four") for q in ("two plus two", "2 + 2", "4 - 0")]
    plugin = Contrast(configure(Contrast, {"max_new_tokens": "32", "tries": "1"}, "contrast"))
    plugin.name = "contrast"
    plugin.setup(_contrast_run(examples, limit=200))
    assert calls == [32]
    assert plugin.negatives == ["Reasoning: It is five.\nAnswer: 5", None, None]   # too long for 200 tokens; not wrong
    assert len(teacher_prompt(examples[0], demo=plugin.negatives[0])) <= 200
    assert ("warning: contrast: 2 of 3 examples have no verified-wrong negative (0 replies cut off at 32 tokens, "
            "1 not confirmed wrong, 1 too long for --max-prompt-tokens 200)") in capsys.readouterr().err
    [entry] = (tmp_path / "plugins" / "contrast").glob("*.json")   # the cache entry records what it depends on
    key = json.loads(entry.read_text())["key"]
    assert set(key) == {"kind", "data", "model", "weights", "seed", "tokens", "tries"}
    assert {k: key[k] for k in ("kind", "model", "seed", "tokens", "tries")} == \
        {"kind": "negatives-v4", "model": "m", "seed": 0, "tokens": 32, "tries": 1}
    plugin.setup(_contrast_run(examples, limit=10_000))
    assert len(calls) == 1                                                          # cached
    assert plugin.negatives[1] == f"Reasoning: {long_reasoning}\nAnswer: 7"       # fits a larger limit


def test_contrast_views_show_the_teacher_each_negative_or_else_the_gold() -> None:
    from unisd.data import Example
    from unisd.data.prompts import teacher_prompt
    from unisd_plugins.contrast import Contrast

    plugin = Contrast(configure(Contrast, {}, "c2"))
    plugin.name = "c2"
    examples = [Example("What is two plus two?", "4"), Example("What is one plus one?", "2")]
    plugin.negatives = [None, "5", "3"]
    batch = SimpleNamespace(indices=[2, 0], examples=examples)
    assert plugin.views(batch) == {"c2:negative": [teacher_prompt(examples[0], demo="3"), teacher_prompt(examples[1])]}


# ---------------------------------------------------------------- match

def test_feature_mse_by_hand() -> None:
    hs = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    ht = torch.tensor([[[0.0, 0.0], [0.0, 4.0]]])
    torch.testing.assert_close(feature_mse(hs, ht), torch.tensor([[2.5, 8.0]]))
    plugin = Match(configure(Match, {"weight": "0.1"}))
    plugin.name = "match"
    loss = plugin.aux_losses(_out(torch.tensor([[1.0, 0.0]]), hidden={"student": hs, "teacher": ht}))["match"]
    assert float(loss) == pytest.approx(0.25)   # the padding token does not count


def test_match_repr_ignores_the_divergence() -> None:
    D = torch.rand(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    repr_plugin = Match(configure(Match, {"mode": "repr"}))
    assert repr_plugin.objective == "none"  # declared, so the trainer's one objective switch decides
    repr_loss = losses.objective(repr_plugin.objective, D, torch.zeros(2, 3))
    assert torch.equal(repr_loss, torch.zeros(2, 3)) and not repr_loss.requires_grad  # no path back to D
    plugin = Match(configure(Match, {"mode": "joint"}))
    assert plugin.objective is None
    losses.weighted_mean(plugin.token_loss(D, _out(mask)), mask).backward()
    torch.testing.assert_close(D.grad, torch.full((2, 3), 1 / 6))  # joint keeps D: the mean of 6 tokens
    hs = torch.zeros(1, 1, 2, requires_grad=True)
    plugin.aux_losses(_out(torch.ones(1, 1), hidden={"student": hs, "teacher": torch.ones(1, 1, 2)}))["match"].backward()
    assert (hs.grad < 0).all()   # pulled toward the teacher


# ---------------------------------------------------------------- clip

def test_clip_by_hand_and_zero_gradient_above_the_cap() -> None:
    D = torch.tensor([[1.0, 12.0, 3.0]], requires_grad=True)
    mask = torch.ones(1, 3)
    clipped, kappa = clip(D, mask, max=10.0)
    assert kappa == 10.0
    torch.testing.assert_close(clipped, torch.tensor([[1.0, 10.0, 3.0]]))
    losses.weighted_mean(clipped, mask).backward()
    assert D.grad[0, 1] == 0.0 and D.grad[0, 0] > 0 and D.grad[0, 2] > 0
    # quantile wins over max: κ = median of [1, 12, 3] = 3
    clipped, kappa = clip(D, mask, max=10.0, quantile=0.5)
    assert kappa == 3.0 and clipped.tolist() == [[1.0, 3.0, 3.0]]
    assert clip(D, mask, max=None)[0] is D


def test_clip_plugin_logs_its_rate() -> None:
    plugin = Clip(configure(Clip, {"max": "2"}))
    plugin.name = "clip"
    out = _out(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    plugin.token_loss(torch.tensor([[1.0, 5.0, 3.0, 9.0]]), out)
    assert out.metrics["clip/rate"] == pytest.approx(2 / 3)   # the padding token is not counted
    with pytest.raises(PluginError, match="clip.quantile"):
        configure(Clip, {"quantile": "1.5"}, "clip")
    assert configure(Clip, {"max": "none"}, "clip").max is None
    adaptive = Clip(configure(Clip, {"quantile": "0.5"}, "clip"))   # κ = the batch's median D, over masked tokens
    adaptive.name = "clip"
    out = _out(torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(adaptive.token_loss(torch.tensor([[1.0, 5.0, 3.0, 9.0]]), out),
                               torch.tensor([[1.0, 3.0, 3.0, 3.0]]))
    assert out.metrics["clip/kappa"] == 3.0 and out.metrics["clip/rate"] == pytest.approx(1 / 3)
    one = _out(torch.tensor([[1.0, 0.0]]))   # one counted token, above the cap
    plugin.token_loss(torch.tensor([[5.0, 0.0]]), one)
    assert one.metrics["clip/rate"] == 1.0


# ---------------------------------------------------------------- mix

def test_mix_state_round_trip_continues_the_same_draws(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from unisd_plugins.mix import Mix

    monkeypatch.setattr(sys.modules[Mix.__module__], "from_texts", lambda *a: "gold completions")

    def mix(seed: int) -> Mix:
        plugin = Mix(configure(Mix, {"prob": "0.5"}, "mix"))
        plugin.setup(SimpleNamespace(config=SimpleNamespace(seed=seed)))
        return plugin

    batch = SimpleNamespace(examples=[])
    run = SimpleNamespace(tokenizer=None, config=SimpleNamespace(max_new_tokens=4))
    first = mix(1)
    torch.manual_seed(0)
    drawn = [first.completions(batch, run) for _ in range(5)]
    after = torch.rand(())
    torch.manual_seed(0)
    assert after == torch.rand(())   # drawn with its own generator: the global RNG is untouched
    assert set(drawn) == {None, "gold completions"}
    resumed = mix(2)
    resumed.load_state_dict(first.state_dict())
    later = [[p.completions(batch, run) is not None for _ in range(20)] for p in (first, resumed)]
    assert later[0] == later[1] and 0 < sum(later[0]) < 20


def test_ema_needs_setup():
    from unisd_plugins import ema as ema_module
    plugin = ema_module.EMA()
    with pytest.raises(AssertionError, match="^ema: setup was not called$"):
        plugin.state_dict()


@pytest.mark.parametrize("contexts", ["random", "retrieval", "induction"])
def test_agree_setup_picks_the_first_k_fitting_contexts_of_each_examples_ranked_donors(
        contexts: str, monkeypatch: pytest.MonkeyPatch, tmp_path, capsys) -> None:
    from unisd.data import Example
    from unisd.sequences import render
    from unisd_plugins import _contexts as C

    from unisd import generation

    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    examples = [Example(f"Add {i} and {i + 1} apples.", str(2 * i + 1)) for i in range(7)]
    examples[3] = Example("Add " + "many " * 60 + "apples.", "0")  # every context of it is too long
    tok = CharTokenizer()
    # the limit is the longest context of two short examples (262 to 264 tokens): it fits, 554 does not
    limit = max(len(render(tok, C.reference_context(e, d))) for e in examples for d in examples if 3 not in
                (examples.index(e), examples.index(d)))
    run = SimpleNamespace(examples=examples, config=SimpleNamespace(seed=2, max_prompt_tokens=limit, model="m", teacher_template=TEACHER_TEMPLATE),
                          tokenizer=tok, world="the run's", policy=_policy())
    agree = Agree(configure(Agree, {"k": "2", "contexts": contexts}, "agree"))
    agree.name = "agree"  # what the plugin host names it
    if contexts == "induction":  # setup hands induction the same fitting test
        monkeypatch.setattr(generation, "generate", lambda *a, **kw: [("Add them.", True)] * len(a[1]))
        agree.setup(run)
        assert agree.world == "the run's" and agree.contexts == agree._induced(run, lambda t: len(render(tok, t)) <= limit)
        agree.setup(SimpleNamespace(**{**vars(run), "examples": examples[:1]}))  # one example is enough to induce
        return
    agree.setup(run)
    assert agree.world == "the run's"
    pool = min(len(examples) - 1, 4 * 2)  # four ranked candidates per view, at most every other example
    donors = (C.random_donors(7, pool, 2) if contexts == "random"
              else C.retrieval_donors([C.donor_task(e) for e in examples], pool, "tfidf"))
    fitting = [[C.reference_context(e, examples[j]) for j in ranked
                if len(render(tok, C.reference_context(e, examples[j]))) <= limit] for e, ranked in zip(examples, donors)]
    assert agree.contexts[3] == [] and all(len(views) == 2 for i, views in enumerate(agree.contexts) if i != 3)
    assert agree.contexts == [found[:2] for found in fitting]
    assert any(len(found) < len(ranked) for found, ranked in zip(fitting, donors) if found)  # some donors gave way
    assert capsys.readouterr().err == (f"warning: agree: 1 of 7 examples have no auxiliary context within "
                                       f"--max-prompt-tokens {limit}; they keep weight 1 (metric agree/no_context)\n")
    if contexts == "retrieval":  # the ranking is cached under everything it depends on
        [entry] = (tmp_path / "plugins" / "agree").glob("*.json")
        key = json.loads(entry.read_text())["key"]
        assert {k: v for k, v in key.items() if k != "data"} == {"kind": "retrieval-v2", "pool": 6, "retriever": "tfidf"}
        assert key["data"] == generation.data_digest(examples)
    with pytest.raises(ValueError, match="^agree needs at least 2 examples: a context shows a solved"):
        agree.setup(SimpleNamespace(**{**vars(run), "examples": examples[:1]}))
    agree.setup(SimpleNamespace(**{**vars(run), "examples": examples[:2]}))  # two are enough
