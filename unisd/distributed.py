"""Several processes: torchrun's environment, the process group, and the few collectives the loop needs.

    torchrun --nproc_per_node 2 -m unisd train --model ... --out runs/x

Each rank takes its own slice of every global micro-batch, samples and scores it, and DDP averages
the gradients; rank 0 alone writes metrics, checkpoints and the final model. With one process every
function here is a no-op, so the single-device path has no distributed code in it.

With `--fsdp` the models are sharded instead (FSDP2, `fully_shard`): each rank holds 1/N of every
weight, gradient and optimizer state, and a layer's weights are gathered only while it runs. `whole`
and `assign` move between a sharded parameter and the whole tensor a checkpoint stores.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init(timeout_min: float = 60.0) -> World:
    """Join torchrun's process group (gloo on CPU, nccl on GPU), or describe a single process.

    `timeout_min` bounds how long a rank waits in a collective: rank 0 alone may load (or download) a model
    or write a checkpoint of tens of GB while the others wait, longer than NCCL's default of 10 minutes.
    On CUDA the group is bound to this rank's device (`device_id`), so NCCL connects eagerly to the right GPU.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (size > 1 or under_torchrun()) and not dist.is_initialized():  # one torchrun process: FSDP2 needs the group
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_min),
                                device_id=device if cuda else None)
    return World(dist.get_rank() if size > 1 else 0, size, device)


def under_torchrun() -> bool:
    """Launched by torchrun (which sets this in every process), even with --nproc_per_node 1."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def wrap(module: torch.nn.Module, world: World, all_used: bool = True) -> torch.nn.Module:
    """DDP around the module that computes the student's hidden states (identity for one process, or
    for a module FSDP already shards: it reduces its own gradients).

    `all_used` False: some weights may get no gradient (an objective of auxiliary terms alone can leave an
    untied output head out), so DDP looks for them after each backward instead of waiting for them forever.
    The gradients are views into DDP's all-reduce buckets, not a second copy of every gradient beside them.
    """
    if world.size == 1 or is_sharded(module):
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=not all_used,
                                   gradient_as_bucket_view=True)


def shard(root: torch.nn.Module, model: torch.nn.Module, bf16: bool = False) -> torch.nn.Module:
    """FSDP2 in place: each decoder layer of `model` is a unit, `root` (which calls `model`) holds the rest.

    `root.generate` is registered as a forward too, so sampling gathers the root's weights like a forward.
    `bf16`: forwards gather the weights in bf16 (FSDP2's mixed precision: half the all-gather traffic and
    memory of fp32, and no per-forward cast), while shards, optimizer and the reduction of gradients stay fp32.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    blocks = set(getattr(model, "_no_split_modules", None) or ())  # transformers names its decoder layer class
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ValueError(f"--fsdp: {type(model).__name__} declares no decoder layer class to shard by")
    mixed = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 \
        else MixedPrecisionPolicy()
    for layer in layers:
        fully_shard(layer, mp_policy=mixed)
    fully_shard(root, mp_policy=mixed)
    register_fsdp_forward_method(root, "generate")
    return root


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a sharded parameter (a collective: every rank must call it); others as they are."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (whole, on every rank) as `param` holds it: this rank's slice when sharded, cut locally."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    value = value.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    return value


@torch.no_grad()
def assign(param: torch.Tensor, value: torch.Tensor) -> None:
    """Copy a whole tensor into a parameter, sharded or not (a sharded one keeps this rank's part)."""
    param.copy_(_local(param, value))


@torch.no_grad()
def lerp_(param: torch.Tensor, value: torch.Tensor, rate: float) -> None:
    """param ← param + rate·(value − param) with `value` whole, `param` sharded or not; rate 1 copies (whatever
    param held before, even an uninitialised NaN)."""
    if rate == 1.0:
        assign(param, value)
    else:
        param.lerp_(_local(param, value), rate)


@contextlib.contextmanager
def kept_whole(units: list[Any]) -> Iterator[None]:
    """Every FSDP unit (layers first, the root last) gathered once and kept whole until the block ends (all ranks
    must enter), then resharded.

    For decoding, which runs one forward per token: FSDP2 frees a layer's gathered weights after each forward,
    so without this every token would all-gather the whole model again. The price: while inside, each rank
    holds the whole weights. The root keeps its weights after a forward anyway (FSDP2's rule for the root).
    """
    layers = units[:-1]
    for u in layers:
        u.set_reshard_after_forward(False, recurse=False)
    for u in units:
        u.unshard()
    try:
        yield
    finally:
        for u in units:
            u.reshard()
        for u in layers:
            u.set_reshard_after_forward(True, recurse=False)


def broadcast_(t: torch.Tensor) -> None:
    """Rank 0's values into `t` on every rank (in place); one process: nothing to do."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(t, src=0)


def gathered(named: Any, world: World) -> dict[str, torch.Tensor]:
    """Whole CPU copies of (name, tensor) pairs on rank 0, {} elsewhere; every rank must call it."""
    out = {}
    for name, t in named:
        t = whole(t.detach())
        if world.main:
            out[name] = t.contiguous().cpu()
    return out


@contextlib.contextmanager
def accumulating(module: Any, skip_sync: bool) -> Iterator[None]:
    """DDP reduces the gradients once per step, not once per micro-batch: a micro-batch before the last runs its
    forward and backward inside DDP's no_sync (which must hold the forward too).

    A sharded (FSDP2) module reduce-scatters after every micro-batch instead and accumulates into its gradient
    shards: skipping that sync would keep whole fp32 gradients of every layer on each rank until the last one.
    """
    if skip_sync and not is_sharded(module) and hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        yield


def mean(values: dict[str, float], world: World) -> dict[str, float]:
    """The mean of each value over the ranks that report it: keys are the union over ranks (a plugin
    may log a metric only on some ranks or steps, and every rank must join the same all-reduce)."""
    if world.size == 1:
        return values
    keys = sorted(set().union(*gather(sorted(values), world)))
    sums = torch.tensor([[values.get(k, 0.0), float(k in values)] for k in keys], dtype=torch.float64,
                        device=world.device)
    dist.all_reduce(sums)
    return {k: float(v) / n for k, (v, n) in zip(keys, sums.tolist())}


def once(build: Callable[[], T]) -> T:
    """`build()` run by rank 0 alone and its (picklable) result handed to every rank.

    For setup work that would come out the same on every rank (generated negatives, contexts,
    induced instructions): N processes need not all compute it, nor all write the same cache file.
    Uses the process group directly, so plugins call it without a World; one process just builds.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return build()
    box: list[Any] = [None]
    error: Exception | None = None
    if dist.get_rank() == 0:
        try:
            box[0] = (True, build())
        except Exception as e:  # the other ranks must not wait forever for a result that never comes
            error, box[0] = e, (False, f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if error is not None:
        raise error
    if not ok:
        raise RuntimeError(f"rank 0 failed to build it: {value}")
    return value


def is_main() -> bool:
    """Whether this process is rank 0 or the only one (for plugins, which hold no World)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def say(message: str) -> None:
    """Print a message to stderr from rank 0 only (plugins' warnings; one voice under torchrun)."""
    if is_main():
        print(message, file=sys.stderr)


def total(t: torch.Tensor, world: World) -> torch.Tensor:
    """The sum of a scalar over ranks (no gradient)."""
    if world.size == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def any_rank(flag: bool, world: World) -> bool:
    """True if the flag is set on any rank (e.g. a signal that reached only some of them)."""
    if world.size == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, world: World) -> list[Any]:
    """Every rank's object, in rank order, on every rank."""
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def cat(t: torch.Tensor, world: World) -> torch.Tensor:
    """Concatenate a 1-D tensor of any length across ranks (e.g. per-token statistics for a quantile)."""
    if world.size == 1:
        return t
    return torch.cat([x.to(t.device) for x in gather(t.detach().cpu(), world)])


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def close(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
