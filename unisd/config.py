"""The run configuration: one frozen dataclass, presets, and `-o plugin.key=value` parsing.

Precedence, lowest first: TrainConfig defaults < preset < command-line flags and -o overrides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from unisd.plugin import PluginError


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: str
    out: str
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # plugin -> option -> value
    preset: str = ""
    max_steps: int = 0                 # 0: one pass over the data
    batch_size: int = 4                # prompts per micro-batch
    grad_accum: int = 1
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_new_tokens: int = 256
    max_prompt_tokens: int = 1024      # longer prompts (student or any teacher view) are dropped, never cut
    temperature: float = 0.7           # rollout sampling temperature
    top_p: float = 1.0
    loss_temperature: float = 0.7      # both logit sets are divided by it inside the divergence
    divergence: str = "fkl"            # fkl | rkl | jsd
    alpha: float = 0.5                 # jsd mixture weight (Eq. 7)
    mask_truncated: bool = False       # drop completions that hit max_new_tokens without EOS from the loss
    bf16: bool = False                 # bf16 autocast on CPU too; bf16 copies of the frozen/EMA teacher and for sampling
    seed: int = 42
    save_every: int = 0                # 0: checkpoint only at the end
    keep_checkpoints: int = 2
    max_bad_steps: int = 3             # consecutive non-finite steps before stopping
    lora: bool = False
    lora_r: int = 64
    lora_alpha: int = 128
    lora_dropout: float = 0.05
    fsdp: bool = False                 # under torchrun: shard weights, gradients and optimizer state (FSDP2)

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.max_steps >= 0, "--max-steps must be 0 (one epoch) or more"),
            (self.lr > 0, "--lr must be positive"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.max_prompt_tokens >= 1, "--max-prompt-tokens must be at least 1"),
            (self.temperature > 0, "--temperature must be positive"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.loss_temperature > 0, "--loss-temperature must be positive"),
            (self.divergence in DIVERGENCES, f"--divergence must be one of {', '.join(DIVERGENCES)}"),
            (self.divergence != "jsd" or 0 < self.alpha < 1, "--alpha must be in (0, 1) for jsd (fkl and rkl are the endpoints)"),
            (self.save_every >= 0, "--save-every must be 0 or more"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (not (self.fsdp and self.lora), "--fsdp and --lora cannot be combined yet; a LoRA run keeps one "
                                            "frozen copy of the weights, so use data parallelism (no --fsdp)"),
            (not (self.fsdp and self.bf16), "--bf16 samples from a whole bf16 copy of the weights; drop it with --fsdp"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


DIVERGENCES = ("fkl", "rkl", "jsd")


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag."""


@dataclass(frozen=True)
class Preset:
    """A named configuration: plugins, their options, and trainer settings. `source` says where it comes from."""

    description: str
    source: str
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "sd": Preset("plain on-policy self-distillation: student samples, the demonstration-conditioned "
                 "initial model scores, forward KL (the paper's Raw)", "UniSD paper, Eq. 1 with w = 1"),
    "sft": Preset("supervised fine-tuning: cross-entropy on the gold demonstration (reasoning + answer); "
                  "never samples", "UniSD paper's SFT baseline (static imitation)",
                  ("mix", "nll"), {"mix": {"source": "gold", "prob": 1.0}}),
    "sdft": Preset("self-distillation fine-tuning: on-policy samples at temperature 1, the demonstration-"
                   "conditioned frozen initial model as teacher, generalized JSD alpha 0.5 at temperature 1",
                   "Shenfeld et al. 2026, arXiv 2601.19897 (TRL SDFT defaults: alpha 0.5, base teacher, "
                   "full-vocabulary here instead of its top-100 support)",
                   settings={"divergence": "jsd", "alpha": 0.5, "temperature": 1.0, "loss_temperature": 1.0}),
    "gkd": Preset("generalized knowledge distillation: JSD beta 0.5; each micro-batch is on-policy with "
                  "probability lambda 0.5, else the dataset completion; sampling temperature 0.9, loss at 1",
                  "Agarwal et al., ICLR 2024 (TRL GKD defaults); the teacher is the demonstration-conditioned "
                  "self-teacher, as there is no stronger model here",
                  ("mix",), {"mix": {"source": "gold", "prob": 0.5}},
                  {"divergence": "jsd", "alpha": 0.5, "temperature": 0.9, "loss_temperature": 1.0}),
    "ssd": Preset("simple self-distillation: cross-entropy on the frozen base model's own samples "
                  "(temperature 1.0; no teacher, no verifier)",
                  "Zhang et al. 2026, arXiv 2604.01193 (the sampling temperature is mix.temperature)",
                  ("mix", "nll"), {"mix": {"source": "base", "prob": 1.0, "temperature": 1.0}}),
    "opsd": Preset("on-policy self-distillation with the current model as its own privileged-context "
                   "teacher (EMA with beta 0 every step), reverse KL at temperature 1",
                   "Zhao et al. 2026, arXiv 2601.18734 (same weights teach with the solution in context; "
                   "per-token reverse KL)",
                   ("ema",), {"ema": {"beta": 0.0, "every": 1}},
                   {"divergence": "rkl", "loss_temperature": 1.0}),
    "unisd-star": Preset(
        "UniSD*: EMA teacher + token-level retrieval agreement + contrastive hinge + joint feature matching "
        "+ divergence clipping at 10",
        "official orchestrator's unisd_star values (scripts/run_experiments.py); the official preset omits "
        "clipping (token_clip None), added here at kappa = 10 as the paper's section 2.3 describes",
        ("ema", "agree", "contrast", "match", "clip"),
        {"ema": {"beta": 0.98, "every": 10},
         "agree": {"k": 3, "gamma": 0.001, "level": "token", "stat": "var", "contexts": "retrieval"},
         "contrast": {"weight": 0.01, "margin": 0.1},
         "match": {"weight": 0.01, "mode": "joint"},
         "clip": {"max": 10.0}}),
    "agree-tok": Preset("token-level agreement weights, K = 3 retrieval contexts",
                        "official orchestrator agreement_tok_retrieval (gamma 0.01)", ("agree",),
                        {"agree": {"k": 3, "gamma": 0.01, "level": "token", "contexts": "retrieval"}}),
    "agree-seq": Preset("sequence-level agreement weights, K = 3 retrieval contexts (the paper's Agree row)",
                        "official orchestrator agreement_seq_retrieval (gamma 0.01)", ("agree",),
                        {"agree": {"k": 3, "gamma": 0.01, "level": "sequence", "contexts": "retrieval"}}),
    "ema": Preset("EMA teacher of the student's effective weights", "official orchestrator ema (every 10, beta 0.9)",
                  ("ema",), {"ema": {"beta": 0.9, "every": 10}}),
    "contrast": Preset("token-level contrastive hinge against verified-wrong self-generated demos",
                       "official orchestrator contrastive (weight 0.1, margin 0.5)", ("contrast",),
                       {"contrast": {"weight": 0.1, "margin": 0.5}}),
    "match-joint": Preset("forward KL + final hidden-state matching", "official orchestrator match_joint (weight 0.1)",
                          ("match",), {"match": {"weight": 0.1, "mode": "joint"}}),
    "match-repr": Preset("final hidden-state matching only (divergence ignored)",
                         "official orchestrator match_repr (weight 0.1)", ("match",),
                         {"match": {"weight": 0.1, "mode": "repr"}}),
    "clip": Preset("forward KL clipped at 10 nats per token", "official clip mode (token_clip 10.0, alpha 0 = forward KL)",
                   ("clip",), {"clip": {"max": 10.0}}),
}


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, dict[str, str]]:
    """`["agree.k=3", "ema.beta=0.9"]` -> {"agree": {"k": "3"}, "ema": {"beta": "0.9"}}."""
    parsed: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        plugin, dot, option = key.partition(".")
        if not sep or not dot or not plugin or not option:
            raise PluginError(f"-o {item!r}: expected plugin.option=value, e.g. -o agree.k=5")
        parsed.setdefault(plugin.strip(), {})[option.strip()] = value.strip()
    return parsed


def resolve(preset: str, plugins: tuple[str, ...], overrides: Mapping[str, Mapping[str, str]],
            **settings: Any) -> TrainConfig:
    """Merge defaults, a preset and explicit settings (None means 'not given') into a TrainConfig."""
    base: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    chosen = plugins
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}' (presets: {', '.join(PRESETS)})")
        p = PRESETS[preset]
        base.update(p.settings)
        options = {k: dict(v) for k, v in p.options.items()}
        chosen = tuple(dict.fromkeys(p.plugins + plugins))  # preset plugins first, extra ones appended
    for plugin, opts in overrides.items():
        options.setdefault(plugin, {}).update(opts)
    base.update({k: v for k, v in settings.items() if v is not None})
    try:
        return TrainConfig(plugins=chosen, options=options, preset=preset, **base)
    except TypeError as e:
        raise ConfigError(str(e)) from None
