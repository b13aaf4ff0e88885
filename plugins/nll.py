"""`nll`: cross-entropy on the completion tokens instead of the divergence to the teacher.

Selecting it sets the per-token objective to `--divergence ce`, -log p_student(y_t) (temperature 1), so
the step becomes supervised fine-tuning on whatever completions the micro-batch holds: gold
demonstrations (SFT) or base-model samples (SSD). It declares the objective and changes nothing else.
"""
from __future__ import annotations

from unisd.api import Plugin


class NLL(Plugin):
    forwards = 0.0  # no view of its own
    needs_teacher = False  # cross-entropy on the completion: the student alone
    objective = "ce"
