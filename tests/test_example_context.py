"""An example's context (system prompt, earlier turns, tool turns) reaches every cache key and every prompt
a plugin builds for it; agree never shows an example its own duplicate."""
from __future__ import annotations

import random
from types import SimpleNamespace

import torch

from unisd import generation
from unisd.checkpoint import data_fingerprint
from unisd.data import Example
from unisd.data.prompts import TEACHER_TEMPLATE
from unisd.plugin import configure
from unisd_plugins import _contexts as C
from unisd_plugins import contrast
from unisd_plugins.agree import Agree

SYSTEM = {"role": "system", "content": "Answer in French."}
OTHER = {"role": "system", "content": "Answer in German."}
TOOL = {"role": "tool", "content": "18 degrees"}


class CharTokenizer:
    """One token per character, no chat template."""
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(ch) for ch in text]}


def test_the_data_digest_and_fingerprint_tell_contexts_apart():
    plain, french, german = Example("Q?", "A"), Example("Q?", "A", context=(SYSTEM,)), Example("Q?", "A", context=(OTHER,))
    after = Example("Q?", "A", after=(TOOL,))
    digests = {generation.data_digest([e]) for e in (plain, french, german, after)}
    assert len(digests) == 4
    fingerprints = {data_fingerprint(SimpleNamespace(examples=[e])) for e in (plain, french, german, after)}
    assert len(fingerprints) == 4


def test_contrast_asks_for_a_negative_after_the_examples_earlier_turns(monkeypatch):
    asked = []

    def generate(policy, prompts, *args, **kwargs):
        asked.extend(prompts)
        return [("Answer: 5", True)] * len(prompts)

    monkeypatch.setattr(generation, "generate", generate)
    earlier = (SYSTEM, {"role": "user", "content": "Let us add."}, {"role": "assistant", "content": "Sure."})
    examples = [Example("What is 2+2?", "4", context=earlier), Example("What is 3+3?", "6")]
    found = contrast.build_negatives(None, examples, seed=0, max_new_tokens=16, tries=1)
    assert found.demos == ["5", "5"]
    request = contrast.negative_request(examples[0], random.Random("0:0:0"))[0]
    assert asked[0] == [*map(dict, earlier), {"role": "user", "content": request}]
    assert isinstance(asked[1], str)  # no earlier turns: one user turn, as before


def test_agree_never_takes_a_duplicate_of_the_example_as_its_donor(monkeypatch, tmp_path):
    monkeypatch.setenv("UNISD_CACHE", str(tmp_path))
    examples = [Example("Add 3 and 4 apples.", "7"), Example("Add 3 and 4 apples.", "7"),
                Example("Add 5 and 1 pears.", "6"), Example("Name a red fruit.", "apple"), Example("Sky colour?", "blue")]
    policy = SimpleNamespace(student=SimpleNamespace(weights=lambda: iter([("w", torch.zeros(2))])))
    run = SimpleNamespace(examples=examples, tokenizer=CharTokenizer(), world="w", policy=policy,
                          config=SimpleNamespace(seed=0, max_prompt_tokens=10_000, model="m", teacher_template=TEACHER_TEMPLATE))
    for contexts in ("retrieval", "random"):
        agree = Agree(configure(Agree, {"k": "3", "contexts": contexts}, "agree"))
        agree.name = "agree"
        agree.setup(run)
        for i in (0, 1):
            shown = agree.contexts[i]
            assert len(shown) == 3 and C.reference_context(examples[i], examples[1 - i]) not in shown, contexts
    # a different earlier turn makes it another task: then it may be a donor
    assert not C.same_task(Example("Q?", "A", context=(SYSTEM,)), Example("Q?", "A"))
    assert C.same_task(Example("Q?", "A"), Example("Q?", "B"))
