"""--eval-every N: the run scores itself while it trains, with the scorer `unisd eval` uses (lm-eval tasks).

Our own demo collapsed within 12 steps at a learning rate of 2e-4 and only the evaluation afterwards showed it;
scoring every N steps shows it as it happens. The student is scored in memory (no model written), in eval mode,
and lm-eval seeds the global generators, so the run's own random streams are saved before and put back after:
a run with evaluation trains exactly the weights of one without, and resumes exactly. Rank 0 scores while the
other ranks wait; `--keep-best TASK` writes the best-scoring model to DIR/best beside the last.
"""
from __future__ import annotations


from unisd import distributed, models
from unisd.rng import rng_state, set_rng_state
from unisd.run import Run

BATCH = 8  # documents per lm-eval batch


def due(run: Run) -> bool:
    """Whether the step just taken is one --eval-every scores at (every N, and the last)."""
    every = run.config.eval_every
    return bool(every) and (run.step % every == 0 or run.step == run.total_steps)


def score(run: Run) -> dict[str, float]:
    """{eval/<task>: score in points} of the student as it is now, on rank 0 ({} elsewhere); every rank calls it."""
    found: dict[str, float] = {}
    if run.world.main:
        found = _score(run)
    distributed.barrier(run.world)
    return found


def _score(run: Run) -> dict[str, float]:
    from lm_eval.models.huggingface import HFLM

    from unisd.evaluate import run_lm_eval, scores

    c = run.config
    model = models.base_model(run.policy.model)  # under LoRA the layers hold the adapter: it computes as the student
    streams, training = rng_state(), model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=run.tokenizer, batch_size=BATCH, device=str(run.world.device),
                  chat_template_args=c.template_kwargs())
        tasks = [t.strip() for t in c.eval_tasks.split(",") if t.strip()]
        include = [c.eval_include] if c.eval_include else []
        result = run_lm_eval(lm, tasks, c.eval_limit or None, include, BATCH)
    finally:
        model.train(training)
        set_rng_state(streams)
    return {f"eval/{task}": value for task, value in scores(result).items()}


def improved(run: Run, found: dict[str, float]) -> bool:
    """Whether --keep-best's task scored higher than ever before in this run (decided on rank 0, told to all)."""
    task = run.config.keep_best
    value = found.get(f"eval/{task}")
    better = value is not None and (not run.best or value > run.best["score"])
    if better:
        run.best = {"task": task, "score": value, "step": run.step}
    return distributed.any_rank(bool(better), run.world)

