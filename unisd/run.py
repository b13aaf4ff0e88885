"""The state of one training run (`Run`) and the model wrappers its forwards go through.

`Run` is what `unisd.train` steps and `unisd.checkpoint` saves; plugins see it through the narrower
`unisd.api.RunView`. The data order lives here too: it is a property of the run (data, seed, schedule),
never of its plugins.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import PreTrainedTokenizerBase

from unisd import distributed, models
from unisd.api import Plugin
from unisd.config import TrainConfig
from unisd.data import Example
from unisd.hooks import Hooks


@dataclass
class Run:
    """Everything a step and the plugins work on."""

    config: TrainConfig
    student: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    hooks: Hooks                       # the selected plugins, called through one host
    world: distributed.World
    out: Path
    initial: Any = None                # the frozen initial model, built on first use (see `teacher`)
    student_hidden: Any = None         # the student's encoder, DDP-wrapped under torchrun without --fsdp
    encoders: dict[int, "HiddenStates"] = field(default_factory=dict)  # id(model) -> its encoder
    kept: list[int] = field(default_factory=list)   # indices of examples whose prompts fit
    total_steps: int = 0
    step: int = 0                      # optimizer steps done
    position: int = 0                  # examples consumed
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    bad_steps: int = 0
    started_engine: Any = None         # the vLLM engine once `engine` has started it
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl rows of the last step (rank 0)

    @property
    def plugins(self) -> list[Plugin]:
        """The selected plugins, in command-line order."""
        return self.hooks.plugins

    @property
    def engine(self) -> Any:
        """The colocated vLLM engine under --rollout vllm (unisd.engine), else None; started on first use,
        so a run that never samples (SFT: gold completions, cached setup work) never pays its start."""
        if self.config.rollout != "vllm":
            return None
        if self.started_engine is None:
            from unisd import engine

            self.started_engine = engine.start(self.config, self.world)
        return self.started_engine

    @property
    def teacher(self) -> Any:
        """The frozen initial model: the LoRA student with its adapter off, or a fresh load from disk.

        Loaded lazily (never copied from the student, which may already have trained or been restored),
        so a run whose teacher comes from a plugin, such as ema, keeps no unused third copy.
        """
        if self.initial is None:
            model = models.load_model(self.config.model).to(self.world.device)
            if self.config.bf16:  # frozen: its matmuls may hold bf16 weights, it then computes as the student does
                models.bf16_linears(model)
            self.initial = model.requires_grad_(False).eval()
        return self.initial

    @property
    def needs_teacher(self) -> bool:
        """Whether a step scores with a teacher: a divergence to it, or a plugin that reads its outputs.

        SFT and SSD (--divergence ce) then cost a student forward and backward: no teacher model is loaded."""
        return needs_teacher(self.config, self.plugins)

    def encoder(self, model: Any) -> "HiddenStates":
        """The module a model's hidden states come from: built once per model, sharded under --fsdp."""
        found = self.encoders.get(id(model))  # the encoder holds the model, so the id stays its own
        if found is None:
            found = HiddenStates(model)
            if self.config.fsdp:
                distributed.shard(found, model)
            self.encoders[id(model)] = found
        return found

    def order(self) -> list[int]:
        """Indices into `examples` of every example the whole schedule consumes, in order."""
        c = self.config
        positions = self.total_steps * c.batch_size * c.grad_accum * self.world.size
        return [self.kept[i] for i in order_slice(len(self.kept), c.seed, 0, positions)]

    def scheduled(self) -> list[int]:
        """The examples the schedule draws, ascending: setup work (negatives, contexts) is needed for
        these only, so a short run on a large data set does not prepare what it never sees."""
        return sorted(set(self.order()))

    def sampler(self, model: Any) -> Any:
        """What samples from a model: the model itself, or its sharded encoder (ranks then decode in step)."""
        return self.encoder(model) if self.config.fsdp else model


TEACHER_OBJECTIVES = ("fkl", "rkl", "jsd")  # the --divergence values that compare the student with a teacher


def needs_teacher(config: TrainConfig, plugins: list[Plugin]) -> bool:
    """A divergence to the teacher, or a plugin that reads the teacher's outputs (`Plugin.needs_teacher`)."""
    return config.divergence in TEACHER_OBJECTIVES or any(p.needs_teacher for p in plugins)


class AdapterOff:
    """The LoRA student with its adapter switched off: the initial model, without a second copy."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    def get_decoder(self) -> Callable[..., Any]:
        decoder = self.peft_model.get_base_model().get_decoder()

        def run(**kwargs: Any) -> Any:
            with self.peft_model.disable_adapter():
                return decoder(**kwargs)

        return run

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.peft_model.get_base_model().get_output_embeddings()


def decoder_owner(model: Any) -> Any:
    """The object with get_decoder / get_output_embeddings: a model, a peft model's base, or AdapterOff."""
    return model.get_base_model() if models.is_peft(model) else model


class HiddenStates(torch.nn.Module):
    """A model's final (normed) hidden states, without logits: the loss computes those in chunks.

    The student's forward goes through this module so that DDP sees a forward call it can wrap, and
    under FSDP it is the root that holds the weights outside the decoder layers (embeddings, norm, head).
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.train(getattr(model, "training", False))

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    def generate(self, **kwargs: Any) -> torch.Tensor:
        return self.model.generate(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        decoder = decoder_owner(self.model).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state  # one pass over whole sequences: no KV cache to build


def order_slice(n: int, seed: int, start: int, count: int) -> list[int]:
    """Positions [start, start+count) of an endless sequence of seeded permutations of range(n)."""
    out: list[int] = []
    while len(out) < count:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        out.extend(perm[offset: offset + count - len(out)])
    return out


def data_order(run: Run) -> dict[str, Any]:
    """The ids of every example the whole schedule consumes, in order, as a sha256 and a count.

    Equal for runs with the same data, seed, prompt limit and schedule, whatever their plugins, so a
    comparison can check that its runs saw the same data.
    """
    ids = [str(run.examples[i].meta.get("task_id", i)) for i in run.order()]
    digest = hashlib.sha256(json.dumps(ids, ensure_ascii=False).encode("utf-8")).hexdigest()
    return {"order_sha256": digest, "order_count": len(ids), "examples": len(run.kept)}
