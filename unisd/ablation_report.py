"""What an ablation found: each component's gain over plain SD, pairwise interactions, their intervals,
and the files that say so (results.json, table.md, interactions.png, sensitivity_<plugin>.<key>.png)."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from unisd.ablation_plan import PLAIN_SD, Planned

def overall_scores(table: Mapping[str, Mapping[str, float]], tasks: list[str]) -> dict[str, float]:
    from unisd.report import overall  # matplotlib: only once a report is written

    return {name: overall(dict(row), tasks) for name, row in table.items()}


def gains(overall: Mapping[str, float]) -> dict[str, float]:
    """Overall of each run minus plain SD's."""
    return {name: value - overall[PLAIN_SD] for name, value in overall.items() if name != PLAIN_SD}


def interactions(overall: Mapping[str, float], plugins: tuple[str, ...]) -> dict[tuple[str, str], float]:
    """interaction(A, B) = gain(A+B) - gain(A) - gain(B), for each pair whose three runs were scored."""
    g = gains(overall)
    out = {}
    for a, b in itertools.combinations(plugins, 2):
        if f"{a}+{b}" in g and a in g and b in g:
            out[(a, b)] = g[f"{a}+{b}"] - g[a] - g[b]
    return out


def effect_intervals(items: Mapping[str, Mapping[str, Mapping[str, float]]],
                     plugins: tuple[str, ...]) -> dict[str, dict[str, list[float]]]:
    """95% intervals (points) of every gain and interaction on Overall: one paired bootstrap that draws the
    same items of each task for every run, so shared item difficulty cancels as it does in the estimates."""
    import numpy as np

    from unisd import stats

    tasks = list(dict.fromkeys(t for per_task in items.values() for t in per_task))
    docs = {t: [d for d in next(iter(v[t] for v in items.values() if t in v))
                if all(d in v[t] for v in items.values() if t in v)] for t in tasks}
    arrays = {(run, t): np.array([per_task[t][d] for d in docs[t]]) for run, per_task in items.items()
              for t in per_task if docs[t]}

    def effects(idx: Mapping[str, np.ndarray]) -> dict[str, float]:
        ov = {run: 100.0 * float(np.mean([a[idx[t]].mean() for (r, t), a in arrays.items() if r == run]))
              for run in items if any(r == run for r, _ in arrays)}
        return {**{f"gain:{n}": v for n, v in gains(ov).items()},
                **{f"interaction:{a}+{b}": v for (a, b), v in interactions(ov, plugins).items()}}

    if PLAIN_SD not in items or not arrays:
        return {"gains": {}, "interactions": {}}
    found = stats.bootstrap_intervals(effects, {t: len(d) for t, d in docs.items() if d})
    return {kind: {k.split(":", 1)[1]: list(v) for k, v in found.items() if k.startswith(kind[:-1] + ":")}
            for kind in ("gains", "interactions")}


def seeded_uncertainty(seeded: Mapping[str, Sequence[Mapping[str, Mapping[str, float]]]],
                       plugins: tuple[str, ...]) -> dict[str, Any]:
    """Every interval of an ablation trained with several seeds (`unisd.seeds`: seeds and items both counted).

    seeded: run -> one task -> doc -> score mapping per seed (the untrained base has one, the same for every seed).
    Returns what `write_outputs` reports: ci95, overall_ci95, paired (against plain SD and the base), gains and
    interactions, in points.
    """
    from unisd.seeds import Seeded

    scores = Seeded(seeded)
    runs = list(seeded)
    pairs = [(run, ref) for run in runs for ref in (PLAIN_SD, "base") if ref in seeded and run != ref]
    found = scores.intervals(pairs)
    points = lambda coefficients: [100.0 * x for x in scores.estimate(coefficients).ci95]  # noqa: E731
    found["gains"] = {run: points({run: 1.0, PLAIN_SD: -1.0}) for run in runs if run != PLAIN_SD and PLAIN_SD in seeded}
    found["interactions"] = {f"{a}+{b}": points({f"{a}+{b}": 1.0, a: -1.0, b: -1.0, PLAIN_SD: 1.0})
                             for a, b in itertools.combinations(plugins, 2)
                             if all(n in seeded for n in (f"{a}+{b}", a, b, PLAIN_SD))}
    return found


def _with_ci(x: float, ci: list[float] | None) -> str:
    """`+1.2 [-3.0, +5.4]`, with ↑ / ↓ when the interval excludes 0."""
    from unisd.report import signed

    if ci is None:
        return signed(x)
    mark = " ↑" if ci[0] > 0 else " ↓" if ci[1] < 0 else ""
    return f"{signed(x)} [{ci[0]:+.1f}, {ci[1]:+.1f}]{mark}"


def markdown(table: Mapping[str, Mapping[str, float]], overall: Mapping[str, float],
             pairs: Mapping[tuple[str, str], float], plugins: tuple[str, ...],
             uncertainty: Mapping[str, Any] | None = None, gen_toks: Mapping[str, int] | None = None,
             max_gen_toks: int | None = None) -> str:
    """table.md: scores [95% interval] (paper layout), gains over plain SD and the interaction matrix, each
    with its 95% interval (paired bootstrap over items), and the generation limit."""
    from unisd.report import generation_note, score_table

    u = uncertainty or {}
    gain_ci, pair_ci = u.get("gains", {}), u.get("interactions", {})
    text = score_table({k: dict(v) for k, v in table.items()}, u.get("ci95"), None, u.get("overall_ci95"))
    text += "\n" + generation_note(dict(gen_toks or {}), max_gen_toks)
    text += (f"\nGain over plain SD ({PLAIN_SD}), Overall, points [95% interval; ↑ / ↓: excludes 0]:\n\n"
             "| run | Overall | gain |\n|---|---|---|\n")
    text += "".join(f"| {n} | {overall[n]:.1f} | {_with_ci(v, gain_ci.get(n))} |\n" for n, v in gains(overall).items())
    if pairs:
        shown = tuple(p for p in plugins if any(p in pair for pair in pairs))
        cell = {**{(a, b): _with_ci(v, pair_ci.get(f"{a}+{b}")) for (a, b), v in pairs.items()},
                **{(b, a): _with_ci(v, pair_ci.get(f"{a}+{b}")) for (a, b), v in pairs.items()}}
        text += ("\nInteraction(A, B) = gain(A+B) - gain(A) - gain(B), Overall, points [95% interval]:\n\n"
                 f"| | {' | '.join(shown)} |\n|---|" + "---|" * len(shown) + "\n")
        text += "".join(f"| {a} | " + " | ".join(cell.get((a, b), "–") for b in shown) + " |\n" for a in shown)
    return text


def write_outputs(out: Path, runs: list[Planned], table: dict[str, dict[str, float]],
                  plugins: tuple[str, ...], settings: dict[str, Any],
                  items: dict[str, dict[str, dict[str, float]]] | None = None,
                  answers: dict[str, dict[str, dict[str, Any]]] | None = None,
                  seeded: dict[str, list[dict[str, dict[str, float]]]] | None = None) -> dict[str, Any]:
    """results.json, table.md, interactions.png and sensitivity_<plugin>.<key>.png.

    items (run -> task -> doc_id -> score) give every score, gain and interaction its 95% interval;
    answers (unisd.evaluate.answer_spread per run) add the constant-answer baseline and collapse flags.
    seeded (run -> items of each seed), when runs were trained with several seeds: `table` holds the mean over
    seeds, and every interval and paired test counts seeds and items (`seeded_uncertainty`).
    """
    from unisd import report
    from unisd.evaluate import add_uncertainty

    tasks = list(dict.fromkeys(t for row in table.values() for t in row))  # leaf tasks, also of a group
    overall = overall_scores(table, tasks)
    pairs = interactions(overall, plugins)
    presets = {"runs": {r.name: {"preset": r.preset} for r in runs}}  # UniSD* is also paired with the best baseline
    if seeded:
        scored = seeded_uncertainty(seeded, plugins)
        effects = {"gains": scored["gains"], "interactions": scored["interactions"]}
    else:
        scored = add_uncertainty({"tasks": tasks, "scores": table, "items": items or {}, **presets})
        effects = effect_intervals(items or {}, plugins)
    uncertainty = {"ci95": scored["ci95"], "overall_ci95": scored["overall_ci95"], **effects}
    evaluation = settings.get("eval", {})
    text = markdown(table, overall, pairs, plugins, uncertainty, evaluation.get("gen_toks"),
                    evaluation.get("max_gen_toks"))
    if seeded:
        counts = sorted({len(v) for name, v in seeded.items() if name != "base"})
        text = (f"Mean over {' or '.join(map(str, counts))} seeds per trained run (the untrained base is scored "
                f"once); every interval counts seeds and items (crossed random effects, Satterthwaite t; "
                f"`unisd.seeds`).\n\n") + text
    if answers:
        text += "\nAnswer spread (⚠ collapsed: one answer in ≥ 90% of ≥ 10 items):\n\n" + report.answers_table(answers)
    (out / "table.md").write_text(text)
    if pairs:
        report.interaction_png(pairs, plugins, {p: v for p, v in gains(overall).items() if p in plugins},
                        out / "interactions.png")
    for (plugin, key), members in _grid_groups(runs).items():
        points = [(r.grid[2], table[r.name], overall[r.name]) for r in members if r.grid]
        report.sensitivity_png(points, overall[PLAIN_SD], f"{plugin}.{key}", out / f"sensitivity_{plugin}.{key}.png")
    results = {"settings": settings, "tasks": tasks,
               "plan": [{"name": r.name, "folder": f"runs/{r.folder}", "plugins": list(r.plugins),
                         "options": r.options, "preset": r.preset, "grid": r.grid} for r in runs],
               "scores": table, "ci95": scored["ci95"], "overall": overall, "overall_ci95": scored["overall_ci95"],
               "gains": gains(overall), "gains_ci95": effects["gains"],
               "interactions": {f"{a}+{b}": v for (a, b), v in pairs.items()},
               "interactions_ci95": effects["interactions"], "paired": scored["paired"], "answers": answers or {},
               "items": items or {}, "seeds": scored.get("seeds", {}), "seeded_items": seeded or {}}
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _grid_groups(runs: list[Planned]) -> dict[tuple[str, str], list[Planned]]:
    groups: dict[tuple[str, str], list[Planned]] = {}
    for r in runs:
        if r.grid:
            groups.setdefault(r.grid[:2], []).append(r)
    return groups
