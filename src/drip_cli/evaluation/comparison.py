"""Paired comparisons for ``drip evaluate``: each method against a reference method on the same
samples, by default a classical one (TV where it was evaluated, else CGLS), or any method
evaluated (``--reference``, one model against another, say).

Every method reconstructs the same measurements, so their PSNRs can be compared sample by sample.
The spread between samples (a flat crop scores 10 dB above a textured one under any method)
then cancels, and the mean difference is known far better than the two means' own spreads
suggest. Per method, level and discrepancy constant: the mean PSNR and SSIM differences, the
Student t confidence interval of the mean PSNR difference (the samples taken as independent
draws of the kind of image evaluated), and the share of samples on which the method is ahead.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy import stats

REFERENCES = ("tv", "cgls")   # by default the first of these evaluated is the reference
CONFIDENCE = 0.95


def default_reference(methods: list[str]) -> str | None:
    """The reference where none is asked for, of the ``methods`` evaluated: TV, else CGLS, else
    none."""
    return next((name for name in REFERENCES if name in methods), None)


def paired_differences(rows: list[dict], samples: list[dict], reference: str | None = None,
                       confidence: float = CONFIDENCE) -> list[dict]:
    """One record per row of ``rows`` (a method at a level and constant) other than the
    ``reference`` method's (by default :func:`default_reference`), comparing its samples with
    the reference's at the same level and constant (module docstring). Samples whose difference
    is not finite (an exact reconstruction's infinite PSNR) are left out and ``n_samples``
    counts the rest; the interval needs two. Ordered by method (as evaluated), then level."""
    if reference is None:
        reference = default_reference(list(dict.fromkeys(row["base_method"] for row in rows)))
    if reference is None:
        return []
    records = defaultdict(dict)   # (method, level) -> {sample index: its record}
    for sample in samples:
        records[sample["method"], sample["noise_percent"]][sample["sample"]] = sample
    references = {(row["noise_percent"], row["tau"]): row["method"]
                  for row in rows if row["base_method"] == reference}
    compared = []
    for row in rows:
        level = row["noise_percent"]
        theirs_name = references.get((level, row["tau"]))
        if row["base_method"] == reference or theirs_name is None:
            continue
        mine, theirs = records[row["method"], level], records[theirs_name, level]
        both = sorted(mine.keys() & theirs.keys())
        psnr = np.array([mine[i]["psnr"] - theirs[i]["psnr"] for i in both], dtype=np.float64)
        ssim = np.array([mine[i]["ssim"] - theirs[i]["ssim"] for i in both], dtype=np.float64)
        kept = np.isfinite(psnr)
        psnr, ssim, n = psnr[kept], ssim[kept], int(kept.sum())
        low = high = None
        if n >= 2:
            half = (stats.t.ppf((1 + confidence) / 2, n - 1)
                    * psnr.std(ddof=1) / np.sqrt(n))
            low, high = float(psnr.mean() - half), float(psnr.mean() + half)
        compared.append({
            "method": row["method"], "reference": theirs_name, "noise_percent": level,
            "tau": row["tau"], "n_samples": n,
            "psnr_difference_mean": float(psnr.mean()) if n else None,
            "psnr_difference_ci_low": low, "psnr_difference_ci_high": high,
            "ssim_difference_mean": (float(ssim.mean()) if n and np.isfinite(ssim).all()
                                     else None),
            "ahead_fraction": float((psnr > 0).mean()) if n else None})
    order = {name: i for i, name in enumerate(dict.fromkeys(row["method"] for row in rows))}
    return sorted(compared, key=lambda r: (order[r["method"]], r["noise_percent"]))
