"""Tables and charts: comparison tables in the paper's layout, bar charts, training curves.

Pure presentation: every function takes already computed numbers (or a metrics.jsonl) and writes
markdown or PNG. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

SHORT = {"unisd_scienceqa": "ScienceQA", "unisd_mbpp": "MBPP", "unisd_cose": "CoS-E",
         "unisd_toolalpaca": "ToolAlpaca", "unisd_gpqa": "GPQA", "unisd_humaneval": "HumanEval",
         "unisd_demo": "Demo"}


def _pyplot() -> Any:
    """matplotlib.pyplot, headless, imported only when a chart is drawn: `unisd train` starts without it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(task: str) -> str:
    return SHORT.get(task, task)


def overall(row: dict[str, float], tasks: list[str]) -> float:
    """Plain mean over the tasks the row has (the paper's Overall)."""
    values = [row[t] for t in tasks if t in row]
    return sum(values) / len(values) if values else float("nan")


def _columns(table: dict[str, dict[str, float]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in table.values():
        seen.update(dict.fromkeys(row))
    return list(seen)


def _interval(ci: list[float] | tuple[float, float] | None) -> str:
    """The interval itself: intervals of 0/1 scores are asymmetric near 0 and 100, so `± half` would misstate them."""
    return f" [{ci[0]:.1f}, {ci[1]:.1f}]" if ci else ""


def score_table(table: dict[str, dict[str, float]], ci95: dict[str, dict[str, list[float]]] | None = None,
                marks: dict[str, dict[str, str]] | None = None,
                overall_ci95: dict[str, list[float]] | None = None) -> str:
    """Markdown: rows = runs, columns = tasks + Overall, scores in percent with one decimal.

    With ci95 (and overall_ci95) a cell reads `score [low, high]`, its 95% interval; marks[run][task]
    is appended to it.
    """
    cols = _columns(table)
    lines = ["| run | " + " | ".join(_label(c) for c in cols) + " | Overall |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, row in table.items():
        ci, mark = (ci95 or {}).get(name, {}), (marks or {}).get(name, {})
        cells = [f"{row[c]:.1f}{_interval(ci.get(c))}{mark.get(c, '')}" if c in row else "–" for c in cols]
        whole = f"{overall(row, cols):.1f}{_interval((overall_ci95 or {}).get(name))}"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {whole} |")
    return "\n".join(lines) + "\n"


def overall_note(items: Mapping[str, Mapping[str, Mapping[str, float]]], tasks: list[str]) -> str:
    """Over which items Overall is taken: the mean of a row's task scores; its interval resamples each task's
    items (`items`: run -> task -> item -> score), so a task without per-item scores is not in it."""
    counts = {t: max((len(per_task.get(t, {})) for per_task in items.values()), default=0) for t in tasks}
    listed = ", ".join(f"{_label(t)} {n}" for t, n in counts.items() if n)
    missing = [_label(t) for t, n in counts.items() if not n]
    return ("Overall: the mean of a row's task scores, each task counting once"
            + (f"; its interval resamples the items within each task ({listed} items)" if listed else "")
            + (f"; {', '.join(missing)}: no per-item scores, so not in the interval" if missing and listed else "")
            + ".")


def significance_marks(paired: dict[str, dict[str, dict[str, Any]]], reference: str) -> dict[str, dict[str, str]]:
    """run -> task -> ↑ / ↓ where the paired difference to `reference` has an interval excluding 0."""
    marks: dict[str, dict[str, str]] = {}
    for run, against in paired.items():
        for task, test in against.get(reference, {}).items():
            low, high = test["ci95"]
            if low > 0 or high < 0:
                marks.setdefault(run, {})[task] = " ↑" if low > 0 else " ↓"
    return marks


def paired_table(paired: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: one row per (run, reference, task): difference in points, its 95% interval, p-value."""
    lines = ["| run | vs | task | difference | 95% CI | p | test | n |", "|---|---|---|---|---|---|---|---|"]
    for run, against in paired.items():
        for reference, per_task in against.items():
            for task, t in per_task.items():
                low, high = t["ci95"]
                flag = " ↑" if low > 0 else " ↓" if high < 0 else ""
                lines.append(f"| {run} | {reference} | {_label(task)} | {t['difference']:+.1f}{flag} | "
                             f"[{low:+.1f}, {high:+.1f}] | {t['p_value']:.3g} | {t['test']} | {t['n']} |")
    return "\n".join(lines) + "\n"


def answers_table(answers: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: per task the share of each run's most frequent answer (⚠ collapsed), and for multiple
    choice the constant-answer baseline (the score of always giving the best single option)."""
    tasks = list(dict.fromkeys(t for per_task in answers.values() for t in per_task))
    lines = ["| run | " + " | ".join(_label(t) for t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    constant = {t: e for per_task in answers.values() for t, e in per_task.items() if "constant_baseline" in e}
    if constant:
        lines.append("| constant answer | " + " | ".join(
            f"{constant[t]['constant_baseline']:.1f} (always {constant[t]['constant_answer']})" if t in constant
            else "–" for t in tasks) + " |")
    for run, per_task in answers.items():
        cells = []
        for t in tasks:
            e = per_task.get(t)
            if e is None:
                cells.append("–")
                continue
            if "constant_baseline" in e:  # multiple choice: name the option (none when no answer parsed)
                top = f"{e['top_answer']} " if e["top_answer"] is not None else ""
            else:
                top = "identical "
            cells.append(f"{top}{e['top_share']:.0f}%" + (" ⚠ collapsed" if e["collapsed"] else ""))
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def generation_note(gen_toks: dict[str, int], cap: int | None) -> str:
    """The line printed under every table: how many new tokens each task could generate."""
    limits = ", ".join(f"{_label(t)} {n}" for t, n in gen_toks.items()) or "each task's own limit"
    capped = f", capped with --max-gen-toks {cap}" if cap else ""
    return f"New tokens per answer at most: {limits}{capped} (the paper: 1024).\n"


def retention_table(retention: dict[str, dict[str, dict[str, Any]]]) -> str:
    """Markdown: PPL_ret and PPL_fit per run and task (lower is better for both)."""
    tasks: dict[str, None] = {}
    for per_task in retention.values():
        tasks.update(dict.fromkeys(per_task))
    head = " | ".join(f"{_label(t)} PPL_ret | {_label(t)} PPL_fit" for t in tasks)
    lines = [f"| run | {head} |", "|---|" + "---|---|" * len(tasks)]
    for name, per_task in retention.items():
        cells = []
        for t in tasks:
            r = per_task.get(t, {})
            cells += [_num(r.get("ppl_ret"), r.get("ppl_ret_ci95")), _num(r.get("ppl_fit"), r.get("ppl_fit_ci95"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float | None, ci: list[float] | None = None) -> str:
    """A perplexity with its 95% interval in brackets when one is known."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if not ci or any(math.isnan(v) for v in ci):
        return f"{x:.2f}"
    return f"{x:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"


def bar_chart(table: dict[str, dict[str, float]], path: Path, title: str = "score (%)",
              ci95: dict[str, dict[str, list[float]]] | None = None,
              overall_ci95: dict[str, list[float]] | None = None) -> None:
    """Grouped bars: one group per task plus Overall, one bar per run; error bars span each 95% interval."""
    cols = _columns(table)
    groups = cols + ["Overall"]
    runs = list(table)
    width = 0.8 / max(len(runs), 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 1), 4))
    for i, run in enumerate(runs):
        values = [table[run].get(c, 0.0) for c in cols] + [overall(table[run], cols)]
        ci = {**(ci95 or {}).get(run, {}), **({"Overall": overall_ci95[run]} if overall_ci95 and run in overall_ci95 else {})}
        errors = [[max(v - ci[g][0], 0.0) if g in ci else 0.0 for v, g in zip(values, groups)],
                  [max(ci[g][1] - v, 0.0) if g in ci else 0.0 for v, g in zip(values, groups)]]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=run,
               yerr=errors if ci else None, capsize=3)
    ax.set_xticks([g + width * (len(runs) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([_label(g) for g in groups])
    ax.set_ylabel(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reference_of(combined: dict[str, Any]) -> str | None:
    """The row every other is tested against: the run named `base`, else the first run."""
    names = list(combined.get("scores", {}))
    return "base" if "base" in names else (names[0] if names else None)


def write_comparison(combined: dict[str, Any], out: Path) -> None:
    """table.md (scores [interval], paired tests, answer spread, retention) and scores.png."""
    reference = reference_of(combined)
    marks = significance_marks(combined.get("paired", {}), reference) if reference else {}
    text = score_table(combined["scores"], combined.get("ci95"), marks, combined.get("overall_ci95"))
    if combined.get("ci95"):
        text += (f"\n[low, high]: the 95% interval (exact Clopper-Pearson for 0/1 scores, bootstrap over items "
                 f"otherwise); ↑ / ↓: the paired difference to {reference} excludes 0. "
                 f"{overall_note(combined.get('items', {}), _columns(combined['scores']))}\n")
    text += "\n" + generation_note(combined.get("gen_toks", {}), combined.get("max_gen_toks"))
    if combined.get("paired"):
        text += "\nPaired differences over the same items (points):\n\n" + paired_table(combined["paired"])
    if combined.get("answers"):
        text += ("\nAnswer spread: share of the most frequent option (identical output for free text); "
                 "⚠ collapsed: one answer in ≥ 90% of ≥ 10 items:\n\n" + answers_table(combined["answers"]))
    if combined.get("retention"):
        documents = combined.get("retention_documents")
        over = f"the first {documents} documents of each task" if documents else "documents"
        text += f"\nRetention (lower is better; [95% interval, bootstrap over {over}]):\n\n"
        text += retention_table(combined["retention"])
    (out / "table.md").write_text(text)
    bar_chart(combined["scores"], out / "scores.png", ci95=combined.get("ci95"),
              overall_ci95=combined.get("overall_ci95"))


def training_curves(metrics: Path, path: Path) -> list[str]:
    """PNG of loss, each named loss term and every plugin metric per step; returns the plotted keys.

    The loss comes first with the completion length and the truncated share beside it: a collapse into
    completions that never end shows there first."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    skip = {"step", "skipped", "lr", "step_time_s", "completion_tokens"}
    keys = [k for k in rows[0] if k not in skip and not k.endswith("_s") and isinstance(rows[0][k], (int, float))]
    keys += [k for r in rows for k in r if k not in keys and k not in skip and not k.endswith("_s")
             and isinstance(r[k], (int, float))]
    keys = list(dict.fromkeys(keys))
    first = [k for k in ("loss", "completion_length", "truncated") if k in keys]
    keys = first + [k for k in keys if k not in first]
    n = len(keys)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    plt = _pyplot()
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.6 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        steps = [r["step"] for r in rows if key in r]
        ax.plot(steps, [r[key] for r in rows if key in r], marker="." if len(steps) < 30 else None)
        ax.set_title(key, fontsize="small")
        ax.set_xlabel("step", fontsize="small")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return keys


def signed(x: float) -> str:
    """A signed number of points, one decimal; a dash for a missing value."""
    return "–" if math.isnan(x) else f"{x:+.1f}"


def _matrix(pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
            diagonal: Mapping[str, float]) -> list[list[float]]:
    value = {**{(a, b): v for (a, b), v in pairs.items()}, **{(b, a): v for (a, b), v in pairs.items()}}
    return [[diagonal.get(a, math.nan) if a == b else value.get((a, b), math.nan) for b in plugins] for a in plugins]


def interaction_png(pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
                    single_gains: Mapping[str, float], path: Path) -> None:
    """Heatmap: off-diagonal cells the pairwise interaction, the diagonal each component's own gain."""
    shown = tuple(p for p in plugins if any(p in pair for pair in pairs))
    matrix = _matrix(pairs, shown, single_gains)
    finite = [abs(x) for row in matrix for x in row if not math.isnan(x)]
    bound = max(finite + [1e-6])
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(shown) + 2.5, 1.0 * len(shown) + 1.8))
    image = ax.imshow(matrix, cmap="RdBu", vmin=-bound, vmax=bound)
    for i, row in enumerate(matrix):
        for j, x in enumerate(row):
            ax.text(j, i, signed(x), ha="center", va="center", fontsize="small",
                    color="white" if abs(x) > 0.6 * bound else "black", fontstyle="italic" if i == j else "normal")
    ax.set_xticks(range(len(shown)), shown)
    ax.set_yticks(range(len(shown)), shown)
    ax.set_title("interaction on Overall (points)\ndiagonal, italic: gain alone over plain SD", fontsize="small")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _as_number(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def sensitivity_png(points: Sequence[tuple[str, Mapping[str, float], float]], plain: float, label: str,
                    path: Path) -> None:
    """Score vs option value: Overall (bold) and each task, plain SD dashed. points: (value, row, overall)."""
    numbers = {v: _as_number(v) for v, _, _ in points}
    numeric = all(n is not None for n in numbers.values())
    points = sorted(points, key=lambda p: numbers[p[0]] or 0.0) if numeric else list(points)
    xs = [(numbers[v] or 0.0) if numeric else float(i) for i, (v, _, _) in enumerate(points)]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    tasks = list(dict.fromkeys(t for _, row, _ in points for t in row))
    if len(tasks) > 1:
        for t in tasks:
            ax.plot(xs, [row.get(t, math.nan) for _, row, _ in points], marker=".", alpha=0.6, label=_label(t))
    ax.plot(xs, [o for _, _, o in points], marker="o", linewidth=2, color="black", label="Overall")
    ax.axhline(plain, linestyle="--", color="grey", label=f"plain SD ({plain:.1f})")
    ax.set_xticks(xs, [v for v, _, _ in points])
    ax.set_xlabel(label)
    ax.set_ylabel("score (%)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
