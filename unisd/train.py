"""The training loop: rollout -> views -> forwards -> plugin hooks -> loss -> step -> checkpoint.

Read `step` top to bottom: every plugin hook is called at one visible line, and the core never names
a mechanism. `train(config)` runs a whole job; `prepare(config)` builds the `Run` it works on.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from unisd import (checkpoint, distributed, hardware, hub, losses, midrun, models, monitor, progress, report, tracking,
                   views)
from unisd.api import Batch, Outputs, TrainError
from unisd.callable_module import make_callable
from unisd.config import ConfigError, TrainConfig
from unisd.data import DataError, Example, benchmarks, load_data
from unisd.data.prompts import student_prompt, teacher_prompt
from unisd.hooks import Hooks
from unisd.plugin import load as load_plugins, settle_objective
from unisd.rng import rng_state, set_rng_state
from unisd.policy import Model, Policy
from unisd.rollout import ignored_settings
from unisd.run import TEACHER_OBJECTIVES, Run, data_order, order_slice
from unisd.sequences import RenderError, render, with_template_kwargs

__all__ = ["TrainError", "data_order", "forward", "make_batch", "prepare", "step", "train"]


def _autocast(run: Run) -> torch.autocast:
    """bf16 mixed precision (fp32 master weights) on CUDA, and on CPU with --bf16; else plain fp32.

    Under --fsdp without a weight cache: it would keep the bf16 cast of every gathered layer until the forward
    ends, a whole bf16 copy of the student per rank, undoing the sharding.
    """
    device = run.world.device.type
    return torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda" or run.config.bf16,
                          cache_enabled=not run.config.fsdp)


def forward(run: Run, batch: Batch, teacher: Model | None) -> Outputs:
    """Student forward (grad) and one batched no-grad forward of every teacher view on the same completion.

    `teacher` None (the objective and the plugins need none, `Run.needs_teacher`): the student's forward alone.
    The forwards see every sampled token (`batch.mask`); the loss and the log-probs cover the counted ones.
    """
    assert batch.tokens is not None and batch.mask is not None
    counted = batch.mask if batch.loss_mask is None else batch.loss_mask
    pad = run.tokenizer.pad_token_id
    tok = lambda view: [render(run.tokenizer if view == "student" else run.teacher_tokenizer or run.tokenizer, p)  # noqa: E731
                        for p in batch.prompts[view]]
    with _autocast(run):
        student_h = views.hidden(run.policy.student.hidden, tok("student"), batch.tokens, batch.mask, pad,
                                 views.one_batch(batch.tokens.shape[0]))
    where = counted.bool()
    tokens = batch.tokens[where]
    student_head = run.policy.student.head
    c = run.config
    if teacher is None:
        lp_student = losses.logprobs_in_chunks(student_head, student_h[where], tokens, bf16=run.policy.bf16)
        per_token = _scatter(lp_student, where)
        return Outputs(batch, counted, losses.objective(c.divergence, torch.zeros_like(per_token), per_token),
                       {"student": per_token}, {"student": student_h})
    no_grad_views = [v for v in batch.prompts if v != "student"]  # "teacher" first, then plugin views
    rows = sum((tok(v) for v in no_grad_views), [])
    B, T = batch.tokens.shape
    # rows of similar length run together, a repeated row once; under FSDP every rank must run the same
    # forwards (their all-gathers pair up), so there rows run in order; at most B rows a forward either way,
    # so the views' activations are those of the student's batch whatever the plugins add
    plan = views.one_batch(len(rows), B) if c.fsdp else views.by_length(rows, B, T, size=B)
    with torch.no_grad(), _autocast(run):
        stacked = views.hidden(teacher.hidden, rows, batch.tokens, batch.mask, pad, plan)
    view_h = {v: stacked[i * B:(i + 1) * B] for i, v in enumerate(no_grad_views)}
    teacher_head = teacher.head
    # ce and none need no divergence; the chunked pass still gives the log-probs (forward KL, then unused)
    divergence = losses.pick(c.divergence if c.divergence in TEACHER_OBJECTIVES else "fkl", c.alpha)
    D, lp_student, lp_teacher = losses.distill_in_chunks(
        student_head, student_h[where], teacher_head, view_h["teacher"][where], tokens, divergence, c.loss_temperature,
        bf16=run.policy.bf16)
    logps = {"student": lp_student, "teacher": lp_teacher}
    with torch.no_grad():
        for v in no_grad_views[1:]:
            logps[v] = losses.logprobs_in_chunks(teacher_head, view_h[v][where], tokens, bf16=run.policy.bf16)
    per_view = {v: _scatter(x, where) for v, x in logps.items()}
    return Outputs(batch, counted, losses.objective(c.divergence, _scatter(D, where), per_view["student"]),
                   per_view, {"student": student_h, "teacher": view_h["teacher"]})


def _teacher(run: Run) -> Model:
    """The primary teacher: a plugin's (ema), or the frozen initial model."""
    chosen = run.hooks.teacher(run)
    return run.policy.initial if chosen is None else run.policy.as_model(chosen)


def _zero_through_student(run: Run, out: Outputs) -> torch.Tensor:
    """A zero that depends on every student weight the loss uses (decoder and head): its backward gives
    zero gradients, so DDP's all-reduce and FSDP's reduce-scatter happen on this rank as on the others."""
    head = run.policy.student.head
    with _autocast(run):
        return 0.0 * head(out.hidden["student"][:, :1]).float().sum()


def _scatter(values: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    full = values.new_zeros(where.shape)
    return full.masked_scatter(where, values)


def make_batch(run: Run) -> Batch:
    """The next micro-batch in the seeded data order, with its student and teacher prompts; each prompt's row
    repeated --num-generations times, so every row samples its own completion and the loss weighs all alike."""
    B, G, world = run.config.batch_size, run.config.num_generations, run.world
    global_slice = order_slice(len(run.kept), run.config.order_seed, run.position, B * world.size)
    indices = [run.kept[i] for i in global_slice[world.rank * B:(world.rank + 1) * B] for _ in range(G)]  # this rank's
    run.position += B * world.size
    examples = [run.examples[i] for i in indices]
    return Batch(indices, examples, {"student": [student_prompt(e) for e in examples],
                                     "teacher": [teacher_prompt(e, template=run.config.teacher_template) for e in examples]})


def step(run: Run) -> dict[str, float]:
    """One optimizer step over grad_accum micro-batches; returns the metrics to log."""
    c, hooks = run.config, run.hooks
    assert run.optimizer is not None
    started = time.perf_counter()
    totals: dict[str, float] = {}
    timing = {"rollout_s": 0.0, "forward_s": 0.0, "backward_s": 0.0}
    for micro in range(c.grad_accum):
        batch = make_batch(run)
        t0 = time.perf_counter()
        rollout = hooks.completions(batch, run)
        sampled = rollout is None
        if rollout is None:  # on-policy: the student samples
            prompt_ids = [render(run.tokenizer, p) for p in batch.prompts["student"]]
            rollout = run.policy.sample(prompt_ids, c.max_new_tokens, c.temperature, c.top_p, top_k=c.top_k)
        device = run.world.device
        batch.tokens, batch.truncated = rollout.tokens.to(device), rollout.truncated
        batch.mask = batch.loss_mask = rollout.mask.to(device)
        if c.mask_truncated:
            batch.loss_mask = batch.loss_mask * (~rollout.truncated).to(device, batch.mask.dtype)[:, None]
        if c.skip_first_tokens:
            batch.loss_mask = losses.without_first(batch.loss_mask, c.skip_first_tokens)
        t1 = time.perf_counter()
        batch.prompts.update(hooks.views(batch))
        # gradients are reduced over the ranks once per step: DDP's no_sync must hold the forward too
        with run.policy.accumulating(skip_sync=micro < c.grad_accum - 1):
            out = forward(run, batch, _teacher(run) if run.needs_teacher else None)
            if micro == 0 and run.world.main and c.log_samples and (run.step + 1) % c.log_samples == 0:
                run.samples = monitor.sample_records(run.step + 1, batch.prompts["student"], rollout, out, run.tokenizer)
            D = hooks.token_loss(out.divergence, out)
            w = hooks.weights(out)
            numerator, denominator = losses.weighted_sums(D, out.mask, w)
            # the denominator of the whole global batch: DDP's average over ranks then equals one process
            distill = numerator * run.world.size / distributed.total(denominator, run.world).clamp_min(1e-12)
            aux = hooks.aux_losses(out)
            loss = distill + sum(aux.values())
            for name, term in aux.items():  # how much each auxiliary term acts: its share of the loss
                out.metrics[f"{name}/share"] = float(term.detach() / loss.detach()) if float(loss.detach()) else 0.0
            t2 = time.perf_counter()
            if not loss.requires_grad:  # no token counts here (e.g. every completion masked): still join
                loss = loss + _zero_through_student(run, out)  # the other ranks' gradient reduction
            (loss / c.grad_accum).backward()
        t3 = time.perf_counter()
        timing["rollout_s"] += t1 - t0
        timing["forward_s"] += t2 - t1
        timing["backward_s"] += t3 - t2
        terms = {"loss": loss, "distill": distill, **aux}
        for k, v in {**{k: float(v.detach()) for k, v in terms.items()}, **out.metrics,
                     "completion_tokens": float(out.mask.sum()),
                     "truncated": float(rollout.truncated.float().mean()),
                     # the same for the student's own samples alone (the collapse warning reads these)
                     "student_sampled": float(sampled),
                     "student_truncated": float(rollout.truncated.float().mean()) if sampled else 0.0,
                     **monitor.rollout_stats(rollout.tokens, rollout.mask)}.items():
            totals[k] = totals.get(k, 0.0) + v / c.grad_accum
    totals = distributed.mean(totals, run.world)
    t4 = time.perf_counter()
    grad_norm = distributed.whole(torch.nn.utils.clip_grad_norm_(
        [p for _, p in run.policy.trainable()], c.max_grad_norm))
    finite = math.isfinite(totals["loss"]) and bool(torch.isfinite(grad_norm))
    if finite:
        run.optimizer.step()
        run.bad_steps = 0
    else:
        run.bad_steps += 1
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]  # the rate this update used, before the schedule moves on
    run.scheduler.step()
    run.step += 1
    timing["optimizer_s"] = time.perf_counter() - t4
    t5 = time.perf_counter()
    if finite:
        hooks.after_step(run)
    timing["after_step_s"] = time.perf_counter() - t5
    return {"step": run.step, **totals, "grad_norm": float(grad_norm), "lr": lr,
            "skipped": not finite, **timing, "step_time_s": time.perf_counter() - started}


def prepare(config: TrainConfig, echo: Callable[[str], None] = print) -> Run:
    """Validate everything and load models, data and plugins; writes nothing."""
    if config.rollout == "vllm":
        from unisd import engine

        engine.require()  # before anything loads: a missing engine is the first thing to say
    hooks = Hooks(load_plugins(list(config.plugins), config.options))  # conflicts refused before any load
    config = settle_objective(config, hooks.plugins)
    examples = training_data(config)
    loaded = models.load_tokenizer(config.model)
    tokenizer = with_template_kwargs(loaded, config.template_kwargs())
    if config.teacher:
        _check_teacher(config, loaded, hooks)
    world = distributed.init(config.dist_timeout_min)
    echo = echo if world.main else (lambda m: None)  # one voice under torchrun
    if config.fsdp and world.size == 1 and not distributed.under_torchrun():
        raise ConfigError("--fsdp shards over several processes: launch with torchrun --nproc_per_node N")
    torch.manual_seed(config.seed + world.rank)  # ranks sample different completions
    kept = _fitting(config, tokenizer, examples, echo)  # before the model loads: a refused row is said first
    policy = Policy(config, world, tokenizer)
    _say_what_differs(config, policy.model, world, echo)
    run = Run(config, policy, tokenizer, examples, hooks, world, Path(config.out))
    run.truncation = monitor.TruncationWatch(config.max_new_tokens)
    run.teacher_tokenizer = with_template_kwargs(loaded, config.template_kwargs(teacher=True))
    run.kept = kept
    per_step = config.batch_size * config.grad_accum * world.size
    run.total_steps = config.max_steps or math.ceil(len(run.kept) / per_step)
    if world.size > 1:  # every rank joins the engines' start together, not only a rank that samples first
        policy.engine  # noqa: B018
    hooks.setup(run)
    params = [p for _, p in policy.trainable()]
    # fused: one kernel over all tensors, no foreach temporaries
    run.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    run.scheduler = get_cosine_schedule_with_warmup(run.optimizer, int(config.warmup_ratio * run.total_steps),
                                                    run.total_steps)
    return run


def _check_teacher(config: TrainConfig, tokenizer: Any, hooks: Hooks) -> None:
    """--teacher's model: the student's tokenizer, and hidden states of the student's width where a plugin compares
    them (match); checked before either model loads."""
    models.check_teacher(tokenizer, config.teacher, config.model)
    widths = {spec: models.hidden_size(spec) for spec in (config.model, config.teacher)}
    if any(p.name == "match" for p in hooks.plugins) and len(set(widths.values())) > 1:
        raise ConfigError(f"--teacher {config.teacher} has hidden states of width {widths[config.teacher]}, the student "
                          f"{widths[config.model]}: the match plugin compares them; drop match or pick a teacher of "
                          "the student's width")


def _say_what_differs(config: TrainConfig, student: Any, world: Any, echo: Callable[[str], None]) -> None:
    """Once, before training: what the run will not do as the model or flags might suggest."""
    ignored = ignored_settings(student)
    if ignored:
        listed = ", ".join(f"{k}={v}" for k, v in sorted(ignored.items()))
        echo(f"note: sampling follows the run's flags (--temperature, --top-p, --top-k); the model's "
             f"generation_config.json options {listed} are ignored")
    if config.bf16 and world.device.type == "cpu" and not hardware.fast_bf16_cpu():
        echo("warning: this CPU has no native bf16 (no AVX512-BF16 or AMX flag), so --bf16 is emulated and "
             "several times slower than fp32 here; drop --bf16")


def training_data(config: TrainConfig) -> list[Example]:
    """The examples --data names; the evaluation-only benchmarks are refused (training on them leaks the test)."""
    if config.data in benchmarks.EVAL_ONLY:
        raise DataError(f"{config.data} is an evaluation-only benchmark; train on another --data and evaluate on it "
                        f"with `unisd eval`")
    return load_data(config.data, config.data_split, config.data_config, config.columns)


def _fitting(config: TrainConfig, tokenizer: Any, examples: list[Example], echo: Callable[[str], None]) -> list[int]:
    """Indices of examples whose student and teacher prompts fit max_prompt_tokens.

    Only these two prompts decide, so every run on the same data, seed and limit trains on the same
    examples in the same order whatever its plugins; a plugin's own views must fit by construction.
    A conversation the chat template refuses is a DataError naming its row (`--data`:row).
    """
    limit = config.max_prompt_tokens

    def fits(i: int, prompt: Any) -> bool:
        try:
            return len(render(tokenizer, prompt)) <= limit
        except RenderError as e:
            raise DataError(f"{config.data}:{i + 1}: {e} (model {config.model})") from None

    template = config.teacher_template
    kept = [i for i, e in enumerate(examples) if fits(i, student_prompt(e)) and fits(i, teacher_prompt(e, template=template))]
    dropped = len(examples) - len(kept)
    if not kept:
        raise DataError(f"every prompt is longer than --max-prompt-tokens {limit}; raise it")
    if dropped:
        echo(f"warning: dropped {dropped} of {len(examples)} examples whose prompts exceed {limit} tokens")
    return kept


def train(config: TrainConfig, resume: bool = False, overwrite: bool = False,
          echo: Callable[[str], None] = print, extend: bool = False, report_to: tuple[str, ...] = ()) -> Path:
    """Run a whole job: validate, train with checkpoints, write the final model into config.out.

    A resumed run must be the checkpointed one (checkpoint.identity); `extend` lets its schedule grow.
    `report_to` names trackers (unisd.tracking) that get each metrics row and the configuration.
    """
    out = Path(config.out)
    checkpoint.check_out_dir(out, resume=resume, overwrite=overwrite, extend=extend)
    hub_api = _hub_api(config)
    run = prepare(config, echo)
    with contextlib.closing(run.policy):  # the vLLM engine's memory goes back when the run ends, however it ends
        main = run.world.main
        echo = echo if main else (lambda m: None)  # one voice: rank 0 speaks and writes
        if overwrite and main:
            checkpoint.clear(out)
        distributed.barrier(run.world)
        out.mkdir(parents=True, exist_ok=True)
        if resume and checkpoint.restore(run, echo, extend):
            echo(f"resumed at step {run.step} of {run.total_steps}")
        stop = _StopOnSignal()
        metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"
        if main:
            checkpoint.truncate_metrics(metrics_path, run.step)
            checkpoint.truncate_metrics(samples_path, run.step)
        bar = tqdm(total=run.total_steps, initial=run.step, desc="train", unit="step", disable=None if main else True)
        lines = progress.StepLog(0 if progress.bar_shows() else config.log_every, run.total_steps)  # off a terminal
        with stop, (metrics_path.open("a") if main else contextlib.nullcontext()) as log, \
                tracking.Trackers(report_to if main else (), run.config.to_json(), out) as trackers:
            while run.step < run.total_steps:
                metrics = _step_or_save(run)
                if midrun.due(run):
                    scored = midrun.score(run)
                    metrics |= scored
                    echo(f"step {run.step}: " + ", ".join(f"{k} {v:.1f}" for k, v in scored.items()))
                    if config.keep_best and midrun.improved(run, scored):
                        checkpoint.save_final(run, out / "best")
                        echo(f"step {run.step}: the best {config.keep_best} so far, written to {out / 'best'}")
                if log is not None:
                    log.write(json.dumps(metrics) + "\n")
                    log.flush()
                trackers.log(metrics)
                monitor.append_jsonl(samples_path, run.samples)
                run.samples = []
                assert run.truncation is not None
                warning = run.truncation.update(monitor.own_truncated_share(metrics))
                if warning:
                    echo(warning)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.4f}")
                line = lines.line(metrics)
                if line:
                    echo(line)
                if metrics["skipped"]:
                    echo(f"step {run.step}: non-finite loss or gradient, update skipped")
                    if run.bad_steps >= config.max_bad_steps:
                        saved = checkpoint.save(run)  # skipped steps changed no weight: this state is good
                        raise TrainError(f"{run.bad_steps} non-finite steps in a row; stopped "
                                         f"(checkpoint {saved.name} holds the last good weights)")
                stopping = distributed.any_rank(bool(stop.signal), run.world)
                if stopping or (config.save_every and run.step % config.save_every == 0):
                    checkpoint.save(run)
                if stopping:
                    raise TrainError(f"stopped by {stop.signal or 'a signal'} at step {run.step}; resume with --resume")
        bar.close()
        checkpoint.save(run)
        checkpoint.save_final(run)
        if main:
            report.training_curves(metrics_path, out / "curves.png")
            if hub_api is not None:
                echo(f"pushed to {hub.push(hub_api, config.push_to_hub, out, run.step)}")
        distributed.barrier(run.world)
    return out


def _hub_api(config: TrainConfig) -> Any:
    """The Hub client --push-to-hub uploads with, checked now (rank 0 alone under torchrun), else None."""
    if not config.push_to_hub or int(os.environ.get("RANK", "0")) != 0:
        return None
    return hub.connect(config.push_to_hub, config.hub_private)


def _step_or_save(run: Run) -> dict[str, float]:
    """A step; if a plugin fails inside it, rewind to the step's start, checkpoint, and stop."""
    position, rng, done = run.position, rng_state(), run.step
    try:
        return step(run)
    except TrainError as e:
        if run.step == done:  # failed before the update: the step never happened
            run.position = position
            set_rng_state(rng)
            assert run.optimizer is not None
            run.optimizer.zero_grad(set_to_none=True)
        saved = checkpoint.save(run)
        raise TrainError(f"{e} (checkpoint {saved.name} kept; fix it and --resume)") from e


class _StopOnSignal(contextlib.AbstractContextManager):
    """SIGINT/SIGTERM finish the current step; the loop then checkpoints and exits."""

    def __init__(self) -> None:
        self.signal = ""
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopOnSignal":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


make_callable(__name__)  # the library's `from unisd import train; train(config)` is `train` above
