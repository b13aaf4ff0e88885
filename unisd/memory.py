"""How much memory a run needs on each device, estimated from the model's config alone (`unisd train --dry-run`).

The model is built on the meta device, so its parameters are counted exactly without loading a weight;
what each part of a run holds then follows from the flags and the device the run will use (`--device`, CUDA
unless told: the planning machine's own devices say nothing about the run's): fp32 master weights, gradients
and AdamW state for what trains (sharded over the ranks under --fsdp; DDP's buckets hold the gradients
themselves, `gradient_as_bucket_view`), the frozen teacher, the EMA average and its bf16 scorer (under LoRA
an adapter on the same base), the sampling
copy or the vLLM engine with its KV cache and its own buffers, autocast's bf16 copies of the weights that
train, and activations (an estimate: each layer's input is kept for the recomputation that activation
checkpointing does in backward, every layer's working set under --keep-activations; the no-grad forward scores
the teacher views B rows at a time).

The total is the peak: a step's gradients, optimizer state and activations, or, before the first step, a
frozen copy loaded in fp32 on the device and converted to bf16 there (`peak`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from unisd import engine, models
from unisd.config import ConfigError, TrainConfig

GB = 1e9
SETUP = "fp32 copy before bf16 conversion (setup)"
STEP_ONLY = ("gradients (fp32)", "AdamW state (fp32)", "autocast weight cache (bf16)", "activations (estimate)",
             "teacher views' hidden states")


@dataclass(frozen=True)
class Shape:
    """What the estimate needs to know of a model: parameter counts by kind, and its sizes."""

    params: int            # every parameter, once (a tied head counted with the embedding)
    linear: int            # parameters of the linear layers other than the output head
    lora: int              # parameters a LoRA adapter on the targeted linear layers adds (per rank r)
    hidden: int
    intermediate: int
    layers: int
    vocab: int


def shape_of(config: TrainConfig) -> Shape:
    """Count the model's parameters on the meta device: no weight is read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_config = AutoConfig.from_pretrained(models.resolve(config.model))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    targets = getattr(config, "lora_targets", "all-linear")
    wanted = None if targets == "all-linear" else {t.strip() for t in str(targets).split(",")}
    text = {id(m) for m in (model.get_decoder() if models.is_multimodal(model) else model).modules()}
    linear = lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            linear += module.weight.numel()
            if (wanted is None or name.rsplit(".", 1)[-1] in wanted) and id(module) in text:  # models.lora_targets
                lora += module.in_features + module.out_features
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    return Shape(sum(p.numel() for p in model.parameters()), linear, lora, text.hidden_size,
                 getattr(text, "intermediate_size", 4 * text.hidden_size), text.num_hidden_layers, text.vocab_size)


def _needs(config: TrainConfig) -> tuple[bool, bool]:
    """(a frozen teacher copy, an EMA teacher) as the plugins and the objective ask for them (`Run.needs_teacher`)."""
    from unisd.plugin import load, settle_objective
    from unisd.run import needs_teacher

    plugins = load(list(config.plugins), config.options)
    reads = needs_teacher(settle_objective(config, plugins), plugins)
    samples_base = any(getattr(p.config, "source", None) == "base" for p in plugins if p.name == "mix")
    ema = "ema" in config.plugins
    return (reads or samples_base) and not ema, ema


def estimate(config: TrainConfig, shape: Shape, world_size: int, device: str = "cuda") -> dict[str, float]:
    """Bytes per device of each part of the run, by name (zero-sized parts left out); `peak` adds them up."""
    shard = world_size if config.fsdp else 1
    bf16_compute = device == "cuda" or config.bf16  # train._autocast, engine.start
    P = shape.params
    trainable = config.lora_r * shape.lora if config.lora else P
    frozen_copy, ema = _needs(config)
    bf16_copy = 2 * shape.linear + 4 * (P - shape.linear)  # models.bf16_linears
    teacher = shape_of(dataclasses.replace(config, model=config.teacher)) if config.teacher else shape  # --teacher
    teacher_copy = 2 * teacher.linear + 4 * (teacher.params - teacher.linear)
    bf16_copies = bf16_compute and not config.fsdp  # policy.bf16_copies: --bf16, or any CUDA device
    # under LoRA the frozen base is held as the bf16 copies are (policy.bf16_copies), the adapter in fp32, and an
    # EMA teacher is a second adapter on that base (policy.follower): the size of the adapter, in fp32
    lora_bf16_base = config.lora and bf16_copies
    adapter_ema = config.lora and not config.fsdp
    base = bf16_copy if lora_bf16_base else 4 * P
    parts = {
        "student weights (fp32)" if not lora_bf16_base else "student weights (bf16 base, fp32 adapter)":
            (base + (4 * trainable if config.lora else 0)) / shard,
        "gradients (fp32)": 4 * trainable / shard,
        "AdamW state (fp32)": 8 * trainable / shard,
        # under LoRA the frozen teacher is the student with its adapter off: no copy (unless --teacher names another
        # model); FSDP keeps one dtype per unit, so a sharded teacher stays fp32 and needs no bf16 scoring copy
        "frozen teacher": (teacher_copy if bf16_copies else 4 * teacher.params) / shard
                          if frozen_copy and (config.teacher or not config.lora) else 0,
        "EMA teacher": (4 * trainable if adapter_ema else (4 * P + (bf16_copy if bf16_copies else 0)) / shard)
                       if ema else 0,
    }
    if config.rollout == "vllm":
        dtype_bytes = 2 if bf16_compute else 4
        parts["vLLM engine (weights, KV cache, buffers)"] = (dtype_bytes * P + config.rollout_kv_cache_gb * engine.GiB
                                                             + engine.BUFFERS)
    elif bf16_copies and not config.lora:  # sharded weights (and a bf16 LoRA base) are sampled where they are
        parts["bf16 sampling copy"] = 2 * P
    parts[SETUP] = _setup_transient(config, teacher, bf16_copies, frozen_copy, ema and not adapter_ema)
    # autocast keeps the bf16 cast of each weight that trains until the student's forward ends (not under --fsdp:
    # there the cache is off, or a whole bf16 student would gather on every rank)
    trained_linear = config.lora_r * shape.lora if config.lora else shape.linear
    parts["autocast weight cache (bf16)"] = 2 * trained_linear if bf16_compute and not config.fsdp else 0
    parts |= _activations(config, shape, bf16_compute, _teacher_rows(config))
    return {k: float(v) for k, v in parts.items() if v}


def _setup_transient(config: TrainConfig, shape: Shape, bf16_copies: bool, frozen_copy: bool, ema_copy: bool) -> float:
    """What a frozen bf16 copy costs while it is made, beyond what it keeps: it is loaded (the initial model) or
    built (the EMA scorer; none for an adapter EMA) in fp32 on the device, then its linear layers are converted
    (`Policy.initial`, `Policy.for_scoring`); before the first step, when no gradient or optimizer state exists yet."""
    if not bf16_copies or not (ema_copy or (frozen_copy and (config.teacher or not config.lora))):
        return 0.0
    return float(2 * shape.linear)  # 4 bytes per weight, less the 2 the bf16 linear layers keep


def _teacher_rows(config: TrainConfig) -> int:
    """Prompts scored per completion in the no-grad forward (`train.forward`): the teacher's, and the views the
    plugins add (agree: k contexts; contrast: the wrong demonstration); 0 when no teacher is read."""
    from unisd.plugin import load, settle_objective
    from unisd.run import needs_teacher

    plugins = load(list(config.plugins), config.options)
    if not needs_teacher(settle_objective(config, plugins), plugins):
        return 0
    views = {"agree": lambda p: p.config.k, "contrast": lambda p: 1}
    return 1 + sum(views[p.name](p) for p in plugins if p.name in views)


def _activations(config: TrainConfig, shape: Shape, bf16_compute: bool, teacher_rows: int) -> dict[str, float]:
    """A step's activations: each layer's input kept for the recomputation (the fp32 residual stream), or under
    --keep-activations every layer's working set, the largest single layer's working set (over B rows: the
    backward's recomputation, or one of the no-grad forwards, which take the teacher views' rows B at a time), the
    vocabulary chunks of the loss, and the teacher views' final hidden states (every view's rows)."""
    length = config.max_prompt_tokens + config.max_new_tokens
    B = config.batch_size * config.num_generations              # rows of a micro-batch
    inner = 2 if bf16_compute else 4                             # a layer's projections come out in bf16 under autocast
    one_layer = inner * B * length * (6 * shape.hidden + 3 * shape.intermediate)
    kept = (one_layer if config.keep_activations else 4 * B * length * shape.hidden) * shape.layers
    vocab_chunks = 3 * 4 * 512 * shape.vocab                     # losses.distill_in_chunks: 512 positions at a time
    return {"activations (estimate)": float(kept + one_layer + vocab_chunks),
            "teacher views' hidden states": float(4 * teacher_rows * B * length * shape.hidden)}


def peak(parts: dict[str, float]) -> float:
    """The most the run holds at once: what stays resident, plus a step's working memory or, before the first
    step, the transient of a bf16 conversion, whichever is larger."""
    step = sum(v for k, v in parts.items() if k in STEP_ONLY)
    resident = sum(v for k, v in parts.items() if k not in STEP_ONLY and k != SETUP)
    return resident + max(step, parts.get(SETUP, 0.0))


def report(config: TrainConfig, world_size: int, device_gb: float | None, device: str = "cuda") -> str:
    """The table `--dry-run` prints; with `device_gb`, whether it fits and which flag would make it fit."""
    shape = shape_of(config)
    parts = estimate(config, shape, world_size, device)
    total = peak(parts)
    lines = [f"{config.model}: {shape.params / 1e9:.3g} B parameters ({shape.layers} layers, hidden {shape.hidden}, "
             f"vocabulary {shape.vocab}); {world_size} process{'es' if world_size > 1 else ''}"
             f"{', sharded (--fsdp)' if config.fsdp else ''}; per {device} device (--device):"]
    width = max(len(k) for k in parts)
    lines += [f"  {k:<{width}}  {v / GB:8.2f} GB" for k, v in parts.items()]
    lines.append(f"  {'peak':<{width}}  {total / GB:8.2f} GB")
    if device_gb is not None:
        if total <= device_gb * GB:
            lines.append(f"fits in {device_gb:g} GB per device")
        else:
            lines.append(f"does not fit in {device_gb:g} GB per device: "
                         f"{_advice(config, shape, world_size, device_gb, device)}")
    return "\n".join(lines)


def _advice(config: TrainConfig, shape: Shape, world_size: int, device_gb: float, device: str) -> str:
    """The first change of flags (in the order a user would try them) whose estimate fits."""
    tries: list[tuple[str, dict[str, Any]]] = []
    if not config.lora:
        tries.append(("add --lora", {"lora": True}))
    if world_size > 1 and not config.fsdp:
        tries.append(("add --fsdp", {"fsdp": True}))
    if config.batch_size > 1:
        tries.append((f"use --batch-size 1 with --grad-accum {config.grad_accum * config.batch_size}",
                      {"batch_size": 1, "grad_accum": config.grad_accum * config.batch_size}))
    for advice, change in tries:
        try:
            changed = dataclasses.replace(config, **change)
        except ConfigError:  # a combination this unisd refuses is no advice
            continue
        if peak(estimate(changed, shape, world_size, device)) <= device_gb * GB:
            return advice
    return "no single flag makes it fit: use more devices with --fsdp, or a smaller model"
