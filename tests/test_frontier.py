"""`coerase frontier`: equal budget enforced, Pareto fronts and matched-usability gaps by hand,
and the statistics every figure carries."""

from pathlib import Path

import numpy as np
import pytest

from coerase_jax.configuration import load_config
from coerase_jax.errors import UserError
from coerase_jax.evaluate import stats
from coerase_jax.evaluate.frontier import analyse, format_markdown, pareto_front, plan_points, point_config


def test_every_point_spends_the_same_budget(tmp_path):
    config = load_config("configs/frontier_toyworld.py")
    points = plan_points(config)
    assert {p.method for p in points} == {"text_only", "image_only", "text_then_image"}
    assert sum(p.method == "text_only" for p in points) >= 6 and sum(p.method != "text_only" for p in points) >= 6
    for point in points:
        cfg = point_config(config, point, tmp_path)
        assert cfg.run_dir == str(tmp_path / "points" / point.name)
        assert cfg.data.image_dir == str(tmp_path / "references")  # generated once, shared
    with config.unlocked():  # every kind of setting arrives as it was written
        config.frontier.methods = (("kinds", (("erase.anchor_prompt", "a square"), ("erase.stages", ("text", "image")),
                                              ("erase.refine_mask_padding", True), ("image_stage.steps", 250)),
                                    (("text_stage.learning_rate", (1.5e-4,)), ("text_stage.steps", (150,)))),)
    cfg = point_config(config, plan_points(config)[0], tmp_path)
    assert (cfg.erase.anchor_prompt, cfg.erase.stages, cfg.erase.refine_mask_padding) == ("a square", ("text", "image"), True)
    assert (cfg.text_stage.learning_rate, cfg.text_stage.steps) == (1.5e-4, 150)
    with config.unlocked():
        config.frontier.methods = (("short", (("erase.stages", ("text",)), ("text_stage.steps", 399)), ()),)
    with pytest.raises(UserError, match="399 iterations, not frontier.iterations = 400"):
        point_config(config, plan_points(config)[0], tmp_path)


def _rate(k, n):
    return {"rate": k / n, "k": k, "n": n, "ci95": list(stats.wilson(k, n))}


def _model(named_k, para_k, change, n=100):
    return {"groups": {"named": {"images": n, "concept_rate": named_k / n},
                       "paraphrase": {"images": n, "concept_rate": para_k / n}},
            "rates": {"other_accuracy": _rate(90, 100)},
            "other_change": {"change": change, "n": 200, "ci95": [change - 0.02, change + 0.02]},
            "fid_vs_original": 1.0, "clip_score": 0.7}


def test_fronts_and_the_gap_at_matched_usability_by_hand():
    from coerase_jax.evaluate.frontier import Point

    points = [Point("text", (), (("text_stage.learning_rate", lr),)) for lr in (1e-4, 2e-4, 4e-4)] + \
             [Point("image", (), (("image_stage.learning_rate", lr),)) for lr in (1e-4, 2e-4)]
    methods = {"original": _model(90, 90, 0.0)}
    # text: 60 % at -1 pt, 40 % at -3 pts, 10 % at -9 pts (too costly); image: 20 % at -2, 30 % at -4 (dominated)
    for p, (named, para, change) in zip(points, [(60, 60, -0.01), (40, 40, -0.03), (10, 10, -0.09),
                                                 (20, 20, -0.02), (30, 30, -0.04)]):
        methods[p.name] = _model(named, para, change)
    frontier = analyse({"concept": "circle", "judge": "j", "fid_features": "f", "methods": methods}, points, 0.05)
    text, image = frontier["methods"]["text"], frontier["methods"]["image"]
    assert text["fronts"]["paraphrase"] == [points[0].name, points[1].name, points[2].name]
    assert image["fronts"]["paraphrase"] == [points[3].name]  # 30 % at -4 is beaten by 20 % at -2
    assert text["best_at_matched_usability"]["paraphrase"] == points[1].name  # -9 pts is over the 5-point limit
    assert image["best_at_matched_usability"]["paraphrase"] == points[3].name
    gap = frontier["gaps"]["text - image"]["paraphrase"]
    assert gap["difference"] == pytest.approx(0.40 - 0.20)
    assert gap["ci95"][0] < 0.2 < gap["ci95"][1] and gap["ci95"][0] > 0.05  # 40/100 vs 20/100: clearly apart
    assert "attack" not in frontier["gaps"]["text - image"]  # no attack was run
    settings = {"iterations": 400, "split": "dev", "images_per_group": 100,
                "attack": {"prompts": 64, "tokens": 0, "steps": 40}}
    assert "100 images per group; no attack." in format_markdown({**frontier, "settings": settings})
    settings["attack"]["tokens"] = 5
    assert "the attack on 64 concept prompts (5 tokens, 40 steps)" in format_markdown({**frontier, "settings": settings})
    unmatched = analyse({"concept": "circle", "judge": "j", "fid_features": "f", "methods": methods},
                        points, 0.005)  # no point within half a point: no gap, and the file says why
    assert unmatched["gaps"]["text - image"] == {}
    assert "- text - image: – (a method has no point within the bound)" in format_markdown({**unmatched, "settings": settings})
    rows = [{"name": "a", "paraphrase": _rate(5, 10), "other_change": {"change": 0.0}},
            {"name": "b", "paraphrase": _rate(5, 10), "other_change": {"change": 0.0}}]
    assert pareto_front(rows, "paraphrase") == ["a", "b"]  # ties dominate nobody


def test_wilson_paired_and_newcombe_intervals_by_hand():
    lo, hi = stats.wilson(0, 20)
    assert lo == 0.0 and hi == pytest.approx(0.1611, abs=1e-4)  # the textbook 0/20 upper bound
    assert stats.wilson(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)  # (the textbook 10/20)
    change = stats.paired_change(np.array([1, 1, 0, 1]), np.array([1, 0, 0, 0]))
    assert change["change"] == 0.5 and change["n"] == 4
    sd = np.std([0, 1, 0, 1], ddof=1)
    assert change["ci95"][1] - 0.5 == pytest.approx(stats.Z95 * sd / 2)
    d = stats.difference(40, 100, 20, 100)  # Newcombe: each side's Wilson distance, added in quadrature
    (l1, u1), (l2, u2) = stats.wilson(40, 100), stats.wilson(20, 100)
    assert l1 == pytest.approx(0.3094, abs=1e-4) and u2 == pytest.approx(0.2888, abs=1e-4)
    assert d["difference"] == pytest.approx(0.2)
    assert d["ci95"] == pytest.approx([0.2 - np.hypot(0.4 - l1, u2 - 0.2), 0.2 + np.hypot(u1 - 0.4, 0.2 - l2)])


def _joint_model(named, para, held_right, n=100):
    """A judge_joint entry: erased shape -> (k named, k paraphrase), held shape -> (k right, k right originally)."""
    return {"per_concept": {s: {"named": _rate(named[s], n), "paraphrase": _rate(para[s], n)} for s in named},
            "remaining_rates": {s: _rate(k, n) for s, (k, _) in held_right.items()},
            "remaining_change": {**{s: {"change": (k - k0) / n, "n": n, "ci95": [(k - k0) / n - 0.03, (k - k0) / n + 0.03]}
                                    for s, (k, k0) in held_right.items()},
                                 "all": {"change": -0.01, "n": 2 * n, "ci95": [-0.03, 0.01]}}}


def test_joint_points_meet_the_bounds_only_when_every_shape_does_by_hand():
    from coerase_jax.evaluate.frontier import Point, analyse_joint, format_joint_markdown

    seeds = [Point("paper", (), (("text_stage.learning_rate", 2e-4), ("erase.seed", s))) for s in (0, 1)]
    gentle = Point("paper", (), (("text_stage.learning_rate", 1e-4), ("erase.seed", 0)))
    held = {"cross": (95, 97), "diamond": (90, 95)}
    methods = {
        "original": _joint_model({"circle": 99, "square": 100}, {"circle": 98, "square": 100},
                                 {s: (k0, k0) for s, (_, k0) in held.items()}),
        # every bound held: circle 15 named (= the bound), square 25 paraphrased (= the bound), diamond -5 points
        seeds[0].name: _joint_model({"circle": 15, "square": 3}, {"circle": 20, "square": 25}, held),
        # seed 1: the diamond loses 6 points -> fails; the worst over the two seeds is seed 1's
        seeds[1].name: _joint_model({"circle": 9, "square": 2}, {"circle": 11, "square": 12},
                                    {"cross": (96, 97), "diamond": (89, 95)}),
        # every held shape within 1 point, but the square is paraphrased 26 % of the time -> fails
        gentle.name: _joint_model({"circle": 14, "square": 10}, {"circle": 20, "square": 26},
                                  {"cross": (97, 97), "diamond": (94, 95)}),
    }
    judged = {"concepts": ["circle", "square"], "methods": methods}
    got = analyse_joint(judged, seeds + [gentle], max_named=0.15, max_paraphrase=0.25, max_collateral=0.05)
    by_name = {r["name"]: r for r in got["points"]}
    assert by_name[seeds[0].name]["worst"] == {"named": 0.15, "paraphrase": 0.25, "held_change": pytest.approx(-0.05)}
    assert [by_name[p.name]["meets"] for p in seeds + [gentle]] == [True, False, False]
    assert got["meeting"] == [seeds[0].name]
    (group,) = got["over_seeds"]  # the gentle point has one seed: no spread to give
    assert group["seeds"] == [0, 1] and group["knobs"] == {"text_stage.learning_rate": 2e-4}
    assert group["worst_named"] == 0.15 and group["worst_paraphrase"] == 0.25
    assert group["worst_held_change"] == pytest.approx(-0.06) and group["meets_every_seed"] is False
    got["settings"] = {"iterations": 400, "split": "dev", "images_per_group": 100}
    table = format_joint_markdown(got)
    assert "| original | 99.0 (99) / 98.0 (98) | 100.0 (100) / 100.0 (100) | 97/100 right | 95/100 right |" in table
    assert f"Points meeting every bound: {seeds[0].name}" in table
    assert "held -6.0 points; meets the bounds on every seed: no" in table


def test_a_setting_over_erasure_seeds_gives_its_mean_and_range_by_hand():
    from coerase_jax.evaluate.frontier import over_seeds

    def row(method, lr, seed, named_k, change):
        return {"method": method, "knobs": {"text_stage.learning_rate": lr, "erase.seed": seed},
                "named": _rate(named_k, 100), "paraphrase": _rate(2 * named_k, 100), "attack": None,
                "other_change": {"change": change}}

    rows = [row("paper", 2e-4, 0, 10, -0.02), row("paper", 2e-4, 1, 16, -0.05), row("paper", 2e-4, 2, 4, -0.03),
            row("paper", 4e-4, 0, 1, -0.09), row("other", 2e-4, 0, 30, 0.0)]  # one seed each: no spread
    (got,) = over_seeds(rows)
    assert got["method"] == "paper" and got["knobs"] == {"text_stage.learning_rate": 2e-4} and got["seeds"] == [0, 1, 2]
    assert got["named"] == pytest.approx({"mean": 0.10, "min": 0.04, "max": 0.16})
    assert got["paraphrase"] == pytest.approx({"mean": 0.20, "min": 0.08, "max": 0.32})
    assert got["other_change"] == pytest.approx({"mean": -0.10 / 3, "min": -0.05, "max": -0.02})
    assert "attack" not in got  # not measured
