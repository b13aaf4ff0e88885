"""Data for the unisd_cose lm-eval task: unisd's own adapter, so the prompt is the training prompt."""
from unisd.data.benchmarks import hf_dataset


def load(**kwargs):
    """custom_dataset hook: {"test": Dataset} of cos_e's eval split (UNISD_DATA_DIR or the Hub)."""
    return hf_dataset("cos_e")
