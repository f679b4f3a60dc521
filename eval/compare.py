"""A/B comparison of two scored manifests: per-metric win rates with macro and micro averages.

    python -m eval.compare --json_a A.json --json_b B.json --label_a A --label_b B
        [--metrics all|...] [--outdir D] [--device auto] [--batch_size 16] [--no_report]

``--json_a/--json_b`` are manifests (scored first with eval.score's logic; cached scores are
reused) or their ``.scores.jsonl`` files. Rules (as the official comparison):

* pairs: entries with the exact same prompt string, duplicate prompts paired in order of
  appearance; if no prompt is shared at all, entries are paired by index;
* per metric over the n pairs: a win is a strictly higher score, ``win_rate_a = (wins_a +
  0.5 * ties) / n``;
* macro = unweighted mean of the per-metric win rates; micro = the win rates weighted by the
  number of pairs of each metric (``sum(wins_a + ties/2) / sum(n)``).

Writes into ``--outdir`` (default ``<folder of A>/<label_a>_vs_<label_b>``): ``<metric>.json``
per metric (labels, pairing, n, wins_a, wins_b, ties, win_rate_a, win_rate_b, mean_a, mean_b and
the pairs), ``summary.json``, and (unless ``--no_report``) ``report.html`` + ``grid.png``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from eval.score import (
    METRICS,
    ScoreConfig,
    add_weight_flags,
    atomic_write_text,
    parse_metrics,
    read_scores,
    score_manifests,
    scores_path,
    weights_from_args,
)


@dataclass
class CompareConfig:
    json_a: str = ""  # manifest JSON or .scores.jsonl of system A
    json_b: str = ""  # manifest JSON or .scores.jsonl of system B
    label_a: str = "A"  # name of system A in files and tables
    label_b: str = "B"  # name of system B
    metrics: list[str] = field(default_factory=lambda: list(METRICS))  # metrics to compare
    outdir: str | None = None  # output folder (default <folder of A>/<label_a>_vs_<label_b>)
    device: str = "auto"  # device for scoring unscored manifests
    batch_size: int = 16  # scorer batch size
    report: bool = True  # also write report.html and grid.png
    num_samples: int = 16  # prompts shown side by side in the report
    weights: dict[str, dict[str, str]] = field(default_factory=dict)  # as in eval.score


# ---------------------------------------------------------------- pure maths


def pair_indices(prompts_a: list[str], prompts_b: list[str]) -> tuple[list[tuple[int, int]], str]:
    """Pairs ``(i_a, i_b)`` and the rule used (``"prompt"`` or ``"index"``).

    Same exact prompt -> paired; the k-th occurrence of a prompt in A goes with its k-th
    occurrence in B (extra occurrences stay unpaired). If no prompt is shared, pair by index
    up to the shorter list. Pairs come in A's order.
    """
    positions_b: dict[str, list[int]] = defaultdict(list)
    for j, p in enumerate(prompts_b):
        positions_b[p].append(j)
    seen: dict[str, int] = defaultdict(int)
    pairs = []
    for i, p in enumerate(prompts_a):
        k = seen[p]
        seen[p] += 1
        if k < len(positions_b.get(p, ())):
            pairs.append((i, positions_b[p][k]))
    if pairs:
        return pairs, "prompt"
    return [(i, i) for i in range(min(len(prompts_a), len(prompts_b)))], "index"


def win_stats(scores_a: list[float], scores_b: list[float]) -> dict[str, float]:
    """n, wins_a, wins_b, ties, win_rate_a = (wins_a + ties/2)/n, win_rate_b, mean_a, mean_b."""
    if len(scores_a) != len(scores_b):
        raise ValueError("win_stats needs paired scores of equal length")
    n = len(scores_a)
    wins_a = sum(a > b for a, b in zip(scores_a, scores_b))
    wins_b = sum(b > a for a, b in zip(scores_a, scores_b))
    ties = n - wins_a - wins_b
    nan = float("nan")
    return {
        "n": n,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "win_rate_a": (wins_a + 0.5 * ties) / n if n else nan,
        "win_rate_b": (wins_b + 0.5 * ties) / n if n else nan,
        "mean_a": sum(scores_a) / n if n else nan,
        "mean_b": sum(scores_b) / n if n else nan,
    }


def averages(per_metric: dict[str, dict]) -> dict[str, float]:
    """macro: mean of win_rate_a over metrics; micro: pooled over all pairs of all metrics."""
    rows = [s for s in per_metric.values() if s["n"]]
    if not rows:
        return {"macro_win_rate_a": float("nan"), "micro_win_rate_a": float("nan")}
    macro = sum(s["win_rate_a"] for s in rows) / len(rows)
    micro = sum(s["wins_a"] + 0.5 * s["ties"] for s in rows) / sum(s["n"] for s in rows)
    return {"macro_win_rate_a": macro, "micro_win_rate_a": micro}


def compare_records(
    records_a: list[dict],
    records_b: list[dict],
    metrics: list[str],
    label_a: str = "A",
    label_b: str = "B",
) -> tuple[dict[str, dict], dict]:
    """Per-metric pair files and the summary for two lists of score records.

    Records: dicts with ``prompt`` and one float per metric (as in ``.scores.jsonl``).
    Pairs where either side lacks the metric are an error (score both sides first).
    """
    pairs, rule = pair_indices([r["prompt"] for r in records_a], [r["prompt"] for r in records_b])
    per_metric, pair_files = {}, {}
    for metric in metrics:
        lacking = [
            i
            for i, j in pairs
            if records_a[i].get(metric) is None or records_b[j].get(metric) is None
        ]
        if lacking:
            raise ValueError(
                f"metric {metric!r} is missing for {len(lacking)} paired entries (first A index {lacking[0]})"
            )
        sa = [float(records_a[i][metric]) for i, _ in pairs]
        sb = [float(records_b[j][metric]) for _, j in pairs]
        stats = win_stats(sa, sb)
        per_metric[metric] = stats
        pair_files[metric] = {
            "metric": metric,
            "label_a": label_a,
            "label_b": label_b,
            "pairing": rule,
            **stats,
            "pairs": [
                {
                    "index_a": i,
                    "index_b": j,
                    "prompt": records_a[i]["prompt"],
                    "score_a": a,
                    "score_b": b,
                }
                for (i, j), a, b in zip(pairs, sa, sb)
            ],
        }
    summary = {
        "label_a": label_a,
        "label_b": label_b,
        "pairing": rule,
        "n_a": len(records_a),
        "n_b": len(records_b),
        "n_pairs": len(pairs),
        "metrics": per_metric,
        **averages(per_metric),
    }
    return pair_files, summary


def format_summary(summary: dict) -> str:
    a, b = summary["label_a"], summary["label_b"]
    head = f"{'metric':<12} | {'n':>5} | {'wins ' + a:>12} | {'wins ' + b:>12} | {'ties':>5} | {'win rate ' + a:>14} | {'mean ' + a:>12} | {'mean ' + b:>12}"
    lines = [
        f"{a} vs {b} (paired by {summary['pairing']}, {summary['n_pairs']} pairs)",
        head,
        "-" * len(head),
    ]
    for m, s in summary["metrics"].items():
        lines.append(
            f"{m:<12} | {s['n']:>5} | {s['wins_a']:>12} | {s['wins_b']:>12} | {s['ties']:>5} | "
            f"{s['win_rate_a']:>14.4f} | {s['mean_a']:>12.4f} | {s['mean_b']:>12.4f}"
        )
    lines.append(
        f"macro win rate {a}: {summary['macro_win_rate_a']:.4f}   micro win rate {a}: {summary['micro_win_rate_a']:.4f}"
    )
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv=None) -> CompareConfig:
    parser = argparse.ArgumentParser(
        prog="python -m eval.compare", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json_a", required=True, help="manifest JSON or .scores.jsonl of A")
    parser.add_argument("--json_b", required=True, help="manifest JSON or .scores.jsonl of B")
    parser.add_argument("--label_a", default="A", help="name of A")
    parser.add_argument("--label_b", default="B", help="name of B")
    parser.add_argument(
        "--metrics", default="all", help="'all' or a comma list of " + ",".join(METRICS)
    )
    parser.add_argument("--outdir", default=None, help="output folder")
    parser.add_argument("--device", default="auto", help="device to score unscored manifests")
    parser.add_argument("--batch_size", type=int, default=16, help="scorer batch size")
    parser.add_argument("--num_samples", type=int, default=16, help="prompts shown in the report")
    parser.add_argument("--no_report", action="store_true", help="skip report.html / grid.png")
    add_weight_flags(parser)
    args = parser.parse_args(argv)
    try:
        metrics = parse_metrics(args.metrics)
    except ValueError as err:
        parser.error(str(err))
    return CompareConfig(
        json_a=args.json_a,
        json_b=args.json_b,
        label_a=args.label_a,
        label_b=args.label_b,
        metrics=metrics,
        outdir=args.outdir,
        device=args.device,
        batch_size=args.batch_size,
        report=not args.no_report,
        num_samples=args.num_samples,
        weights=weights_from_args(args),
    )


def _is_scores_file(path: str) -> bool:
    return path.endswith(".jsonl")


def load_or_score(cfg: CompareConfig) -> tuple[list[dict], list[dict]]:
    """Score records of A and B; manifests are scored (missing metrics only) first."""
    for path in (cfg.json_a, cfg.json_b):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    manifests = [p for p in (cfg.json_a, cfg.json_b) if not _is_scores_file(p)]
    if manifests:
        score_manifests(
            ScoreConfig(
                manifests=list(dict.fromkeys(manifests)),
                metrics=cfg.metrics,
                device=cfg.device,
                batch_size=cfg.batch_size,
                weights=cfg.weights,
            )
        )
    return tuple(
        read_scores(p if _is_scores_file(p) else scores_path(p)) for p in (cfg.json_a, cfg.json_b)
    )


def default_outdir(cfg: CompareConfig) -> Path:
    safe = "".join(
        c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.label_a}_vs_{cfg.label_b}"
    )
    return Path(cfg.json_a).parent / safe


def main(cfg: CompareConfig) -> dict:
    records_a, records_b = load_or_score(cfg)
    pair_files, summary = compare_records(
        records_a, records_b, cfg.metrics, cfg.label_a, cfg.label_b
    )
    outdir = Path(cfg.outdir) if cfg.outdir else default_outdir(cfg)
    outdir.mkdir(parents=True, exist_ok=True)
    for metric, data in pair_files.items():
        atomic_write_text(outdir / f"{metric}.json", json.dumps(data, indent=1))
    summary["json_a"], summary["json_b"] = str(cfg.json_a), str(cfg.json_b)
    atomic_write_text(outdir / "summary.json", json.dumps(summary, indent=1))
    print(format_summary(summary))
    if cfg.report:
        from eval.report import ReportConfig, write_report

        paths = write_report(
            ReportConfig(
                json_a=cfg.json_a,
                json_b=cfg.json_b,
                compare_dir=str(outdir),
                num_samples=cfg.num_samples,
            )
        )
        print("report:", *[str(p) for p in paths])
    print(f"results: {outdir}")
    return summary


if __name__ == "__main__":
    main(parse_args())
