"""`unisd inspect RUN`: which tokens carry the loss and how much each mechanism acted, from what the run logged.

OPSD's authors found a few style tokens carrying most of the divergence, and in the Quickstart's UniSD* run
agree's mean weight stayed at 0.9997, clip never fired and the EMA first moved at step 10 of 12: a run can
be nearly plain SD while its configuration says otherwise. This reads RUN/samples.jsonl (per sampled token:
its text, divergence and log-probability under student and teacher, every --log-samples steps) and
RUN/metrics.jsonl (each plugin's metrics, every step), and writes RUN/inspect.md and RUN/inspect.png:

- the tokens with the largest share of the summed divergence of the logged samples;
- the divergence by position in the completion;
- the probability of the end token (the last token of a completion that ended) under student and teacher
  per logged step: a teacher that gives it less than the student pushes completions to grow longer;
- for each plugin, what its metrics say it did, with a one-line verdict where a rule applies.
"""
from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

POSITIONS: tuple[tuple[int, int | None], ...] = ((0, 4), (4, 16), (16, 64), (64, 256), (256, None))  # grouped positions
TOP_TOKENS = 15
BARELY = 0.01  # a mechanism that removes, clips or adds less than this share acted barely


class InspectError(ValueError):
    """A run folder that holds nothing to inspect; the message says what is missing."""


def _rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a torn last line of a run that was stopped
            continue
    return rows


def read(run: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(metrics rows, samples rows with per-token values) of a run folder."""
    metrics, samples = run / "metrics.jsonl", run / "samples.jsonl"
    if not metrics.is_file():
        raise InspectError(f"{run}: no metrics.jsonl (not a unisd run folder, or it has not finished a step)")
    logged = [s for s in _rows(samples) if "token_divergence" in s] if samples.is_file() else []
    return _rows(metrics), logged


def token_shares(samples: list[dict[str, Any]], top: int = TOP_TOKENS) -> list[dict[str, Any]]:
    """The tokens (by text) with the largest share of the summed divergence: share, count, mean divergence."""
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for s in samples:
        for text, d in zip(s["tokens"], s["token_divergence"]):
            if d is not None:
                total[text] += d
                count[text] += 1
    whole = sum(total.values())
    ranked = sorted(total, key=lambda t: -total[t])[:top]
    return [{"token": t, "share": total[t] / whole if whole else 0.0, "count": count[t],
             "mean": total[t] / count[t]} for t in ranked]


def by_position(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean divergence and share of the summed divergence per group of completion positions."""
    total: dict[tuple[int, int | None], float] = defaultdict(float)
    count: dict[tuple[int, int | None], int] = defaultdict(int)
    for s in samples:
        for position, d in enumerate(s["token_divergence"]):
            if d is not None:
                group = next(g for g in POSITIONS if g[1] is None or position < g[1])
                total[group] += d
                count[group] += 1
    whole = sum(total.values())
    return [{"positions": f"{low}-{high - 1}" if high else f"{low}+", "tokens": count[(low, high)],
             "mean": total[(low, high)] / count[(low, high)], "share": total[(low, high)] / whole if whole else 0.0}
            for low, high in POSITIONS if count[(low, high)]]


def end_probability(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per logged step: the mean probability of the end token, where a completion ended, under student and teacher."""
    found: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for s in samples:
        if not s["truncated"] and s["length"] and "logp_teacher" in s:
            found[s["step"]].append((math.exp(s["logp_student"][-1]), math.exp(s["logp_teacher"][-1])))
    return [{"step": step, "ended": len(pairs), "student": sum(p for p, _ in pairs) / len(pairs),
             "teacher": sum(q for _, q in pairs) / len(pairs)} for step, pairs in sorted(found.items())]


def mechanisms(metrics: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every plugin metric (`name/key`) over the run: first, last, mean, and a verdict where a rule applies."""
    keys = list(dict.fromkeys(k for row in metrics for k in row if "/" in k and isinstance(row[k], (int, float))))
    out = []
    for key in keys:
        values = [(row["step"], float(row[key])) for row in metrics if isinstance(row.get(key), (int, float))]
        series = [v for _, v in values]
        out.append({"metric": key, "first": series[0], "last": series[-1], "mean": sum(series) / len(series),
                    "verdict": _verdict(key, values, len(metrics))})
    return out


def _verdict(key: str, values: list[tuple[int, float]], steps: int) -> str:
    """What the metric says the mechanism did, for the metrics whose meaning is known."""
    mean = sum(v for _, v in values) / len(values)
    kind = key.split("/", 1)[1]
    if kind == "removed":
        return f"barely acted: removed {mean:.2%} of the weight" if mean < BARELY else f"removed {mean:.1%} of the weight"
    if kind == "rate":
        return "never fired" if max(v for _, v in values) == 0 else f"clipped {mean:.1%} of tokens"
    if kind == "share":
        return f"about {mean:.1%} of the loss" + (": barely acted" if abs(mean) < BARELY else "")
    if kind == "distance":
        moved = next((step for step, v in values if v > 0), None)
        return "never moved" if moved is None else f"first moved at step {moved} of {steps}"
    return ""


def summary(run: Path, name: str) -> str:
    """One line: what each mechanism of `run` did by its metrics, for the metrics with a verdict."""
    metrics, _ = read(run)
    said = [f"{r['metric']} {r['verdict']}" for r in mechanisms(metrics) if r["verdict"]]
    if not said:
        return f"{name}: no mechanism metrics were logged."
    return f"What {name}'s mechanisms did in this run: {'; '.join(said)} (`unisd inspect {run}` shows more)."


def markdown(run: Path, metrics: list[dict[str, Any]], samples: list[dict[str, Any]]) -> str:
    lines = [f"# Where the divergence sits: {run}", "",
             f"{len(metrics)} steps in metrics.jsonl; {len(samples)} logged samples with per-token values "
             f"(samples.jsonl, every --log-samples steps).", ""]
    if samples:
        lines += ["## Tokens with the largest share of the divergence", "", "| token | share | count | mean D |",
                  "|---|---|---|---|"]
        lines += [f"| {json.dumps(r['token'])} | {r['share']:.1%} | {r['count']} | {r['mean']:.3f} |"
                  for r in token_shares(samples)]
        lines += ["", "## Divergence by position in the completion", "", "| positions | tokens | mean D | share |",
                  "|---|---|---|---|"]
        lines += [f"| {r['positions']} | {r['tokens']} | {r['mean']:.3f} | {r['share']:.1%} |" for r in by_position(samples)]
        ends = end_probability(samples)
        if ends:
            lines += ["", "## The end token's probability where a completion ended", "",
                      "A teacher that gives it less than the student pushes completions to grow longer.", "",
                      "| step | ended | student | teacher |", "|---|---|---|---|"]
            lines += [f"| {r['step']} | {r['ended']} | {r['student']:.3f} | {r['teacher']:.3f} |" for r in ends]
    else:
        lines += ["No per-token samples were logged (--log-samples 0, or a run from before they were recorded).", ""]
    found = mechanisms(metrics)
    lines += ["", "## What each mechanism did", ""]
    if found:
        lines += ["| metric | first | last | mean | verdict |", "|---|---|---|---|---|"]
        lines += [f"| {r['metric']} | {r['first']:.4g} | {r['last']:.4g} | {r['mean']:.4g} | {r['verdict']} |"
                  for r in found]
    else:
        lines += ["No plugin metrics: the run used no mechanism."]
    return "\n".join(lines) + "\n"


def plot(metrics: list[dict[str, Any]], samples: list[dict[str, Any]], path: Path) -> None:
    """Three panels: divergence share by position, the end token's probability per step, the plugins' metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    positions = by_position(samples)
    axes[0].bar([r["positions"] for r in positions], [100 * r["share"] for r in positions])
    axes[0].set(title="share of the divergence by position", ylabel="%")
    ends = end_probability(samples)
    for who in ("student", "teacher"):
        axes[1].plot([r["step"] for r in ends], [r[who] for r in ends], marker="o", label=who)
    axes[1].set(title="end token's probability", xlabel="step")
    axes[1].legend()
    for r in mechanisms(metrics):
        rows = [(row["step"], row[r["metric"]]) for row in metrics if isinstance(row.get(r["metric"]), (int, float))]
        axes[2].plot([s for s, _ in rows], [v for _, v in rows], label=r["metric"])
    axes[2].set(title="plugin metrics", xlabel="step")
    if axes[2].lines:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect(run: Path) -> str:
    """Write RUN/inspect.md and RUN/inspect.png; return the markdown."""
    metrics, samples = read(run)
    text = markdown(run, metrics, samples)
    (run / "inspect.md").write_text(text)
    plot(metrics, samples, run / "inspect.png")
    return text
