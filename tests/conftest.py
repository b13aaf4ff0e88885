"""Shared fixtures: a tiny Llama with its own small tokenizer, built from a config (no downloads)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

if Path(__file__).resolve().parents[1].name == "mutants":
    # mutmut runs the tests inside mutants/, whose plugins/ folder holds the mutated plugin code. Its modules
    # are imported as plugins.* (the names mutmut gives their mutants) and also answer to the name the package
    # installs them as (unisd_plugins.*, pyproject's package-dir), so the entry points reach the mutants.
    import importlib
    import pkgutil
    import sys

    sys.modules["unisd_plugins"] = importlib.import_module("plugins")
    for module in pkgutil.iter_modules(sys.modules["unisd_plugins"].__path__):
        sys.modules[f"unisd_plugins.{module.name}"] = importlib.import_module(f"plugins.{module.name}")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

# Property tests (Hypothesis): 40 examples each by default; HYPOTHESIS_PROFILE=mutation runs 10 and
# skips shrinking, so a mutant that breaks a property fails fast instead of timing out.
from hypothesis import Phase, settings  # noqa: E402

settings.register_profile("default", max_examples=40, deadline=None)
settings.register_profile("mutation", max_examples=10, deadline=None,
                          phases=[Phase.explicit, Phase.reuse, Phase.generate])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

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


@pytest.fixture
def qwen_7b_config(tmp_path: Path) -> Path:
    """A folder with Qwen2.5-7B's config.json alone: what --dry-run needs to estimate a 7B run."""
    folder = tmp_path / "qwen-7b"
    folder.mkdir()
    shutil.copy(Path(__file__).parent / "fixtures" / "configs" / "Qwen2.5-7B-Instruct.json", folder / "config.json")
    return folder


def build_tiny_model(folder: Path, seed: int = 0, hidden: int = 32, heads: int = 4, kv_heads: int = 2,
                     tokenizer: Any = None, tied: bool = True) -> Path:
    """A 2-layer Llama (hidden 32 by default) and a ~300-token BPE tokenizer with a ChatML template;
    `tied` False gives it an output head of its own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fast = tokenizer if tokenizer is not None else _tiny_tokenizer()
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                         bos_token_id=fast.bos_token_id, tie_word_embeddings=tied, initializer_range=0.3)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def _torchrun_train(model: Path, data: Path, out: Path, *extra: str) -> None:
    """`unisd train --fsdp` under torchrun with 2 processes, 3 steps, a checkpoint per step; fails the test on error."""
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "unisd", "train",
            "--model", str(model), "--data", str(data), "--out", str(out), "--batch-size", "1", "--max-steps", "3",
            "--max-new-tokens", "8", "--lr", "1e-2", "--save-every", "1", "--fsdp", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _cut_back(run: Path, copy: Path) -> None:
    """`copy` is a finished `run` as it was after its first kept checkpoint: the later one and the final model gone,
    the final folder's other files (an adapter/) left as a final write cut short would leave them."""
    shutil.copytree(run, copy)
    checkpoints = sorted((copy / "checkpoints").glob("step-*"))
    assert len(checkpoints) == 2
    shutil.rmtree(checkpoints[-1])
    for name in ("unisd.json", "model.safetensors", "README.md"):
        (copy / name).unlink()


def _tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

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
    return fast


def write_tiny_tasks(folder: Path, rows: list[dict[str, Any]], prefix: str) -> Path:
    """Two lm-eval tasks over `rows`: `<prefix>_mc` (acc from log-likelihoods) and `<prefix>_gen` (greedy replies)."""
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'rows.jsonl'}\ntest_split: test\n"
    (folder / "mc.yaml").write_text(
        f"task: {prefix}_mc\n{data}output_type: multiple_choice\ndoc_to_text: \"Question: {{{{question}}}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    (folder / "gen.yaml").write_text(
        f"task: {prefix}_gen\n{data}output_type: generate_until\ndoc_to_text: \"{{{{prompt}}}}\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"<|im_end|>\"]\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\nmetadata:\n  version: 1.0\n")
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def other_tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same architecture and tokenizer with other initial weights: a second, different model."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama-seed1"), seed=1)


def _perplexity_by_hand(folder: Path, pairs: list[tuple[str, str]]) -> float:
    """exp of minus the mean token log-likelihood of each continuation given its context, pooled over pairs."""
    import math

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for context, continuation in pairs:
            ctx = tok(context, add_special_tokens=False)["input_ids"]
            cont = tok(continuation, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
            for i, token in enumerate(cont):  # the logits at position p predict token p + 1
                total += float(torch.log_softmax(logits[len(ctx) + i - 1], -1)[token])
            count += len(cont)
    return math.exp(-total / count)


@pytest.fixture
def hand_perplexity():
    """perplexity(model_folder, [(context, continuation)]) with a plain transformers forward: the reference."""
    return _perplexity_by_hand


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


@pytest.fixture(scope="session")
def tiny_task_writer() -> Any:
    """`write_tiny_tasks`, for modules that build their own small lm-eval tasks."""
    return write_tiny_tasks


@pytest.fixture(scope="session")
def tiny_model_builder() -> Any:
    """`build_tiny_model`, for modules that need the tiny tokenizer with other model sizes."""
    return build_tiny_model


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that needs a model is an integration test (`tox -e integration`); one with no marker is a unit test."""
    for item in items:
        if {"tiny_model", "other_tiny_model"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def sharded_run() -> Any:
    """`sharded_run(model, data, out, *flags)`: a 3-step `unisd train --fsdp` under torchrun x2."""
    return _torchrun_train


@pytest.fixture(scope="session")
def cut_back() -> Any:
    """`cut_back(run, copy)`: a copy of a finished run as it was after its first kept checkpoint."""
    return _cut_back
