"""Tables and charts: comparison tables in the paper's layout, bar charts, training curves.

Pure presentation: every function takes already computed numbers (or a metrics.jsonl) and writes
markdown or PNG. matplotlib runs headless (Agg).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

SHORT = {"unisd_scienceqa": "ScienceQA", "unisd_mbpp": "MBPP", "unisd_cose": "CoS-E",
         "unisd_toolalpaca": "ToolAlpaca", "unisd_gpqa": "GPQA", "unisd_humaneval": "HumanEval",
         "unisd_demo": "Demo"}


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


def score_table(table: dict[str, dict[str, float]]) -> str:
    """Markdown: rows = runs, columns = tasks + Overall, scores in percent with one decimal."""
    cols = _columns(table)
    lines = ["| run | " + " | ".join(_label(c) for c in cols) + " | Overall |",
             "|---|" + "---|" * (len(cols) + 1)]
    for name, row in table.items():
        cells = [f"{row[c]:.1f}" if c in row else "–" for c in cols]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {overall(row, cols):.1f} |")
    return "\n".join(lines) + "\n"


def retention_table(retention: dict[str, dict[str, dict[str, float]]]) -> str:
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
            cells += [_num(r.get("ppl_ret")), _num(r.get("ppl_fit"))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def bar_chart(table: dict[str, dict[str, float]], path: Path, title: str = "score (%)") -> None:
    """Grouped bars: one group per task plus Overall, one bar per run."""
    cols = _columns(table)
    groups = cols + ["Overall"]
    runs = list(table)
    width = 0.8 / max(len(runs), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(groups) + 1), 4))
    for i, run in enumerate(runs):
        values = [table[run].get(c, 0.0) for c in cols] + [overall(table[run], cols)]
        ax.bar([g + i * width for g in range(len(groups))], values, width, label=run)
    ax.set_xticks([g + width * (len(runs) - 1) / 2 for g in range(len(groups))])
    ax.set_xticklabels([_label(g) for g in groups])
    ax.set_ylabel(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_comparison(combined: dict[str, Any], out: Path) -> None:
    """table.md (+ retention) and scores.png from a combined results dict."""
    text = score_table(combined["scores"])
    if combined.get("retention"):
        text += "\nRetention (lower is better):\n\n" + retention_table(combined["retention"])
    (out / "table.md").write_text(text)
    bar_chart(combined["scores"], out / "scores.png")


def merge(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine several results.json dicts, run by run and task by task (a later file wins a clash)."""
    merged: dict[str, Any] = {"tasks": [], "scores": {}, "retention": {}}
    for r in results:
        merged["tasks"] += [t for t in r.get("tasks", []) if t not in merged["tasks"]]
        for key in ("scores", "retention"):
            for run, per_task in r.get(key, {}).items():
                merged[key].setdefault(run, {}).update(per_task)
    return merged


def training_curves(metrics: Path, path: Path) -> list[str]:
    """PNG of loss, each named loss term and every plugin metric per step; returns the plotted keys."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    skip = {"step", "skipped", "lr", "step_time_s", "completion_tokens"}
    keys = [k for k in rows[0] if k not in skip and not k.endswith("_s") and isinstance(rows[0][k], (int, float))]
    keys += [k for r in rows for k in r if k not in keys and k not in skip and not k.endswith("_s")
             and isinstance(r[k], (int, float))]
    keys = list(dict.fromkeys(keys))
    n = len(keys)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
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
