"""unisd: a compact self-distillation trainer for causal LMs, each UniSD mechanism a plugin."""

__version__ = "0.1.0"
