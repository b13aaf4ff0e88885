"""Data for the unisd_demo lm-eval task: the project's own generated two-digit additions (test split)."""
from unisd.data.benchmarks import hf_dataset


def load(**kwargs):
    """custom_dataset hook: {"test": Dataset} of the demo task's test split."""
    return hf_dataset("demo")
