"""The student's weights and every form a run computes or samples with: one owner, `Policy`.

`step`, the plugins (through `RunView.policy`) and checkpoints never handle LoRA, precision or sharding
themselves; they ask the policy for a form:

- `student`: hidden states (through DDP, or sharded by FSDP2) and the output head, for the graded forward;
- `initial`: the frozen initial model, the LoRA student with its adapter off or a second copy loaded once;
- `follower()`: a frozen form that follows the student's weights (an EMA teacher): under LoRA a second adapter on
  the same base (no second base), else a plain copy held the same way; `follow_student(follower, rate)` moves it,
  and `for_scoring(model)` is what a copy scores with (bf16 linear layers where `bf16_copies`);
- `sample(...)`: the model itself, a bf16 copy (--bf16) or the vLLM engine (--rollout vllm), each given the
  current weights one shard unit at a time (LoRA merged on the fly, whole tensors gathered per layer).

Under --fsdp only rank 0 reads the checkpoint: the other ranks build the model on the meta device, every
rank shards it, and rank 0 broadcasts its weights into the shards, so no rank holds a second whole copy.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable, Iterator, cast

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from transformers import PreTrainedTokenizerBase

from unisd import distributed, models, rollout
from unisd.config import TrainConfig

Weights = Iterable[tuple[str, torch.Tensor]]


class HiddenStates(torch.nn.Module):
    """A model's final (normed) hidden states, without logits: the loss computes those in chunks.

    The forwards go through this module so that DDP sees a call it can wrap, and under FSDP it is the root
    that holds the weights outside the decoder layers (embeddings, final norm, head); `generate` is registered
    as a second forward there, so sampling gathers the root's weights as a forward does.
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
        decoder = models.base_model(self.model).get_decoder()
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state  # one pass over whole sequences: no KV cache to build


class Model:
    """One model as a step uses it: `hidden(...)` gives final hidden states, `head` the output layer.

    `adapter_off`: the LoRA student computing with its base weights alone, i.e. the initial model, no copy.
    `adapter_name`: the LoRA model computing with another adapter of its own (an EMA teacher's), no copy either.
    `graded`: what a forward with gradient goes through (the student's DDP wrapper); else the root itself.
    """

    def __init__(self, model: Any, root: HiddenStates, adapter_off: bool = False, graded: Any = None,
                 adapter_name: str | None = None) -> None:
        self.model, self.root, self.adapter_off, self.adapter_name = model, root, adapter_off, adapter_name
        self.graded = root if graded is None else graded

    @property
    def head(self) -> torch.nn.Module:
        return models.base_model(self.model).get_output_embeddings()

    @property
    def sharded(self) -> bool:
        return distributed.is_sharded(self.root)

    @contextlib.contextmanager
    def adapter(self) -> Iterator[None]:
        """Inside it the model computes as this form does: the initial model with the adapter off, a follower with
        its own adapter on; a frozen form without dropout (eval mode, as a frozen copy without LoRA is), the
        student's training mode restored after."""
        if not self.adapter_off and self.adapter_name is None:
            yield
            return
        training = self.model.training
        self.model.eval()
        try:
            switch = (models.active_adapter(self.model, self.adapter_name) if self.adapter_name is not None
                      else _adapter_off(self.model))
            with switch:
                yield
        finally:
            self.model.train(training)

    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        with self.adapter():
            return self.graded(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        if self.adapter_name is not None:
            return iter(models.adapter_factors(self.model, self.adapter_name).values())
        return self.model.parameters()

    def own(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole tensor) of what this form holds of its own, for a checkpoint: a follower adapter's factors,
        else every weight (`weights()`)."""
        if self.adapter_name is None:
            yield from self.weights()
            return
        for name, p in models.adapter_factors(self.model, self.adapter_name).items():
            yield name, p.detach()

    @torch.no_grad()
    def load_own(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set what `own()` gave; ValueError when the names differ (a checkpoint of another model or form)."""
        if self.adapter_name is None:
            names = {name for name, _ in self.model.named_parameters()}
            held = None
        else:
            held = models.adapter_factors(self.model, self.adapter_name)
            names = set(held)
        if set(tensors) != names:
            raise ValueError("the checkpoint's tensors do not match this model")
        if held is None:
            self.follow(tensors.items())
        else:
            for name, value in tensors.items():
                held[name].copy_(value)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(plain name, whole tensor) of every weight this form computes with, in order; every rank must iterate
        it to the end when sharded (each shard unit is gathered in turn)."""
        # the adapters named, not switched on: a teacher's and the student's weights may be streamed side by side
        adapters = [] if self.adapter_off or not models.is_peft(self.model) else \
            [self.adapter_name or self.model.active_adapter]
        yield from effective_weights(self.model, shard_units(self.root) if self.sharded else [], adapters)

    @torch.no_grad()
    def follow(self, weights: Weights, rate: float = 1.0) -> None:
        """θ ← θ + rate·(w − θ) for each named whole weight w (rate 1: a copy); a shard takes its own slice."""
        if self.sharded:
            cast(Any, self.root).reshard()  # a forward leaves the root's weights gathered: write into the shards
        params = dict(self.model.named_parameters())
        for name, w in weights:
            distributed.lerp_(params[name], w, rate)


def _checkpoint_activations(model: Any) -> None:
    """Recompute each layer's activations in backward: a step's memory then barely grows with length, for a third
    more backward work (docs/performance.md, the roofline); on CUDA activations dominate."""
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.x deprecated the old
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class Policy:
    """The trainable student and every form of it a run needs (see the module doc)."""

    def __init__(self, config: TrainConfig, world: distributed.World, tokenizer: PreTrainedTokenizerBase) -> None:
        self.config, self.world, self.tokenizer = config, world, tokenizer
        model = _load(config.model, world, sharded=config.fsdp)
        if config.lora and bf16_copies(config.bf16, world.device) and not config.fsdp:  # one dtype per FSDP unit
            models.bf16_linears(model)  # the frozen base as autocast computes it; only the adapter keeps fp32
        if not config.keep_activations:
            _checkpoint_activations(model)
        if config.lora:
            model = models.add_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_targets)
        model.train()
        root = _held(model, world, config.fsdp, _bf16(config, world))
        # with no per-token objective (--divergence none) only auxiliary terms decide which weights get a gradient
        self.student = Model(model, root, graded=distributed.wrap(root, world, all_used=config.divergence != "none"))
        self._initial: Model | None = None
        self._copies: dict[int, Model] = {}   # id(module) -> a plugin teacher given as a plain module
        self._shadow: Model | None = None     # the bf16 copy hf sampling uses under --bf16
        self._engine: Any = None
        self._version = 0                     # bumped whenever the trainable weights are handed out to be written

    @property
    def bf16(self) -> bool:
        """Whether frozen forms are held with bf16 linear layers (`bf16_copies`)."""
        return bf16_copies(self.config.bf16, self.world.device)

    @property
    def model(self) -> Any:
        """The trainable transformers model (peft-wrapped under --lora; its weights sharded under --fsdp)."""
        return self.student.model

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The weights the optimizer steps, by name: under --fsdp the shards (a forward or a sampling call leaves
        the root's weights gathered, and the gathered tensors are only temporary).

        Whoever gets them may write them (the optimizer once a step, a checkpoint restore), so the student counts
        as changed: the engine loads it again before its next rollout, and not before (`sample`)."""
        self._version += 1
        if self.student.sharded:
            cast(Any, self.student.root).reshard()
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    @property
    def loaded_initial(self) -> bool:
        """Whether the initial model has been built (a run whose objective needs no teacher never builds it)."""
        return self._initial is not None

    @property
    def initial(self) -> Model:
        """The frozen initial model: the LoRA student with its adapter off, or a copy loaded on first use
        (never copied from the student, which may already have trained or been restored); with --teacher, that
        model instead, held as the copy would be."""
        if self._initial is None:
            if models.is_peft(self.model) and not self.config.teacher:
                self._initial = Model(self.model, self.student.root, adapter_off=True)
            else:
                model = _load(self.config.teacher or self.config.model, self.world, sharded=self.config.fsdp)
                if self.bf16 and not self.config.fsdp:  # FSDP holds one dtype per unit: it stays fp32 there
                    models.bf16_linears(model)  # frozen: bf16 matmul weights compute what autocast would
                model.requires_grad_(False).eval()
                self._initial = Model(model, _held(model, self.world, self.config.fsdp, _bf16(self.config, self.world)))
        return self._initial

    def follower(self) -> Model:
        """A frozen form holding the student's current weights. Under LoRA (unsharded) a second fp32 adapter on the
        student's own base, a copy of its adapter: following then averages the factors, not the merged weights,
        and nothing of the base is copied. Else a plain fp32 model, sharded like the student under --fsdp."""
        if models.is_peft(self.model) and not self.student.sharded:
            name = f"{FOLLOWER}{len(self.model.peft_config) - 1 or ''}"  # ema, ema1, ... beside the student's
            models.add_follower_adapter(self.model, name)
            return Model(self.model, self.student.root, adapter_name=name)
        copy = self._skeleton(torch.float32)
        copy.follow(self.student.weights())
        return copy

    @torch.no_grad()
    def follow_student(self, follower: Model, rate: float = 1.0) -> None:
        """follower ← follower + rate·(student − follower), for what the follower holds: an adapter's factors
        (each factor averaged on its own), or every weight of a copy (the student's effective weights)."""
        if follower.adapter_name is None:
            follower.follow(self.student.weights(), rate)
            return
        student = models.adapter_factors(self.model, self.model.active_adapter)
        for name, p in models.adapter_factors(self.model, follower.adapter_name).items():
            distributed.lerp_(p, student[name].detach(), rate)

    def for_scoring(self, model: Model) -> Model:
        """What a frozen model scores with: where `bf16_copies` (unsharded) a copy whose linear layers are bf16, as
        autocast computes them (the caller refreshes it with `follow` when the model changes); else the model
        itself, and always a follower adapter, which computes on the student's own base."""
        if not self.bf16 or self.config.fsdp or model.adapter_name is not None:  # FSDP holds one dtype per unit
            return model
        copy = self._skeleton(torch.float32)
        models.bf16_linears(copy.model)
        copy.follow(model.weights())
        return copy

    def as_model(self, teacher: Any) -> Model:
        """A plugin's teacher as a `Model` (plugins may return a plain transformers module)."""
        if isinstance(teacher, Model):
            return teacher
        found = self._copies.get(id(teacher))
        if found is None:
            found = self._copies[id(teacher)] = Model(teacher, _held(teacher, self.world, self.config.fsdp,
                                                                     _bf16(self.config, self.world)))
        return found

    def _skeleton(self, dtype: torch.dtype) -> Model:
        """The plain architecture with the student's buffers, its weights not yet set (built on the meta device)."""
        model = models.build_on_meta(self.config.model, dtype)
        model.requires_grad_(False).eval()
        root = HiddenStates(model)
        if self.config.fsdp:
            distributed.shard(root, model, _bf16(self.config, self.world))
        root.to_empty(device=self.world.device)
        source = {models.canonical_name(n): b for n, b in models.base_model(self.model).named_buffers()}
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(source[name])
        model.tie_weights()
        return Model(model, root)

    @property
    def engine(self) -> Any:
        """The colocated vLLM engine under --rollout vllm (unisd.engine), started on first use, else None."""
        if self.config.rollout != "vllm":
            return None
        if self._engine is None:
            from unisd import engine

            self._engine = engine.start(self.config, self.world)
        return self._engine

    def close(self) -> None:
        """Stop the vLLM engine, if one started: the run is over, and its memory is the next run's."""
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def sample(self, prompts: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
               top_k: int = 0, min_new_tokens: int = 0, initial: bool = False) -> rollout.Rollout:
        """One completion per prompt (token ids) from the student as it is now, or from the initial model."""
        form = self.initial if initial else self.student
        stops = rollout.eos_ids(self.model, self.tokenizer)
        if self.engine is not None:
            label = "initial" if initial else self._version
            if self.engine.held != label:  # once per optimizer step, not per micro-batch (same on every rank)
                self.engine.load(form.weights(), label)
            return rollout.sample_with(self.engine, self.tokenizer, prompts, max_new_tokens, temperature, top_p, stops,
                                       min_new_tokens, top_k)
        bf16 = self.bf16
        sampler: Any = form.root if form.sharded else form.model
        context: contextlib.AbstractContextManager = form.adapter()
        if self.bf16 and not form.sharded and not models.is_peft(self.model):  # under LoRA the base is bf16 already
            # a whole bf16 copy: sampling reads every weight per token
            if self._shadow is None:
                self._shadow = self._skeleton(torch.bfloat16)
            self._shadow.follow(form.weights())
            sampler, context = self._shadow.model, contextlib.nullcontext()
        # sharded: every unit gathered once per rollout, not once per decoded token
        whole = distributed.kept_whole(shard_units(form.root)) if form.sharded else contextlib.nullcontext()
        with context, whole:
            return rollout.sample(sampler, self.tokenizer, prompts, max_new_tokens, temperature, top_p,
                                  min_new_tokens=min_new_tokens, top_k=top_k, stops=stops, bf16=bf16)

    def accumulating(self, skip_sync: bool) -> contextlib.AbstractContextManager:
        """Gradients reduced over the ranks once per step under DDP, into the shards every micro-batch under FSDP
        (see `distributed.accumulating`)."""
        return distributed.accumulating(self.student.graded, skip_sync)

    def gathered(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """What the final folder holds, whole and on the CPU of rank 0 ({} elsewhere): the effective weights by
        plain names (LoRA merged) and the adapter's own tensors; every rank must call it (shards are gathered)."""
        whole = {}
        for name, w in self.student.weights():
            if self.world.main:
                whole[name] = w.detach().to("cpu", torch.float32)  # a bf16 LoRA base too: one dtype in the folder
        adapter = distributed.gathered(((n, p) for n, p in self.model.named_parameters() if "lora_" in n
                                        and f".{self.model.active_adapter}." in n), self.world)  # not a follower's
        return whole, adapter


FOLLOWER = "ema"  # the name of a follower's adapter under LoRA


def bf16_copies(bf16: bool, device: torch.device) -> bool:
    """Whether frozen forms (initial model, EMA scorer, sampler, LoRA base) hold bf16 linear layers: with --bf16,
    and always on CUDA, where the forwards run under bf16 autocast anyway (train._autocast, engine.start)."""
    return bf16 or device.type == "cuda"


@contextlib.contextmanager
def _adapter_off(model: Any) -> Iterator[None]:
    """peft's `disable_adapter`, keeping the adapter's weights marked as trainable: peft clears the mark, and
    FSDP2, which reads it whenever it gathers a unit, would then reduce the adapter's bf16 gradients unconverted."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    with model.disable_adapter():
        for p in trainable:
            p.requires_grad_(True)
        yield


def shard_units(root: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP units under `root`, decoder layers first and the root (which holds the rest) last."""
    from torch.distributed.fsdp import FSDPModule

    layers = [m for m in root.modules() if isinstance(m, FSDPModule) and m is not root]
    return [*layers, root]


@torch.no_grad()
def effective_weights(model: Any, units: list[torch.nn.Module],
                      adapters: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(plain name, tensor) of the weights the model computes with: base + scaled B @ A for a LoRA layer, with the
    `adapters` named (None: those the layers have switched on).

    This is what an EMA teacher and the sampler must follow under LoRA; averaging only the frozen base weights
    (as the official code does) leaves the teacher at the initial model forever. With shard `units` each weight
    is gathered whole from the fp32 shards in turn (no whole copy of the model; every rank must iterate to the
    end) and what it yields is a copy: not from a unit's own gathered tensors, which are bf16 when its
    forwards gather bf16 (`distributed.shard`).
    """
    lora_layers = {models.canonical_name(n) + ".weight": m for n, m in model.named_modules()
                   if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    names = [n for n, _ in model.named_parameters() if "lora_" not in n]
    for unit, members in _by_unit(model, names, units):
        if unit is not None:
            unit.reshard()  # a forward may have left it gathered: its parameters are then the shards again
        for name in members:
            p = distributed.whole(model.get_parameter(name).detach())
            key = models.canonical_name(name)
            module = lora_layers.get(key)
            on = adapters or []
            if module is not None and adapters is None:  # the layer's own switches
                on = [] if module.disable_adapters else module.active_adapters
            if module is not None and on:  # a new tensor
                yield key, p + sum(distributed.whole(module.get_delta_weight(a)) for a in on if a in module.lora_A)
            else:
                yield key, p


def _by_unit(model: Any, names: list[str], units: list[torch.nn.Module]) -> list[tuple[Any, list[str]]]:
    """Parameter names grouped by the shard unit that holds them (units in order; no units: one group)."""
    if not units:
        return [(None, names)]
    prefixes = {id(m): n + "." for n, m in model.named_modules()}
    layers = [(prefixes[id(u)], u) for u in units[:-1] if id(u) in prefixes]
    groups: list[tuple[Any, list[str]]] = [(u, []) for u in [*(u for _, u in layers), units[-1]]]
    for name in names:
        index = next((i for i, (prefix, _) in enumerate(layers) if name.startswith(prefix)), len(layers))
        groups[index][1].append(name)
    return groups


def _load(spec: str, world: distributed.World, sharded: bool) -> Any:
    """The model in fp32 on this rank's device; under --fsdp rank 0 alone reads it, the others build it on meta."""
    if sharded and not world.main:
        return models.build_on_meta(spec)
    return models.load_model(spec).to(world.device)


def _bf16(config: TrainConfig, world: distributed.World) -> bool:
    """Whether forwards compute in bf16: always on CUDA, on CPU with --bf16 (as `train._autocast`)."""
    return config.bf16 or world.device.type == "cuda"


def _held(model: Any, world: distributed.World, sharded: bool, bf16: bool = False) -> HiddenStates:
    """The model's hidden-states root; under --fsdp sharded (gathering bf16 weights for `bf16` forwards), rank 0's
    weights broadcast into every shard."""
    root = HiddenStates(model)
    if not sharded:
        return root
    whole = root.state_dict() if world.main else {}  # rank 0's tensors, before sharding replaces them
    distributed.shard(root, models.base_model(model), bf16)
    if not world.main:
        root.to_empty(device=world.device)
    set_model_state_dict(root, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del whole
    for _, b in root.named_buffers():
        distributed.broadcast_(b)  # buffers outside the state dict (rotary frequencies) too
    return root
