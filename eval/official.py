"""The official evaluation's file layout, for results that sit next to the paper's scripts.

The official comparison (``scripts/eval/test_vs.sh`` of AIDC-AI/Diffusion-SDPO) writes one
``pair_<metric>.json`` per metric and a ``summary.json`` that its summary step builds from them.
:func:`write_official` writes an eval.compare result in that layout (field names as the official
files): per metric ``model_a``, ``model_b``, ``total_pairs``, ``wins_a``, ``wins_b``, ``ties``,
``win_rate_a_over_b`` (a fraction), ``mean_score_a``, ``mean_score_b``, ``ties_policy``
(``"half"`` or ``"loss_for_a"``) and ``results`` (``pair_index``, ``prompt``, ``image_a``,
``image_b``, ``score_a``, ``score_b``, ``winner``); the summary has ``pair`` (``model_a``,
``model_b``, ``ties_policy``), ``metrics`` (one row per metric, named as the official table:
PickScore, HPSv2, CLIP, Aesthetics, ImageReward) and ``averages`` (``macro_win_rate_a_over_b``,
``micro_win_rate_a_over_b``). Image paths are absolute, so the files do not depend on the folder
the reader runs in. Our own statistics (intervals, p-values) are in eval.compare's files only.

Reading the official manifests (image paths relative to the folder the official script ran in,
``gen_image_path`` possibly a list) is eval.score's :func:`~eval.score.image_file` /
:func:`~eval.score.load_manifest`.
"""

from __future__ import annotations

from pathlib import Path

from sdpo import io

OFFICIAL_NAMES = {
    "pickscore": "PickScore",
    "hpsv2": "HPSv2",
    "clip": "CLIP",
    "aesthetics": "Aesthetics",
    "imagereward": "ImageReward",
}


def official_pair_file(pair_file: dict, images_a: dict, images_b: dict) -> dict:
    """One eval.compare ``<metric>.json`` in the official ``pair_<metric>.json`` layout.

    ``images_a`` / ``images_b`` map ``(run, index)`` to the image path of that entry."""
    a, b = pair_file["label_a"], pair_file["label_b"]
    results = []
    for n, p in enumerate(pair_file["pairs"]):
        sa, sb = p["score_a"], p["score_b"]
        results.append(
            {
                "pair_index": n,
                "prompt": p["prompt"],
                "image_a": images_a.get((p.get("run", 0), p["index_a"]), ""),
                "image_b": images_b.get((p.get("run", 0), p["index_b"]), ""),
                "score_a": sa,
                "score_b": sb,
                "winner": a if sa > sb else (b if sb > sa else "tie"),
            }
        )
    return {
        "model_a": a,
        "model_b": b,
        "total_pairs": pair_file["n"],
        "wins_a": pair_file["wins_a"],
        "wins_b": pair_file["wins_b"],
        "ties": pair_file["ties"],
        "win_rate_a_over_b": pair_file["win_rate_a"],
        "mean_score_a": pair_file["mean_a"],
        "mean_score_b": pair_file["mean_b"],
        "ties_policy": "loss_for_a" if pair_file.get("ties_as_loss_for_a") else "half",
        "results": results,
    }


def official_summary(pairs: dict[str, dict]) -> dict:
    """The official ``summary.json`` from official pair files ``{metric: pair file}``."""
    first = next(iter(pairs.values()))
    rows = [
        {
            "metric": OFFICIAL_NAMES.get(m, m),
            "mean_a": d["mean_score_a"],
            "mean_b": d["mean_score_b"],
            "win_rate_a_over_b": d["win_rate_a_over_b"],
            "wins_a": d["wins_a"],
            "wins_b": d["wins_b"],
            "ties": d["ties"],
            "total_pairs": d["total_pairs"],
        }
        for m, d in pairs.items()
    ]
    total = sum(r["total_pairs"] for r in rows)
    return {
        "pair": {
            "model_a": first["model_a"],
            "model_b": first["model_b"],
            "ties_policy": first["ties_policy"],
        },
        "metrics": rows,
        "averages": {
            "macro_win_rate_a_over_b": sum(r["win_rate_a_over_b"] for r in rows) / len(rows),
            "micro_win_rate_a_over_b": (
                sum(r["win_rate_a_over_b"] * r["total_pairs"] for r in rows) / total
                if total
                else None
            ),
        },
    }


def write_official(
    outdir: str | Path,
    pair_files: dict[str, dict],
    runs_a: list[list[dict]],
    runs_b: list[list[dict]],
    ties_as_loss_for_a: bool = False,
) -> list[Path]:
    """Write ``pair_<metric>.json`` and ``summary.json`` (official layout) into ``outdir``."""
    outdir = Path(outdir)

    def images(runs):
        return {
            (k, i): r.get("image_file") or r.get("image", "")
            for k, records in enumerate(runs)
            for i, r in enumerate(records)
        }

    ia, ib = images(runs_a), images(runs_b)
    official = {
        m: official_pair_file({**pf, "ties_as_loss_for_a": ties_as_loss_for_a}, ia, ib)
        for m, pf in pair_files.items()
    }
    written = [io.write_json(outdir / f"pair_{m}.json", d, indent=2) for m, d in official.items()]
    if official:
        written.append(io.write_json(outdir / "summary.json", official_summary(official), indent=2))
    return written
