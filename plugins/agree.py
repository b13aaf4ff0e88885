"""Multi-teacher agreement (UniSD paper §2.2, Eq. 2): trust the teacher less where its views disagree.

    unisd train ... --plugins agree -o agree.k=3 -o agree.level=token -o agree.contexts=retrieval

The same sampled completion is scored under K auxiliary contexts c_k (one batched no-grad teacher
forward with the primary teacher): ℓ^k_t = log π_T(ŷ_t | x, c_k, ŷ_<t). Each context is the student
prompt preceded by one solved *other* example (`random` or `retrieval` neighbour; never the current
gold answer) or by an instruction the model induced from a few solved examples (`induction`). As in
the official code, a solved example is shown compactly: its question and options (multiple choice) or
its instruction (tool use), then its solved answer, never its whole prompt.

Contexts fit --max-prompt-tokens by construction, so agree never changes which examples a run trains
on: a donor whose context is too long gives way to the next-nearest one (up to 4·K candidates), and
an example for which none fits keeps weight 1 and stays out of the δ quantile; it is counted at setup
and in the metric `agree/no_context`. `agree/removed` = 1 − mean weight says how much the mechanism
acted on a step.

Token level:    δ_t = var_k ℓ^k_t (unbiased) or range;  q = 0.95-quantile of δ over masked tokens;
                w_t = max(1 / (1 + γ·min(δ_t/q, cap)), floor)
Sequence level: L^k = Σ_t m ℓ^k_t / Σ_t m;  δ = var_k L^k (population) or range;
                w = max(exp(−γ·δ), 1e-6), returned as a [B, 1] weight.

Differences from the official code:
- sequence weights really down-weight a sequence against the others in the batch, because the
  core's `losses.weighted_mean` weights each sequence by its mean weight; the official per-sequence
  normalisation by Σ_t m·w cancels a constant sequence weight (agreement_seq_* ≈ plain SD);
- K = 1 is refused (the official unbiased variance of one view is NaN);
- retrieval works offline by default (TF-IDF cosine, scikit-learn) over the student prompt;
  `retriever=minilm` uses all-MiniLM-L6-v2 as the official code does; self-matches are excluded, and so
  are duplicates of the example (same prompt and earlier turns), whichever way donors are picked;
- induction samples the instructions with a seeded generator and caches them by content hash.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from unisd import distributed, generation
from unisd.api import Batch, Outputs, Plugin, RunView
from unisd.data.prompts import in_context, student_prompt
from unisd.sequences import Prompt, render
from unisd_plugins import _contexts as C

CANDIDATES_PER_VIEW = 4   # donors ranked per context; a donor whose context is too long gives way to the next


def token_weights(logps: torch.Tensor, mask: torch.Tensor, gamma: float, stat: str = "var",
                  quantile: float = 0.95, cap: float = 10.0, floor: float = 0.01,
                  pool: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> torch.Tensor:
    """Token reliability weights [B, T] from view log-probs [K, B, T] (K >= 2) and the mask [B, T].

    `pool` gathers the masked δ of every data-parallel rank, so the quantile is that of the global batch.
    """
    delta = logps.var(0, unbiased=True) if stat == "var" else logps.amax(0) - logps.amin(0)
    pooled = pool(delta[mask.bool()].float())
    q = torch.quantile(pooled, quantile).clamp_min(1e-6) if pooled.numel() else delta.new_tensor(1.0)
    w = 1.0 / (1.0 + gamma * (delta / q).clamp_max(cap))
    return w.clamp_min(floor).detach()


def sequence_weights(logps: torch.Tensor, mask: torch.Tensor, gamma: float, stat: str = "var") -> torch.Tensor:
    """Sequence reliability weights [B, 1] from view log-probs [K, B, T] and the mask [B, T]."""
    m = mask.to(logps.dtype)
    per_view = (logps * m).sum(-1) / m.sum(-1).clamp_min(1.0)          # [K, B]
    delta = per_view.var(0, unbiased=False) if stat == "var" else per_view.amax(0) - per_view.amin(0)
    return torch.exp(-gamma * delta).clamp_min(1e-6)[:, None].detach()


class Agree(Plugin):
    __doc__ = __doc__

    @dataclass(frozen=True)
    class Config:
        k: int = 3                   # auxiliary views per example (official orchestrator: 3)
        gamma: float = 0.01          # agreement strength γ (orchestrator: 0.01; UniSD*: 0.001)
        level: Literal["token", "sequence"] = "token"
        stat: Literal["var", "range"] = "var"
        contexts: Literal["random", "retrieval", "induction"] = "retrieval"
        quantile: float = 0.95       # token level: δ is normalised by this quantile over masked tokens
        cap: float = 10.0            # token level: cap on the normalised δ
        floor: float = 0.01          # token level: smallest weight
        retriever: Literal["tfidf", "minilm"] = "tfidf"   # tfidf: offline; minilm: sentence-transformers
        induction_demos: int = 3     # solved examples shown per induction prompt (orchestrator: 3)
        induction_max: int = 16      # at most this many induced instructions (official: 100)
        induction_tokens: int = 96   # max new tokens per induced instruction

        def __post_init__(self) -> None:
            checks = [
                (self.k >= 2, f"agree.k must be at least 2 (disagreement needs two views), got {self.k}"),
                (self.gamma >= 0, "agree.gamma must be >= 0"),
                (self.level in ("token", "sequence"), f"agree.level must be token or sequence, got {self.level!r}"),
                (self.stat in ("var", "range"), f"agree.stat must be var or range, got {self.stat!r}"),
                (self.contexts in ("random", "retrieval", "induction"),
                 f"agree.contexts must be random, retrieval or induction, got {self.contexts!r}"),
                (0 < self.quantile <= 1, "agree.quantile must be in (0, 1]"),
                (self.cap > 0, "agree.cap must be positive"),
                (0 < self.floor <= 1, "agree.floor must be in (0, 1]"),
                (self.retriever in ("tfidf", "minilm"), f"agree.retriever must be tfidf or minilm, got {self.retriever!r}"),
                (self.induction_demos >= 1 and self.induction_max >= 1 and self.induction_tokens >= 1,
                 "agree.induction_demos, induction_max and induction_tokens must be at least 1"),
            ]
            for ok, message in checks:
                if not ok:
                    raise ValueError(message)

    config: Config

    @classmethod
    def extra_forwards(cls, options: dict[str, Any]) -> float:
        return float(options["k"])  # one view per auxiliary context

    def __init__(self, config: Config | None = None) -> None:
        super().__init__(config)
        self.contexts: list[list[str]] = []   # example index -> K prompts
        self.world = distributed.World(0, 1, torch.device("cpu"))  # replaced by the run's at setup

    def view_names(self) -> list[str]:
        return [f"{self.name or 'agree'}:{k}" for k in range(self.config.k)]

    def setup(self, run: RunView) -> None:
        c, examples, seed = self.config, run.examples, run.config.seed
        self.world = run.world
        if len(examples) < 2 and c.contexts != "induction":
            raise ValueError("agree needs at least 2 examples: a context shows a solved *other* example")
        limit = run.config.max_prompt_tokens
        fits = lambda prompt: len(render(run.tokenizer, prompt)) <= limit  # noqa: E731
        if c.contexts == "induction":
            self.contexts = self._induced(run, fits)
        else:
            pool = min(len(examples) - 1, CANDIDATES_PER_VIEW * c.k)  # nearer donors first, farther ones as spares
            if c.contexts == "random":
                donors = C.random_donors(len(examples), pool, seed)
            else:
                key = {"kind": "retrieval-v2", "data": generation.data_digest(examples), "pool": pool, "retriever": c.retriever}
                donors = generation.cached("agree", key, lambda: C.retrieval_donors(
                    [C.donor_task(e) for e in examples], pool, c.retriever))
            # a duplicate of the example in the data is never its donor: it would show this task's gold answer
            self.contexts = [C.pick_fitting((C.reference_context(e, examples[j]) for j in candidates
                                             if not C.same_task(e, examples[j])), c.k,
                                            lambda text, e=e: fits(in_context(e, text)))
                             for e, candidates in zip(examples, donors)]
        unfit = sum(not views for views in self.contexts)
        if unfit:
            distributed.say(f"warning: {self.name}: {unfit} of {len(examples)} examples have no auxiliary context within "
                            f"--max-prompt-tokens {limit}; they keep weight 1 (metric {self.name}/no_context)")

    def _induced(self, run: RunView, fits: Callable[[Prompt], bool]) -> list[list[str]]:
        """K induced instructions per example, drawn with replacement from a seeded, cached pool."""
        c, examples, seed = self.config, run.examples, run.config.seed
        rng = random.Random(seed)
        n_sets = max(1, min(len(examples) // c.induction_demos, c.induction_max))
        order = rng.sample(range(len(examples)), len(examples))
        demo_sets = [[examples[j] for j in order[s * c.induction_demos:(s + 1) * c.induction_demos]]
                     for s in range(n_sets)]   # n_sets <= n // demos, or 1 set of all n: never empty
        key = {"kind": "induction", "data": generation.data_digest(examples), "model": run.config.model,
               "weights": generation.model_digest(run.policy), "seed": seed, "demos": c.induction_demos,
               "max": c.induction_max, "tokens": c.induction_tokens}
        pool = generation.cached("agree", key, lambda: [text for text, _ in generation.generate(
            run.policy, [C.induction_prompt(d) for d in demo_sets], c.induction_tokens, seed,
            desc="inducing instructions")])
        pool = [p for p in pool if p.strip()]
        if not pool:
            raise ValueError("agree: the model induced no usable instruction (all empty); use contexts=retrieval")
        return [C.pick_fitting([C.instruction_context(e, p) for p in rng.choices(pool, k=c.k)], c.k,
                               lambda text, e=e: fits(in_context(e, text)))
                for e in examples]

    def views(self, batch: Batch) -> dict[str, list[Prompt]]:
        # an example without a fitting context is scored under its student prompt and keeps weight 1;
        # a context replaces the last user turn, after the example's earlier turns
        rows = list(zip(batch.indices, batch.examples))
        return {name: [in_context(e, self.contexts[i][k]) if self.contexts[i] else student_prompt(e) for i, e in rows]
                for k, name in enumerate(self.view_names())}

    def weights(self, out: Outputs) -> torch.Tensor:
        c = self.config
        logps = torch.stack([out.logps[v] for v in self.view_names()])          # [K, B, T]
        fitted = torch.tensor([bool(self.contexts[i]) for i in out.batch.indices], device=out.mask.device)
        if c.level == "token":
            w = token_weights(logps, out.mask * fitted[:, None], c.gamma, c.stat, c.quantile, c.cap, c.floor,
                              lambda t: distributed.cat(t, self.world))
            w = torch.where(fitted[:, None], w, torch.ones_like(w))
            mean = float((w * out.mask).sum() / out.mask.sum().clamp_min(1.0))
        else:
            w = sequence_weights(logps, out.mask, c.gamma, c.stat)
            w = torch.where(fitted[:, None], w, torch.ones_like(w))
            has = out.mask.sum(-1) > 0
            mean = float(w[has].mean()) if has.any() else 1.0
        out.metrics[f"{self.name}/weight_mean"] = mean
        out.metrics[f"{self.name}/removed"] = 1.0 - mean   # how much the mechanism acted
        out.metrics[f"{self.name}/no_context"] = float(1.0 - fitted.float().mean())
        return w
