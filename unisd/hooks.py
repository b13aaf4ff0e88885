"""The hook host: calls every selected plugin's hook and combines the answers by that hook's rule.

Built once per run from the plugins in command-line order. Each hook has one typed method here, and
its docstring is the rule; `unisd.train` calls each at one line. A plugin that raises is named in a
`TrainError` (the run then checkpoints and stops).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Sequence, TypeVar

from unisd.api import EXCLUSIVE, Batch, Outputs, Plugin, PluginError, RunView, TrainError, overrides

if TYPE_CHECKING:
    import torch

    from unisd.rollout import Rollout
    from unisd.sequences import Prompt

T = TypeVar("T")


def blame(plugin: Plugin, hook: str, call: Callable[..., T], *args: Any) -> T:
    """Call one plugin's hook; a failure names the plugin and the hook."""
    try:
        return call(*args)
    except Exception as e:
        raise TrainError(f"plugin '{plugin.name}' failed in {hook}: {type(e).__name__}: {e}") from e


def refuse_two_answers(plugins: Sequence[Plugin]) -> None:
    """Two plugins that both answer an exclusive hook (teacher, completions) cannot be combined."""
    for hook in EXCLUSIVE:
        providers = [p.name for p in plugins if overrides(p, hook) and hook not in p.composes]
        if len(providers) > 1:
            raise PluginError(f"plugins {' and '.join(repr(n) for n in providers)} both provide the {hook} hook, "
                              "and only one can answer it; select one of them")


class Hooks:
    """The selected plugins, seen as one: a method per hook, each holding its combination rule."""

    def __init__(self, plugins: Sequence[Plugin]) -> None:
        refuse_two_answers(plugins)
        self.plugins = list(plugins)

    def setup(self, run: RunView) -> None:
        """Each plugin in order."""
        for p in self.plugins:
            blame(p, "setup", p.setup, run)

    def completions(self, batch: Batch, run: RunView) -> Rollout | None:
        """The first plugin that answers supplies the completions; None: the student samples."""
        for p in self.plugins:
            found = blame(p, "completions", p.completions, batch, run)
            if found is not None:
                return found
        return None

    def views(self, batch: Batch) -> dict[str, Sequence[Prompt]]:
        """Every plugin's extra views, merged (view names are the plugins' own)."""
        merged: dict[str, Sequence[Prompt]] = {}
        for p in self.plugins:
            merged.update(blame(p, "views", p.views, batch))
        return merged

    def teacher(self, run: RunView) -> Any:
        """The primary teacher a plugin supplies (the last that answers), or None for the frozen initial model."""
        chosen = None
        for p in self.plugins:
            chosen = blame(p, "teacher", p.teacher, run) or chosen
        return chosen

    def token_loss(self, D: torch.Tensor, out: Outputs) -> torch.Tensor:
        """D passed through every plugin's transform, chained in command-line order."""
        for p in self.plugins:
            D = blame(p, "token_loss", p.token_loss, D, out)
        return D

    def weights(self, out: Outputs) -> torch.Tensor | None:
        """The product of every plugin's weights; None when no plugin weights."""
        product = None
        for p in self.plugins:
            w = blame(p, "weights", p.weights, out)
            product = w if product is None else (product if w is None else product * w)
        return product

    def aux_losses(self, out: Outputs) -> dict[str, torch.Tensor]:
        """Every plugin's named auxiliary terms, merged."""
        merged: dict[str, torch.Tensor] = {}
        for p in self.plugins:
            merged.update(blame(p, "aux_losses", p.aux_losses, out))
        return merged

    def after_step(self, run: RunView) -> None:
        """Each plugin in order, after an optimizer step that updated the weights."""
        for p in self.plugins:
            blame(p, "after_step", p.after_step, run)

    def state_dict(self) -> dict[str, dict[str, Any]]:
        """Plugin name -> its state, for the checkpoint."""
        return {p.name: p.state_dict() for p in self.plugins}

    def load_state_dict(self, states: dict[str, dict[str, Any]]) -> None:
        """Give each plugin its saved state back (a plugin with none saved keeps its own)."""
        for p in self.plugins:
            if p.name in states:
                p.load_state_dict(states[p.name])
