"""Shared fixtures: a tiny Llama with its own small tokenizer, built from a config (no downloads)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is two plus two? Answer: four. The answer is 4.",
    "Name a colour of the sky. Answer: blue. Reasoning: the sky scatters blue light.",
    "Which animal barks? A. cat B. dog C. cow. Answer: B",
    "def add(a, b):\n    return a + b\nassert add(1, 2) == 3",
    "Here is a reference response to this task. Study it, then answer in your own words.",
    "Question: where do fish live? Answer: in water. Explanation: fish breathe through gills.",
] * 4


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 32) and a ~300-token BPE tokenizer with a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id, tie_word_embeddings=True, initializer_range=0.3)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


TINY_ROWS = [
    {"prompt": "What is two plus two?", "answer": "4", "rationale": "two and two make four"},
    {"prompt": "Which animal barks? A. cat B. dog", "answer": "B"},
    {"prompt": "Name a colour of the sky.", "answer": "blue", "rationale": "the sky scatters blue light"},
    {"prompt": "Where do fish live?", "answer": "in water"},
    {"prompt": "Write add(a, b).", "answer": "def add(a, b):\n    return a + b"},
    {"prompt": "What is one plus one?", "answer": "2", "rationale": "one and one make two"},
]


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TINY_ROWS))
    return path


def write_distribution(root: Path, dist: str, entry_points: dict[str, str], version: str = "0.0.1") -> Path:
    """A `<dist>-<version>.dist-info` that importlib.metadata finds once `root` is on sys.path."""
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[unisd.plugins]\n{lines}")
    return root


@pytest.fixture
def plugin_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Register test plugins through real entry points: plugin_dist("dist-name", {"name": "module:Class"})."""
    def register(dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> Path:
        root = tmp_path / f"site-{dist}"
        write_distribution(root, dist, entry_points)
        for module, source in (modules or {}).items():
            (root / f"{module}.py").write_text(source)
        monkeypatch.syspath_prepend(str(root))
        return root

    return register
