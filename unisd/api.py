"""The plugin contract: the base class a mechanism subclasses and everything its hooks see.

A plugin programs against this module only: `Plugin` (no-op hooks and the `Config` rules), the data a
hook receives (`Batch`, `Outputs`) and `RunView`, the part of a run a plugin may read and call.
`unisd.hooks.Hooks` calls the hooks and combines their answers; `unisd.plugin` discovers and configures
plugins. Nothing here imports torch at run time, so the CLI can refuse bad flags before loading it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Protocol, Sequence

if TYPE_CHECKING:  # torch only for annotations: the CLI refuses bad flags before importing it
    import torch
    from transformers import PreTrainedTokenizerBase

    from unisd.sequences import Prompt

    from unisd.config import TrainConfig
    from unisd.data import Example
    from unisd.distributed import World
    from unisd.policy import Model, Policy
    from unisd.rollout import Rollout

API_VERSION = 1
HOOKS = ("setup", "completions", "views", "teacher", "token_loss", "weights", "aux_losses", "after_step",
         "state_dict", "load_state_dict")
EXCLUSIVE = ("teacher", "completions")  # hooks whose answer replaces, not chains: one provider per run


class PluginError(ValueError):
    """A plugin cannot be selected or configured; the message says which and why."""


class TrainError(RuntimeError):
    """The run cannot go on (plugin failure, too many non-finite steps); a checkpoint was kept."""


@dataclass
class Batch:
    """One micro-batch: examples, the prompt of every view, and the student's sampled completions."""

    indices: list[int]                 # positions in run.examples
    examples: list[Example]
    prompts: dict[str, Sequence[Prompt]]  # view -> prompt per example ("student", "teacher", plugin views)
    tokens: torch.Tensor | None = None     # [B, T] sampled completion ids
    mask: torch.Tensor | None = None       # [B, T] 1.0 on the sampled tokens: what the forwards attend to
    truncated: torch.Tensor | None = None  # [B]
    # [B, T] 1.0 on the tokens the loss counts (`mask` less --skip-first-tokens, --mask-truncated); None: `mask`.
    # Separate from `mask` so that a token left out of the loss is still seen by the tokens after it
    loss_mask: torch.Tensor | None = None


@dataclass
class Outputs:
    """What the forwards produced; the argument of token_loss, weights and aux_losses."""

    batch: Batch
    mask: torch.Tensor                 # [B, T] the tokens the loss counts (`Batch.loss_mask`)
    divergence: torch.Tensor           # [B, T] the per-token objective (--divergence), before any plugin
    logps: dict[str, torch.Tensor]     # view -> [B, T] log-prob of the sampled token at temperature 1
    hidden: dict[str, torch.Tensor]    # "student" (with grad), "teacher": final hidden states [B, T, H]
    metrics: dict[str, float] = field(default_factory=dict)  # plugins may add scalars to log


class RunView(Protocol):
    """What a plugin may read and call on the run (`unisd.run.Run` provides it).

    config, tokenizer, examples, world: as loaded; step: optimizer steps done; policy: the student's weights
    and their forms (`unisd.policy.Policy`): `policy.sample(...)` draws from the student (or, `initial=True`,
    from the initial model) as the run samples, `policy.student.weights()` streams its effective weights,
    `policy.follower()` makes a frozen form that follows them (an EMA teacher), moved by
    `policy.follow_student(follower, rate)` and checkpointed with its `own()` / `load_own()`. A plugin never needs
    to know whether LoRA, bf16, sharding or the vLLM engine is behind them.
    """

    config: TrainConfig
    tokenizer: PreTrainedTokenizerBase
    examples: list[Example]
    policy: Policy
    world: World
    step: int

    def scheduled(self) -> list[int]:
        """Indices of the examples the whole schedule draws, ascending: prepare setup work for these only."""


class Plugin:
    """Base class: override any hook. `Config` holds the plugin's options and their defaults.

    Hooks, in the order the step calls them (`unisd.hooks.Hooks` says how answers combine):
      setup(run)               once, after model and data are loaded
      completions(batch, run)  -> Rollout or None: completions to train on instead of a student sample
      views(batch)             -> {view name: [prompt per example]}: extra no-grad teacher views
      teacher(run)             -> Model or None: replaces the primary teacher (`run.policy.follower()`)
      token_loss(D, out)       -> D': transforms the per-token divergence [B, T] (chained in CLI order)
      weights(out)             -> w: reliability weights broadcastable to [B, T] (multiplied together)
      aux_losses(out)          -> {name: scalar}: weighted auxiliary terms, added and logged by name
      after_step(run)          after each optimizer step
      state_dict() / load_state_dict(state)   checkpoint and exact resume

    `forwards` (or `extra_forwards(options)`) tells `unisd ablate` how many no-grad teacher forwards per
    micro-batch the plugin adds, for its cost estimate.
    """

    name: str = ""                     # the name users type; set from the entry point at load
    api_version: ClassVar[int] = API_VERSION
    # exclusive hooks (teacher, completions) this plugin answers only sometimes and lets others answer
    # otherwise; without it, selecting two providers of the same exclusive hook is an error
    composes: ClassVar[tuple[str, ...]] = ()
    # the per-token objective (a --divergence value) this plugin stands for, e.g. nll: ce; selecting the
    # plugin sets it, and a different --divergence given explicitly is an error
    objective: ClassVar[str | None] = None

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Any = None) -> None:
        self.config = config if config is not None else self.Config()

    # whether the plugin reads what the teacher computes (a teacher view's out.logps, out.hidden["teacher"]); a run
    # whose objective needs no teacher (--divergence ce or none) and whose plugins read none loads no teacher model
    # and runs no teacher forward. True unless the plugin says otherwise: a plugin that reads the teacher must get it
    needs_teacher: ClassVar[bool] = True

    # no-grad teacher forwards the plugin adds per micro-batch, for `unisd ablate`'s cost estimate
    # (None: not declared, counted as one view); override `extra_forwards` when the options decide it
    forwards: ClassVar[float | None] = None

    @classmethod
    def extra_forwards(cls, options: dict[str, Any]) -> float:
        """Extra teacher forwards per micro-batch with these options (each view is one)."""
        return 1.0 if cls.forwards is None else cls.forwards

    def setup(self, run: RunView) -> None:
        pass

    def completions(self, batch: Batch, run: RunView) -> Rollout | None:
        return None

    def views(self, batch: Batch) -> Mapping[str, Sequence[Prompt]]:
        return {}

    def teacher(self, run: RunView) -> Model | torch.nn.Module | None:
        return None

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        return D

    def weights(self, out: Outputs) -> torch.Tensor | None:
        return None

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        return {}

    def after_step(self, run: RunView) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def overrides(plugin: Plugin | type[Plugin], hook: str) -> bool:
    """Whether a plugin (or its class) implements `hook` rather than inheriting the no-op."""
    cls = plugin if isinstance(plugin, type) else type(plugin)
    return getattr(cls, hook) is not getattr(Plugin, hook)
