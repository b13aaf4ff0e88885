"""The teacher template's placeholders are filled in one pass: substituted text is never substituted again."""
from __future__ import annotations

from unisd.data import Example
from unisd.data.prompts import teacher_prompt

TEMPLATE = "Gold: {demonstration} | Task: {prompt}"


def test_a_demonstration_that_contains_the_prompt_placeholder_keeps_it():
    e = Example(prompt="Write greet(name).", answer='def greet(name):\n    return f"hi {prompt} {name}"')
    assert teacher_prompt(e, template=TEMPLATE) == f"Gold: {e.answer} | Task: Write greet(name)."


def test_a_prompt_that_contains_the_demonstration_placeholder_keeps_it():
    e = Example(prompt="Fill {demonstration} in.", answer="done")
    assert teacher_prompt(e, template=TEMPLATE) == "Gold: done | Task: Fill {demonstration} in."
