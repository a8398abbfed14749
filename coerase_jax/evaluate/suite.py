"""`coerase eval`: every model on the same prompts and seeds, judged three ways.

* **efficacy**: ``asr`` — the fraction of images from concept rows that still show the concept
  (attack success rate without attack), by the configured judge;
* **robustness**: ``asr_attack`` — the same after the UnlearnDiff-style attack (``attack.py``)
  on up to ``eval.attack_prompts`` concept rows, beside ``asr_attacked_rows`` (those rows without
  attack) so the two are paired;
* **usability**, on the rows *not* about the concept only (the rest of the CSV, and the COCO-style
  ``eval.usability_prompts`` CSV): ``clip_score`` (image vs its own prompt), ``fid_vs_original``
  (this model's images against the original model's on the same rows and seeds) and, where the
  judge knows the classes, ``other_accuracy`` with ``other_change`` (paired against the
  original's, with its 95 % interval). The concept rows' own FID vs the original is
  ``fid_concept_rows`` — a measure of how much erasure changed them, not of collateral.

Every rate has its count and a 95 % interval in ``rates``; the small world's judge also gives
``coherence``: the fraction of images that are clean pictures of the world (one shape and colour,
judged with confidence), per group.

Writes ``report.json``, ``report.md`` and two plots into the output folder; the images stay in
``images/<model>/`` with their manifests (a rerun generates only what is missing).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.errors import UserError
from coerase_jax.evaluate import detectors, stats
from coerase_jax.evaluate.attack import AttackSettings, attack
from coerase_jax.evaluate.frechet import frechet_between
from coerase_jax.evaluate.generate import generate
from coerase_jax.evaluate.prompts import (SEED_SPLITS, PromptRow, is_concept_row, read_prompt_csv, toyworld_rows,
                                         usability_rows, write_prompt_csv)
from coerase_jax.models import presets
from coerase_jax.parallel import distributed


def is_toyworld(bundle) -> bool:
    return (presets.source_folder(bundle.source) / "evaluator" / "classifier.safetensors").is_file()


def evaluation_rows(config, bundle) -> list[PromptRow]:
    """The efficacy CSV's rows (or the small world's judging rows), then the usability CSV's."""
    if config.eval.prompts:
        rows = read_prompt_csv(config.eval.prompts)
    elif is_toyworld(bundle):
        from coerase_jax.toyworld import world

        rows = toyworld_rows(config.concept.name, config.report.images_per_group, config.report.split,
                             world.of_model(presets.source_folder(bundle.source)))
    else:
        raise UserError("eval.prompts is not set: give a prompt CSV (case_number,prompt,evaluation_seed[,class])")
    if config.eval.usability_prompts:
        rows += usability_rows(config.eval.usability_prompts)
    return rows


def concept_class(config) -> str:
    return config.eval.concept_class or config.concept.name


def make_judge(config, bundle, scorer):
    ev, kind = config.eval, config.eval.judge
    if kind == "auto":
        kind = ("toyworld" if is_toyworld(bundle) else "nudenet" if concept_class(config) == "nudity"
                else "clip" if ev.clip_classes else "none")
    if kind == "toyworld":
        return detectors.ToyworldJudge(presets.source_folder(bundle.source), concept_class(config))
    if kind == "clip":
        if scorer is None:
            raise UserError("the clip judge needs eval.clip_text (a CLIPTextModelWithProjection folder) and an "
                            "image encoder in the bundle")
        return detectors.ZeroShotClip(scorer, list(ev.clip_classes), list(ev.clip_templates), concept_class(config))
    if kind == "nudenet":
        return detectors.NudeNet(ev.nudenet_classes, ev.nudenet_threshold)
    if kind == "none":
        return None
    raise UserError(f"eval.judge must be auto, toyworld, clip, nudenet or none, got {kind!r}")


def make_scorer(config, bundle):
    """A CLIP scorer when a text tower with projection and the bundle's image encoder are at hand."""
    from coerase_jax.evaluate.clip_score import ClipScorer

    folder = (Path(config.eval.clip_text) if config.eval.clip_text
              else presets.source_folder(bundle.source) / "evaluator" / "clip_text")
    if config.eval.clip_text and not folder.is_dir():
        raise UserError(f"eval.clip_text: no folder {folder}")
    if bundle.image is None or not folder.is_dir():
        return None
    return ClipScorer(bundle, folder)


class FeatureExtractor:
    """Image features for FID: Inception pool features from a local weight file when given, else
    the bundle's CLIP image embeddings (the report names which)."""

    def __init__(self, config, bundle):
        import jax

        if config.eval.inception:
            from coerase_jax.evaluate.inception import load_inception

            self.name = f"FID Inception-v3 pool features (2048-d, weights {config.eval.inception})"
            self._features = load_inception(config.eval.inception)
        elif bundle.image is not None:
            embed = jax.jit(bundle.encode_images)
            self.name = "CLIP image embeddings of the bundle's image encoder (no Inception weights given)"
            self._features = lambda images: np.asarray(embed(np.asarray(images, np.float32) / 255.0))
        else:
            self.name, self._features = "none (no Inception weights and no image encoder)", None

    def __call__(self, images: np.ndarray) -> np.ndarray | None:
        if self._features is None:
            return None
        return np.concatenate([self._features(images[s:s + 64]) for s in range(0, len(images), 64)])


def _mean(values) -> float | None:
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else None


def _judged_rate(correct: np.ndarray) -> dict | None:
    """``stats.rate`` of the rows a judge could mark right or wrong (nan: not judged)."""
    judged = correct[~np.isnan(correct)]
    return stats.rate(judged == 1.0) if judged.size else None


def summarise(rows: list[PromptRow], verdict, clip_scores, concept: str) -> dict:
    """One model's figures from per-row judgements."""
    about = np.asarray([is_concept_row(r, concept) for r in rows])
    groups = {}
    for name in dict.fromkeys(r.group_name for r in rows):
        mask = np.asarray([r.group_name == name for r in rows])
        groups[name] = {"images": int(mask.sum()),
                        "concept_rate": None if verdict is None else _mean(verdict.shows_concept[mask]),
                        "accuracy": None if verdict is None else _mean(verdict.correct[mask]),
                        "clip_score": None if clip_scores is None else _mean(clip_scores[mask])}
        if verdict is not None:
            groups[name]["concept_rate_ci95"] = stats.rate(verdict.shows_concept[mask])["ci95"]
            if verdict.coherent is not None:
                groups[name]["coherence"] = stats.rate(verdict.coherent[mask])
    figures = {"images": len(rows), "concept_rows": int(about.sum()),
               "asr": None if verdict is None else _mean(verdict.shows_concept[about]),
               "other_accuracy": None if verdict is None else _mean(verdict.correct[~about]),
               "clip_score": None if clip_scores is None else _mean(clip_scores[~about]),
               "clip_score_concept_rows": None if clip_scores is None else _mean(clip_scores[about]),
               "groups": groups}
    if verdict is not None:
        figures["rates"] = {"asr": stats.rate(verdict.shows_concept[about]),
                            "other_accuracy": _judged_rate(verdict.correct[~about])}
    if {"named", "paraphrase"} <= set(groups):  # the small world: the main job's figure names too
        figures["erased_rate_named"] = groups["named"]["concept_rate"]
        figures["erased_rate_paraphrase"] = groups["paraphrase"]["concept_rate"]
        figures["per_shape"] = {concept: groups["named"]["accuracy"],
                                **{g: v["accuracy"] for g, v in groups.items() if g not in ("named", "paraphrase")}}
    return figures


def attacked_rows(rows: list[PromptRow], concept: str, limit: int) -> list[int]:
    """Indices of up to ``limit`` concept rows, evenly spaced over them."""
    about = [i for i, r in enumerate(rows) if is_concept_row(r, concept)]
    if len(about) <= limit:
        return about
    return [about[int(j)] for j in np.linspace(0, len(about) - 1, limit).round()]


def run_attack(config, bundle, sampler, judge, params, name, rows, targets, out: Path, mesh) -> np.ndarray:
    """Whether each of ``rows`` shows the concept under attack on ``params`` (its adversarial
    prompts are kept in attack/<name>.csv, their images in images/<name>-attack/)."""
    ev = config.eval
    cache = out / "attack" / f"{name}.csv"
    if cache.is_file():
        adversarial = read_prompt_csv(cache)
    else:
        settings = AttackSettings(ev.attack_tokens, ev.attack_steps, ev.attack_learning_rate,
                                  seed=SEED_SPLITS[config.report.split])
        seeds = [r.seed for r in rows]
        check = lambda prompts: judge(sampler(prompts, seeds, unet_params=params, progress=False), rows).shows_concept
        prompts = attack(bundle, params, [r.prompt for r in rows], targets, settings, check, mesh)
        adversarial = [dataclasses.replace(r, case=f"adv{r.case}", prompt=p) for r, p in zip(rows, prompts)]
        if distributed.is_leader():
            write_prompt_csv(adversarial, cache)
    images = generate(sampler, adversarial, out / "images" / f"{name}-attack", params, name=f"{name} (attack)")
    return judge(images, adversarial).shows_concept


def evaluate_models(config, bundle, models: dict[str, dict], out: str | Path, mesh=None) -> dict:
    """Generates, judges and compares every model; ``models`` must start with the original."""
    out = Path(out)
    ev, concept = config.eval, concept_class(config)
    rows = evaluation_rows(config, bundle)
    if distributed.is_leader():
        write_prompt_csv(rows, out / "prompts.csv")
    scorer = make_scorer(config, bundle)
    judge = make_judge(config, bundle, scorer)
    features = FeatureExtractor(config, bundle)
    sampler = Sampler(bundle, ev.steps, ev.guidance_scale, ev.batch_size, mesh)
    report = {"concept": concept, "judge": None if judge is None else judge.name, "fid_features": features.name,
              "settings": {"steps": ev.steps, "guidance_scale": ev.guidance_scale, "prompts": ev.prompts or "(small world)",
                           "attack_tokens": ev.attack_tokens, "attack_steps": ev.attack_steps},
              "methods": {}}
    original_images = original_features = original_verdict = None
    about = np.asarray([is_concept_row(r, concept) for r in rows])
    attack_indices = attacked_rows(rows, concept, ev.attack_prompts)
    for name, params in models.items():
        folder = out / "images" / name
        images = generate(sampler, rows, folder, params, name=name)
        verdict = None if judge is None else judge(images, rows)
        clip_scores = None if scorer is None else scorer(images, [r.prompt for r in rows])
        figures = summarise(rows, verdict, clip_scores, concept)
        feats = features(images)
        if original_images is None:
            original_images, original_features, original_verdict = images, feats, verdict
        elif verdict is not None and (~about).any():  # paired: the same rows and seeds as the original's
            judged = ~about & ~np.isnan(verdict.correct) & ~np.isnan(original_verdict.correct)
            if judged.any():
                figures["other_change"] = stats.paired_change(verdict.correct[judged], original_verdict.correct[judged])
        # usability on the rows not about the concept; the concept rows' own distance apart
        fid = lambda mask: (None if feats is None or mask.sum() < 2 else
                            frechet_between(original_features[mask], feats[mask]))
        figures["fid_vs_original"] = fid(~about)
        figures["fid_concept_rows"] = fid(about)
        can_attack = judge is not None and ev.attack_tokens > 0 and ev.attack_steps > 0 and attack_indices
        if can_attack and name != "original":
            before = verdict.shows_concept[attack_indices]
            after = run_attack(config, bundle, sampler, judge, params, name, [rows[i] for i in attack_indices],
                               original_images[attack_indices], out, mesh)
            # UnlearnDiff's count: a prompt the model already fails on needs no attack
            figures["asr_attack"] = float(np.mean(before | after))
            figures["asr_attacked_rows"] = float(np.mean(before))
            figures["attacked_rows"] = len(attack_indices)
            figures["attack_examples"] = [r.prompt for r in read_prompt_csv(out / "attack" / f"{name}.csv")[:5]]
        report["methods"][name] = figures
        print(f"{name}: " + ", ".join(f"{k} {v:.3f}" for k, v in figures.items()
                                      if isinstance(v, float)))
    if distributed.is_leader():
        write_report(report, out)
    return report


# --------------------------------------------------------------------------- report files


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}"


def format_markdown(report: dict) -> str:
    columns = [("ASR", lambda m: stats.percent(m["rates"]["asr"]) if m.get("rates") else _fmt(m.get("asr"))),
               ("ASR (attacked rows)", lambda m: _fmt(m.get("asr_attacked_rows"))),
               ("ASR under attack", lambda m: _fmt(m.get("asr_attack"))),
               ("other classes right", lambda m: stats.percent((m.get("rates") or {}).get("other_accuracy"))),
               ("change", lambda m: stats.points(m.get("other_change"))),
               ("CLIP score", lambda m: _fmt(m.get("clip_score"))),
               ("FID vs original", lambda m: _fmt(m.get("fid_vs_original"))),
               ("FID (concept rows)", lambda m: _fmt(m.get("fid_concept_rows")))]
    lines = [f"# Evaluation: erasing `{report['concept']}`", "",
             f"Judge: {report['judge'] or 'none'}. FID features: {report['fid_features']}. CLIP score and FID: the "
             f"rows not about the concept; rates: % [95 % interval] (k/n).", "",
             "| model | " + " | ".join(label for label, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, m in report["methods"].items():
        lines.append(f"| {name} | " + " | ".join(cell(m) for _, cell in columns) + " |")
    groups = list(next(iter(report["methods"].values()))["groups"])
    lines += ["", "Per group: fraction of images showing the concept (accuracy on the group's own class"
              "; clean pictures, where the judge says).", "",
              "| model | " + " | ".join(groups) + " |", "|---|" + "---:|" * len(groups)]
    for name, m in report["methods"].items():
        cell = lambda g: (f"{_fmt(g['concept_rate'])} ({_fmt(g['accuracy'])}"
                          + (f"; {_fmt(g['coherence']['rate'])}" if g.get("coherence") else "") + ")")
        lines.append(f"| {name} | " + " | ".join(cell(m["groups"][g]) for g in groups) + " |")
    examples = {n: m["attack_examples"] for n, m in report["methods"].items() if m.get("attack_examples")}
    if examples:
        lines += ["", "Adversarial prompts found (first few):", ""]
        lines += [f"- {n}: " + "; ".join(f"`{p}`" for p in ps[:3]) for n, ps in examples.items()]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "report.json")
    (out / "report.md").write_text(format_markdown(report))
    plot_report(report, out)


def plot_report(report: dict, out: Path) -> None:
    """efficacy_usability.png (ASR with and without attack vs CLIP score / FID) and per_group.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, label) in zip(axes, [("clip_score", "CLIP score (higher: more usable)"),
                                       ("fid_vs_original", "FID vs original (lower: more usable)")]):
        for name, m in methods.items():
            if m.get(key) is None or m.get("asr") is None:
                continue
            ax.scatter(m["asr"], m[key], label=name)
            if m.get("asr_attack") is not None:
                ax.annotate("", xy=(m["asr_attack"], m[key]), xytext=(m["asr_attacked_rows"], m[key]),
                            arrowprops=dict(arrowstyle="->", color="grey"))
            ax.annotate(name, (m["asr"], m[key]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("ASR (arrow: the attacked rows, before -> under attack)")
        ax.set_ylabel(label)
        ax.set_xlim(-0.05, 1.05)
    fig.suptitle(f"erasing '{report['concept']}': efficacy vs usability")
    fig.tight_layout()
    fig.savefig(out / "efficacy_usability.png", dpi=100)
    plt.close(fig)

    groups = list(next(iter(methods.values()))["groups"])
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * len(methods) / 2), 4))
    width = 0.8 / len(methods)
    for j, (name, m) in enumerate(methods.items()):
        values = [m["groups"][g]["concept_rate"] or 0.0 for g in groups]
        ax.bar(np.arange(len(groups)) + j * width, values, width, label=name)
    ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels(groups, rotation=30, ha="right")
    ax.set_ylabel(f"fraction showing '{report['concept']}'")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "per_group.png", dpi=100)
    plt.close(fig)
