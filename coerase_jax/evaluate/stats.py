"""Rates with their uncertainty: every figure a report gives comes with its count and a 95 % interval.

* ``rate``: k of n images, with Wilson's score interval (sound near 0 and 1, where erasure rates live);
* ``paired_change``: the change of a rate between two models judged on the *same* prompts and seeds
  (the per-image differences are paired), with a normal interval on their mean;
* ``difference``: two rates from different images (two methods' best points), with Newcombe's
  hybrid score interval built from the two Wilson intervals.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson's score interval for k successes out of n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def rate(hits) -> dict:
    """{"rate", "k", "n", "ci95"} of a boolean array."""
    hits = np.asarray(hits, bool)
    k, n = int(hits.sum()), int(hits.size)
    return {"rate": k / n if n else None, "k": k, "n": n, "ci95": list(wilson(k, n))}


def paired_change(after, before, z: float = Z95) -> dict:
    """{"change", "n", "ci95"}: mean of after - before over paired 0/1 outcomes (same image seeds)."""
    d = np.asarray(after, np.float64) - np.asarray(before, np.float64)
    n = d.size
    mean = float(d.mean()) if n else 0.0
    half = z * float(d.std(ddof=1)) / math.sqrt(n) if n > 1 else 1.0
    return {"change": mean, "n": int(n), "ci95": [mean - half, mean + half]}


def difference(k1: int, n1: int, k2: int, n2: int) -> dict:
    """{"difference", "ci95"}: k1/n1 - k2/n2 from independent samples (Newcombe's method 10)."""
    p1, p2 = k1 / n1, k2 / n2
    (l1, u1), (l2, u2) = wilson(k1, n1), wilson(k2, n2)
    diff = p1 - p2
    return {"difference": diff, "ci95": [diff - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2),
                                         diff + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)]}


def percent(r: dict | None) -> str:
    """"9.4 % [6.2, 13.9] (24/256)" for a ``rate`` dict."""
    if not r or r.get("rate") is None:
        return "–"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] ({r['k']}/{r['n']})"


def points(change: dict | None) -> str:
    """"−1.2 pts [−3.0, +0.6]" for a ``paired_change`` or ``difference`` dict."""
    if not change:
        return "–"
    value = change.get("change", change.get("difference"))
    lo, hi = change["ci95"]
    return f"{100 * value:+.1f} pts [{100 * lo:+.1f}, {100 * hi:+.1f}]"
