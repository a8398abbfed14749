"""`coerase frontier`: the efficacy–usability trade-off of several erasure recipes at equal budget.

    coerase frontier --config configs/frontier_toyworld.py --out out/frontier

``frontier.methods`` is a tuple of (method name, fixed settings, grid): every method is a recipe
(e.g. text stage only, image stage only, text then image) with its fixed config settings, and a
grid of its knobs ((dotted key, values), ...); every combination is a *point*, an ordinary erasure
run in ``out/points/<point>/`` (resumable: a finished point is skipped, an interrupted one resumes).
Every point must spend exactly ``frontier.iterations`` iterations over all its stages — the
comparison is at equal budget. The original model and every point are then judged together by
the ``coerase eval`` suite on the ``report.split`` seeds (images and attacks kept in
``out/eval/``, reused on a rerun).

Writes ``frontier.json`` (every point's figures, each method's Pareto front, and the best point of
each method among those whose collateral is within ``frontier.max_collateral`` of the original),
``frontier.md`` and ``frontier.png`` (efficacy against usability, each method's front drawn).
Efficacy: the concept's rate for prompts naming it, for paraphrases, and under the attack (lower
is better). Usability: the change in the other classes' accuracy from the original (paired, with
its interval), FID vs the original and CLIP score on the rows not about the concept.

A joint erasure (``concept.joint``, judged by the small world's classifier) is judged instead as
its own report is: each erased shape's named and paraphrase rates and each held shape's paired
change, and whether a point keeps every one within ``frontier.max_named``, ``max_paraphrase`` and
``max_collateral`` (``frontier.md`` without a plot; each model's verdicts kept in ``out/eval/``).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from coerase_jax.configuration import OVERRIDE_PREFIX, apply_overrides
from coerase_jax.errors import UserError
from coerase_jax.evaluate import stats
from coerase_jax.parallel import distributed

EFFICACY = (("named", "named"), ("paraphrase", "paraphrase"), ("attack", "under attack"))


@dataclasses.dataclass(frozen=True)
class Point:
    method: str
    fixed: tuple[tuple[str, Any], ...]
    knobs: tuple[tuple[str, Any], ...]  # this point's grid values

    @property
    def name(self) -> str:
        parts = [self.method] + [f"{_knob(key)}={_short(value)}" for key, value in self.knobs]
        return re.sub(r"[^A-Za-z0-9_.=+-]+", "-", "_".join(parts))

    @property
    def label(self) -> str:
        return " ".join(f"{_knob(key)}={_short(value)}" for key, value in self.knobs)


def _knob(key: str) -> str:
    """A short name for a grid key: text_stage.learning_rate -> text_lr, erase.eta -> eta."""
    section, _, leaf = key.rpartition(".")
    leaf = "lr" if leaf == "learning_rate" else leaf
    return f"{section.split('_')[0]}_{leaf}" if section.endswith("_stage") else leaf


def _short(value) -> str:
    if isinstance(value, (tuple, list)):
        return "+".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def plan_points(config) -> list[Point]:
    methods = tuple(config.frontier.methods)
    if not methods:
        raise UserError("frontier.methods is empty: give (name, ((key, value), ...), ((key, (value, ...)), ...))")
    points = []
    for entry in methods:
        if len(entry) != 3 or not isinstance(entry[0], str):
            raise UserError(f"frontier.methods entry {entry!r} must be (name, fixed settings, grid)")
        name, fixed, grid = entry[0], tuple(map(tuple, entry[1])), tuple(map(tuple, entry[2]))
        if any(len(item) != 2 for item in fixed + grid) or any(isinstance(v, str) or not len(v) for _, v in grid):
            raise UserError(f"frontier method {name!r}: settings are (key, value) and grid entries (key, (value, ...))")
        keys = [key for key, _ in grid]
        points += [Point(name, fixed, tuple(zip(keys, values))) for values in itertools.product(*[v for _, v in grid])]
    names = [p.name for p in points]
    if len(set(names)) != len(names):
        raise UserError("two frontier points share a name (a repeated method or grid value)")
    return points


def _as_override(value) -> str:
    """A setting as ``--config.key=`` text: a string as it is (its repr would keep the quotes), the
    rest as Python literals."""
    return value if isinstance(value, str) else repr(value)


def point_config(config, point: Point, out: Path):
    """The frontier's config with the point's settings and run directory; its budget is checked.
    Generated reference images are shared: every point reads them from ``out/references``."""
    from coerase_jax.erase.trainer import plan_stages

    shared = [] if config.data.image_dir or config.data.contrastive_dir else [
        f"{OVERRIDE_PREFIX}data.image_dir={out / 'references'}"]
    cfg = apply_overrides(config.copy_and_resolve_references(),
                          [f"{OVERRIDE_PREFIX}{key}={_as_override(value)}" for key, value in point.fixed + point.knobs]
                          + [f"{OVERRIDE_PREFIX}run_dir={out / 'points' / point.name}"] + shared)
    spent = sum(stage.steps for stage in plan_stages(cfg))
    if spent != config.frontier.iterations:
        raise UserError(f"frontier point {point.name} trains {spent} iterations, not frontier.iterations = "
                        f"{config.frontier.iterations}: methods are compared at equal budget")
    return cfg


def run_frontier(config, bundle, out: str | Path, progress: bool = True, mesh=None) -> dict:
    """Trains (or resumes, or skips) every point, judges them all with the eval suite, writes the frontier."""
    from coerase_jax.erase.trainer import (final_params, joint_reference_embeddings, plan_stages,
                                           reference_embeddings, run_erasure, stage_done)
    from coerase_jax.evaluate.suite import evaluate_models

    out = Path(out)
    points = plan_points(config)
    cfgs = [point_config(config, p, out) for p in points]
    if config.concept.joint:
        _check_joint_judge(bundle)
    if not config.data.image_dir and not config.data.contrastive_dir:  # once, into out/references, for every point
        (joint_reference_embeddings if config.concept.joint else reference_embeddings)(config, bundle, out, progress,
                                                                                        mesh)
    for i, (point, cfg) in enumerate(zip(points, cfgs)):
        finished = all(stage_done(s, Path(cfg.run_dir)) for s in plan_stages(cfg))
        print(f"[frontier] point {i + 1}/{len(points)} {point.name}: {'finished' if finished else 'training'}",
              flush=True)
        if not finished:
            run_erasure(cfg, bundle, progress, mesh)
    models = {"original": bundle.unet_params, **{p.name: final_params(cfg, bundle) for p, cfg in zip(points, cfgs)}}
    if config.concept.joint:
        return _joint_frontier(config, bundle, models, points, out, progress)
    report = evaluate_models(config, bundle, models, out / "eval", mesh=mesh)
    frontier = analyse(report, points, config.frontier.max_collateral)
    frontier["settings"] = {"iterations": config.frontier.iterations, "split": config.report.split,
                            "images_per_group": config.report.images_per_group,
                            "attack": {"prompts": config.eval.attack_prompts, "tokens": config.eval.attack_tokens,
                                       "steps": config.eval.attack_steps}}
    if distributed.is_leader():
        write_frontier(frontier, out)
    return frontier


# --------------------------------------------------------------------------- the analysis


def point_figures(m: dict) -> dict:
    """Efficacy and usability of one model from its eval report entry, each rate with k, n, interval."""
    groups = m["groups"]
    rate_of = lambda group: _group_rate(groups, group)
    attacked = m.get("attacked_rows")
    figures = {"named": rate_of("named"), "paraphrase": rate_of("paraphrase"),
               "attack": (None if m.get("asr_attack") is None else
                          _as_rate(round(m["asr_attack"] * attacked), attacked)),
               "other_accuracy": (m.get("rates") or {}).get("other_accuracy"),
               "other_change": m.get("other_change"),
               "fid_vs_original": m.get("fid_vs_original"), "clip_score": m.get("clip_score"),
               "coherence_named": groups.get("named", {}).get("coherence"),
               "coherence_paraphrase": groups.get("paraphrase", {}).get("coherence")}
    return figures


def _group_rate(groups: dict, name: str) -> dict | None:
    group = groups.get(name)
    if group is None or group.get("concept_rate") is None:
        return None
    return _as_rate(round(group["concept_rate"] * group["images"]), group["images"])


def _as_rate(k: int, n: int) -> dict:
    return {"rate": k / n, "k": k, "n": n, "ci95": list(stats.wilson(k, n))}


def pareto_front(points: list[dict], efficacy: str) -> list[str]:
    """Names of the points no other point beats on both the concept's ``efficacy`` rate (lower)
    and the change in the other classes' accuracy (higher), ordered by collateral."""
    usable = [p for p in points if p[efficacy] is not None and p["other_change"] is not None]
    front = []
    for p in usable:
        dominated = any(q is not p and q[efficacy]["rate"] <= p[efficacy]["rate"]
                        and q["other_change"]["change"] >= p["other_change"]["change"]
                        and (q[efficacy]["rate"] < p[efficacy]["rate"]
                             or q["other_change"]["change"] > p["other_change"]["change"]) for q in usable)
        if not dominated:
            front.append(p)
    return [p["name"] for p in sorted(front, key=lambda p: -p["other_change"]["change"])]


def analyse(report: dict, points: list[Point], max_collateral: float) -> dict:
    """Every point's figures, each method's Pareto fronts, and the best point of each method whose
    collateral (the other classes' accuracy lost, its point estimate) is at most ``max_collateral``;
    then each later method's gap to the first at that matched usability."""
    methods = report["methods"]
    rows = [{"name": p.name, "method": p.method, "label": p.label, "knobs": dict(p.knobs),
             **point_figures(methods[p.name])} for p in points]
    original = {"name": "original", **point_figures(methods["original"])}
    by_method = {}
    for method in dict.fromkeys(p.method for p in points):
        mine = [r for r in rows if r["method"] == method]
        fronts = {e: pareto_front(mine, e) for e, _ in EFFICACY}
        matched = [r for r in mine if r["other_change"] is not None and -r["other_change"]["change"] <= max_collateral]
        best = {}
        for e, _ in EFFICACY:
            candidates = [r for r in matched if r[e] is not None]
            if candidates:
                best[e] = min(candidates, key=lambda r: (r[e]["rate"], -r["other_change"]["change"]))["name"]
        by_method[method] = {"fronts": fronts, "best_at_matched_usability": best}
    gaps = {}
    names = list(by_method)
    reference = names[0]
    lookup = {r["name"]: r for r in rows}
    for method in names[1:]:
        gaps[f"{reference} - {method}"] = {}
        for e, _ in EFFICACY:
            a, b = by_method[reference]["best_at_matched_usability"].get(e), by_method[method]["best_at_matched_usability"].get(e)
            if a and b:
                ra, rb = lookup[a][e], lookup[b][e]
                gaps[f"{reference} - {method}"][e] = {"points": [a, b],
                                                      **stats.difference(ra["k"], ra["n"], rb["k"], rb["n"])}
    return {"concept": report["concept"], "judge": report["judge"], "fid_features": report["fid_features"],
            "max_collateral": max_collateral, "original": original, "points": rows, "methods": by_method,
            "gaps": gaps, "over_seeds": over_seeds(rows)}


def _seed_groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    """The points with ``erase.seed`` among their knobs, grouped by method and their other knobs."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if "erase.seed" in r["knobs"]:
            key = (r["method"],) + tuple(sorted((k, v) for k, v in r["knobs"].items() if k != "erase.seed"))
            groups.setdefault(key, []).append(r)
    return groups


def over_seeds(rows: list[dict]) -> list[dict]:
    """Settings repeated over several erasure seeds (``erase.seed`` among the knobs): each figure's
    mean, smallest and largest over the seeds — a figure that moves with the seed is not a result."""
    out = []
    for (method, *knobs), members in _seed_groups(rows).items():
        if len(members) < 2:
            continue
        summary = {"method": method, "knobs": dict(knobs), "seeds": [m["knobs"]["erase.seed"] for m in members]}
        for figure, value in (("named", lambda m: m["named"]["rate"]), ("paraphrase", lambda m: m["paraphrase"]["rate"]),
                              ("attack", lambda m: m["attack"]["rate"] if m["attack"] else None),
                              ("other_change", lambda m: m["other_change"]["change"] if m["other_change"] else None)):
            values = [value(m) for m in members]
            if None not in values:
                summary[figure] = {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}
        out.append(summary)
    return out


# --------------------------------------------------------------------------- joint erasure (the small world)


def _check_joint_judge(bundle) -> None:
    from coerase_jax.evaluate.suite import is_toyworld

    if not is_toyworld(bundle):
        raise UserError("a joint frontier (concept.joint) is judged by the small world's classifier: "
                        "model.source must be a toy world")


def _joint_frontier(config, bundle, models: dict, points: list[Point], out: Path, progress: bool) -> dict:
    """Judges the original once and every point on each erased shape's named and paraphrase rows and
    on the held shapes (``toyworld.report.compare_joint``, report and each model's verdicts in
    ``out/eval/``: a rerun with more points judges only the new ones), then checks each point against
    the bounds."""
    from coerase_jax.toyworld import report

    shapes = [name for name, _ in config.concept.joint]
    judged = report.compare_joint(bundle, models, shapes, config.report, out / "eval", progress,
                                   keep_verdicts=True)
    f = config.frontier
    frontier = analyse_joint(judged, points, f.max_named, f.max_paraphrase, f.max_collateral)
    frontier["settings"] = {"iterations": f.iterations, **judged["settings"]}
    if distributed.is_leader():
        write_frontier(frontier, out, joint=True)
    return frontier


def joint_point_figures(m: dict, max_named: float, max_paraphrase: float, max_collateral: float) -> dict:
    """One joint model's figures and its worst ones: the highest named and paraphrase rate over the
    erased shapes, the largest loss over the held shapes; ``meets`` when all are within the bounds."""
    changes = m.get("remaining_change", {})
    held = {s: c for s, c in changes.items() if s != "all"}
    worst = {"named": max(c["named"]["rate"] for c in m["per_concept"].values()),
             "paraphrase": max(c["paraphrase"]["rate"] for c in m["per_concept"].values()),
             "held_change": min((c["change"] for c in held.values()), default=None)}
    meets = (worst["named"] <= max_named and worst["paraphrase"] <= max_paraphrase
             and worst["held_change"] is not None and -worst["held_change"] <= max_collateral)
    return {"per_concept": {s: {"named": c["named"], "paraphrase": c["paraphrase"]}
                            for s, c in m["per_concept"].items()},
            "held": m["remaining_rates"], "held_change": changes, "worst": worst, "meets": bool(meets)}


def analyse_joint(judged: dict, points: list[Point], max_named: float, max_paraphrase: float,
                  max_collateral: float) -> dict:
    """Every point's per-shape figures and whether it meets the bounds; settings repeated over erasure
    seeds get their worst figures over the seeds (a setting is only as good as its worst seed)."""
    methods = judged["methods"]
    figures = lambda m: joint_point_figures(m, max_named, max_paraphrase, max_collateral)
    rows = [{"name": p.name, "method": p.method, "label": p.label, "knobs": dict(p.knobs), **figures(methods[p.name])}
            for p in points]
    original = methods["original"]
    over_seeds = [{"method": method, "knobs": dict(knobs), "seeds": [m["knobs"]["erase.seed"] for m in members],
                   "worst_named": max(m["worst"]["named"] for m in members),
                   "worst_paraphrase": max(m["worst"]["paraphrase"] for m in members),
                   "worst_held_change": min(m["worst"]["held_change"] for m in members),
                   "meets_every_seed": all(m["meets"] for m in members)}
                  for (method, *knobs), members in _seed_groups(rows).items() if len(members) > 1]
    return {"concepts": judged["concepts"], "bounds": {"max_named": max_named, "max_paraphrase": max_paraphrase,
                                                       "max_collateral": max_collateral},
            "original": {"per_concept": {s: {"named": c["named"], "paraphrase": c["paraphrase"]}
                                         for s, c in original["per_concept"].items()},
                         "held": original["remaining_rates"]},
            "points": rows, "over_seeds": over_seeds, "meeting": [r["name"] for r in rows if r["meets"]]}


def format_joint_markdown(frontier: dict) -> str:
    s, b = frontier["settings"], frontier["bounds"]
    shapes, held = frontier["concepts"], list(frontier["original"]["held"])
    count = lambda r: f"{100 * r['rate']:.1f} ({r['k']})"
    lines = [f"# Joint frontier: erasing {', '.join(shapes)} into one model at {s['iterations']} iterations per point",
             "",
             f"Judged on the {s['split']} seeds, {s['images_per_group']} images a group. Erased shapes: % of the named / "
             f"paraphrase images the judge calls that shape (k); held shapes: change in the images drawn right from "
             f"the original's, paired, in points. Bounds: every erased shape <= {100 * b['max_named']:.0f} % named, "
             f"<= {100 * b['max_paraphrase']:.0f} % paraphrased, every held shape within "
             f"{100 * b['max_collateral']:.0f} points (point estimates).", "",
             "| point | " + " | ".join(shapes) + " | " + " | ".join(held) + " | held, all | meets |",
             "|---" * (len(shapes) + len(held) + 3) + "|"]
    o = frontier["original"]
    lines.append("| original | " + " | ".join(f"{count(o['per_concept'][c]['named'])} / "
                                              f"{count(o['per_concept'][c]['paraphrase'])}" for c in shapes)
                 + " | " + " | ".join(f"{o['held'][h]['k']}/{o['held'][h]['n']} right" for h in held) + " | – | – |")
    for r in frontier["points"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{count(r['per_concept'][c]['named'])} / "
                                                      f"{count(r['per_concept'][c]['paraphrase'])}" for c in shapes)
                     + " | " + " | ".join(stats.points(r["held_change"][h]) for h in held)
                     + f" | {stats.points(r['held_change']['all'])} | {'yes' if r['meets'] else 'no'} |")
    if frontier["over_seeds"]:
        lines += ["", "Over erasure seeds, the worst seed's figures (highest erased rate, largest held loss):", ""]
        for g in frontier["over_seeds"]:
            knobs = " ".join(f"{k}={_short(v)}" for k, v in g["knobs"].items())
            lines.append(f"- {g['method']} {knobs} (seeds {', '.join(map(str, g['seeds']))}): named "
                         f"{100 * g['worst_named']:.1f} %, paraphrase {100 * g['worst_paraphrase']:.1f} %, held "
                         f"{100 * g['worst_held_change']:+.1f} points; meets the bounds on every seed: "
                         f"{'yes' if g['meets_every_seed'] else 'no'}")
    lines += ["", f"Points meeting every bound: {', '.join(frontier['meeting']) or 'none'}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def _attack_words(attack: dict) -> str:
    if not attack["tokens"]:
        return "no attack"
    return f"the attack on {attack['prompts']} concept prompts ({attack['tokens']} tokens, {attack['steps']} steps)"


def format_markdown(frontier: dict) -> str:
    s = frontier["settings"]
    lines = [f"# Frontier: erasing `{frontier['concept']}` at {s['iterations']} iterations per point", "",
             f"Judged on the {s['split']} seeds, {s['images_per_group']} images per group; {_attack_words(s['attack'])}. "
             f"Rates: % [95 % interval] (k/n); change in the other classes' accuracy from the original, paired, in "
             f"points. FID and CLIP score: the rows not about the concept ({frontier['fid_features']}).", "",
             "| point | named | paraphrase | under attack | other classes | change | FID | CLIP | clean (named / para) |",
             "|---|---|---|---|---|---|---:|---:|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3g}"
    clean = lambda r: f"{fmt((r['coherence_named'] or {}).get('rate'))} / {fmt((r['coherence_paraphrase'] or {}).get('rate'))}"
    for r in [frontier["original"]] + frontier["points"]:
        lines.append(f"| {r['name']} | {stats.percent(r['named'])} | {stats.percent(r['paraphrase'])} | "
                     f"{stats.percent(r['attack'])} | {stats.percent(r['other_accuracy'])} | "
                     f"{stats.points(r.get('other_change'))} | {fmt(r['fid_vs_original'])} | {fmt(r['clip_score'])} | "
                     f"{clean(r)} |")
    lines += ["", f"Best point of each method whose other classes lose at most {100 * frontier['max_collateral']:.0f} "
                  f"points (point estimate):", ""]
    for method, m in frontier["methods"].items():
        best = ", ".join(f"{label}: {m['best_at_matched_usability'].get(e, '–')}" for e, label in EFFICACY)
        lines.append(f"- {method}: {best}; Pareto front (paraphrase): {', '.join(m['fronts']['paraphrase']) or '–'}")
    if frontier.get("over_seeds"):
        lines += ["", "Over erasure seeds: mean [smallest, largest] (%; change in points):", ""]
        spread = lambda f: (f"{100 * f['mean']:.1f} [{100 * f['min']:.1f}, {100 * f['max']:.1f}]" if f else "–")
        for s in frontier["over_seeds"]:
            knobs = " ".join(f"{k}={_short(v)}" for k, v in s["knobs"].items())
            lines.append(f"- {s['method']} {knobs} (seeds {', '.join(map(str, s['seeds']))}): named "
                         f"{spread(s.get('named'))}, paraphrase {spread(s.get('paraphrase'))}, under attack "
                         f"{spread(s.get('attack'))}, other classes' change {spread(s.get('other_change'))}")
    if frontier["gaps"]:
        lines += ["", "Gaps at matched usability (first method minus each other; positive: the other erases more):", ""]
        for pair, per in frontier["gaps"].items():
            cells = "; ".join(f"{label} {stats.points(per[e])}" for e, label in EFFICACY if e in per)
            lines.append(f"- {pair}: {cells or '– (a method has no point within the bound)'}")
    return "\n".join(lines) + "\n"


def plot_frontier(frontier: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EFFICACY), figsize=(5 * len(EFFICACY), 4.2), sharex=True)
    colours = dict(zip(frontier["methods"], plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    lookup = {r["name"]: r for r in frontier["points"]}
    for ax, (e, label) in zip(axes, EFFICACY):
        original = frontier["original"][e]
        if original:
            ax.axhline(original["rate"], color="grey", lw=0.8, ls=":", label="original")
        for method, m in frontier["methods"].items():
            mine = [r for r in frontier["points"] if r["method"] == method and r[e] and r["other_change"]]
            xs = [100 * r["other_change"]["change"] for r in mine]
            ys = [r[e]["rate"] for r in mine]
            err = np.array([[r[e]["rate"] - r[e]["ci95"][0] for r in mine], [r[e]["ci95"][1] - r[e]["rate"] for r in mine]])
            ax.errorbar(xs, ys, yerr=err if mine else None, fmt="o", color=colours[method], ms=4, lw=0.6, label=method)
            for r, x, y in zip(mine, xs, ys):
                ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(3, 3), fontsize=6)
            front = [lookup[n] for n in m["fronts"][e]]
            ax.plot([100 * r["other_change"]["change"] for r in front], [r[e]["rate"] for r in front],
                    color=colours[method], lw=1.2)
        ax.axvline(-100 * frontier["max_collateral"], color="grey", lw=0.8, ls="--")
        ax.set_xlabel("change in the other classes' accuracy (points; right is better)")
        ax.set_ylabel(f"rate showing '{frontier['concept']}', {label} (lower is better)")
        ax.set_ylim(-0.02, 1.02)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"erasing '{frontier['concept']}' at {frontier['settings']['iterations']} iterations: "
                 f"efficacy vs usability ({frontier['settings']['split']} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_frontier(frontier: dict, out: Path, joint: bool = False) -> None:
    """frontier.json (written whole or not at all), frontier.md and, for one concept, frontier.png."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".frontier.json.tmp"
    tmp.write_text(json.dumps(frontier, indent=2))
    tmp.replace(out / "frontier.json")
    (out / "frontier.md").write_text((format_joint_markdown if joint else format_markdown)(frontier))
    if not joint:
        plot_frontier(frontier, out / "frontier.png")
