"""A/B comparison of scored manifests: per-metric win rates with intervals, tests and averages.

    python -m eval.compare --json_a A.json --json_b B.json --label_a A --label_b B
        [--metrics all|...] [--outdir D] [--device auto] [--batch_size 16] [--no_report]
        [--resamples 2000] [--pair_by_index] [--ties_as_loss_for_a]
    python -m eval.compare --json_a A_seed0.json A_seed1.json --json_b B_seed0.json B_seed1.json

``--json_a/--json_b`` are manifests (scored first with eval.score's logic; cached scores are
reused) or their ``.scores.jsonl`` files; several of each = several seeds, the k-th of A compared
with the k-th of B. Rules (as the official comparison, plus the statistics of eval/stats.py):

* pairs: entries with the exact same prompt string, duplicate prompts paired in order of
  appearance. Manifests without any common prompt are refused unless ``--pair_by_index`` asks to
  pair them by position; prompts left unpaired and differing generation settings (seed, size,
  steps, cfg, scheduler, dtype, VAE, prompt set) are warned about on the console and in
  ``summary.json`` / the page;
* per metric over the n pairs: a win is a strictly higher score, ``win_rate_a = (wins_a +
  0.5 * ties) / n`` (``--ties_as_loss_for_a``: ties count 0 for A, as the official flag);
* uncertainty (eval/stats.py): with several seeds each prompt's outcome is pooled over its seeds;
  95% bootstrap intervals over prompts (``--resamples``, fixed ``--stats_seed``) of the win rate,
  the mean score difference and the macro / micro averages, the sign-test and Wilcoxon p-values,
  the effect size d_z, and the between-seed spread (sd over seeds of the per-seed win rate and
  mean difference);
* macro = unweighted mean of the per-metric win rates; micro = the win rates weighted by the
  number of pairs of each metric (``sum(wins_a + ties/2) / sum(n)``).

Writes into ``--outdir`` (default ``<folder of A>/<label_a>_vs_<label_b>``): ``<metric>.json``
per metric (labels, pairing, n, wins_a, wins_b, ties, win_rate_a, win_rate_b, mean_a, mean_b,
the statistics and the pairs), ``summary.json``, ``official/`` (the same comparison in the
official ``pair_<metric>.json`` + ``summary.json`` layout, eval/official.py), and (unless
``--no_report``) ``report.html`` + ``grid.png``.

Official manifests are read whatever their path convention: relative image paths are looked up
beside the manifest, then under the working directory (``--image_root`` sets the folder).
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from eval import stats
from eval.official import write_official
from eval.score import (
    METRICS,
    ScoreConfig,
    parse_metrics,
    parse_with_weights,
    read_scores,
    score_manifests,
    scores_path,
)
from sdpo import io as sdpo_io
from sdpo.cli import arg

# Generation settings two compared runs should share (what differs on purpose, the weights, is
# not listed); a difference is a warning, not an error (comparing two step counts can be the point).
SETTING_KEYS = (
    "seed",
    "height",
    "width",
    "steps",
    "cfg",
    "scheduler",
    "negative_prompt",
    "dtype",
    "vae",
    "prompts_sha256",
)


class CompareError(ValueError):
    """Inputs that cannot be compared as asked (the message says what to do)."""


@dataclass
class CompareConfig:
    """Options of ``python -m eval.compare`` (see ``--help``)."""

    json_a: list[str] = arg(
        help="manifest JSON(s) or .scores.jsonl of system A (several: one per seed)",
        required=True,
    )
    json_b: list[str] = arg(
        help="manifest JSON(s) or .scores.jsonl of system B, in the same seed order as A",
        required=True,
    )
    label_a: str = arg("A", "name of system A in files and tables")
    label_b: str = arg("B", "name of system B")
    metrics: list[str] = arg(
        help="'all' or a comma list of " + ",".join(METRICS),
        default_factory=lambda: list(METRICS),
        metavar="METRICS",
    )
    outdir: str | None = arg(None, "output folder (default <folder of A>/<label_a>_vs_<label_b>)")
    device: str = arg("auto", "device for scoring unscored manifests")
    batch_size: int = arg(16, "scorer batch size")
    num_samples: int = arg(16, "prompts shown side by side in the report")
    no_report: bool = arg(False, "skip report.html and grid.png")
    pair_by_index: bool = arg(
        False, "pair entries by position when A and B share no prompt (refused otherwise)"
    )
    ties_as_loss_for_a: bool = arg(False, "a tie counts 0 for A instead of 1/2 (official flag)")
    image_root: str | None = arg(
        None,
        "folder relative image paths start from (default: beside the manifest, else the working "
        "directory, where the official scripts' paths start)",
    )
    resamples: int = arg(stats.DEFAULT_RESAMPLES, "bootstrap resamples of the prompts")
    stats_seed: int = arg(stats.DEFAULT_SEED, "seed of the bootstrap draws")
    weights: dict[str, dict[str, str]] = arg(
        default_factory=dict, cli=False, help="metric -> {key: location} (the weight flags)"
    )

    def __post_init__(self):
        # one file per side is accepted as a plain string (programmatic use)
        if isinstance(self.json_a, str):
            self.json_a = [self.json_a]
        if isinstance(self.json_b, str):
            self.json_b = [self.json_b]

    @property
    def report(self) -> bool:
        return not self.no_report


def check_compare_config(cfg: CompareConfig) -> CompareConfig:
    cfg.metrics = parse_metrics(cfg.metrics)
    if len(cfg.json_a) != len(cfg.json_b):
        raise ValueError(
            f"--json_a has {len(cfg.json_a)} file(s) but --json_b {len(cfg.json_b)}: give one of "
            "each per seed, in the same order"
        )
    for name in ("batch_size", "resamples"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    return cfg


# ---------------------------------------------------------------- pure maths


def pair_indices(prompts_a: list[str], prompts_b: list[str]) -> tuple[list[tuple[int, int]], str]:
    """Pairs ``(i_a, i_b)`` and the rule used (``"prompt"`` or ``"index"``).

    Same exact prompt -> paired; the k-th occurrence of a prompt in A goes with its k-th
    occurrence in B (extra occurrences stay unpaired). If no prompt is shared, pair by index
    up to the shorter list (callers refuse that unless asked). Pairs come in A's order.
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


def win_stats(
    scores_a: list[float], scores_b: list[float], tie_credit: float = 0.5
) -> dict[str, float]:
    """n, wins_a, wins_b, ties, win_rate_a = (wins_a + tie_credit*ties)/n, win_rate_b, mean_a,
    mean_b, std_a, std_b (sample standard deviations of the scores)."""
    if len(scores_a) != len(scores_b):
        raise ValueError("win_stats needs paired scores of equal length")
    n = len(scores_a)
    wins_a = sum(a > b for a, b in zip(scores_a, scores_b))
    wins_b = sum(b > a for a, b in zip(scores_a, scores_b))
    ties = n - wins_a - wins_b
    nan = float("nan")

    def sd(xs):
        if len(xs) < 2:
            return 0.0 if xs else nan
        m = sum(xs) / len(xs)
        return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))

    return {
        "n": n,
        "wins_a": wins_a,
        "wins_b": wins_b,
        "ties": ties,
        "win_rate_a": (wins_a + tie_credit * ties) / n if n else nan,
        "win_rate_b": (wins_b + tie_credit * ties) / n if n else nan,
        "mean_a": sum(scores_a) / n if n else nan,
        "mean_b": sum(scores_b) / n if n else nan,
        "std_a": sd(list(scores_a)),
        "std_b": sd(list(scores_b)),
    }


def averages(per_metric: dict[str, dict], tie_credit: float = 0.5) -> dict[str, float]:
    """macro: mean of win_rate_a over metrics; micro: pooled over all pairs of all metrics."""
    rows = [s for s in per_metric.values() if s["n"]]
    if not rows:
        return {"macro_win_rate_a": float("nan"), "micro_win_rate_a": float("nan")}
    macro = sum(s["win_rate_a"] for s in rows) / len(rows)
    micro = sum(s["wins_a"] + tie_credit * s["ties"] for s in rows) / sum(s["n"] for s in rows)
    return {"macro_win_rate_a": macro, "micro_win_rate_a": micro}


def settings_of(manifest_rows: list[dict] | None) -> dict:
    """The generation settings (:data:`SETTING_KEYS`) recorded in a manifest's metadata."""
    if not manifest_rows:
        return {}
    md = manifest_rows[0].get("metadata") or {}
    return {k: md[k] for k in SETTING_KEYS if k in md}


def setting_warnings(settings_a: list[dict], settings_b: list[dict], label_a, label_b):
    """One line per setting that differs between the k-th runs of A and B."""
    out = []
    for k, (sa, sb) in enumerate(zip(settings_a, settings_b)):
        run = f" (run {k})" if len(settings_a) > 1 else ""
        for key in SETTING_KEYS:
            if key in sa and key in sb and sa[key] != sb[key]:
                out.append(
                    f"settings differ{run}: {key} = {sa[key]!r} for {label_a} but {sb[key]!r} "
                    f"for {label_b}"
                )
    return out


def compare_runs(
    runs_a: list[list[dict]],
    runs_b: list[list[dict]],
    metrics: list[str],
    label_a: str = "A",
    label_b: str = "B",
    *,
    pair_by_index: bool = False,
    ties_as_loss_for_a: bool = False,
    resamples: int = stats.DEFAULT_RESAMPLES,
    stats_seed: int = stats.DEFAULT_SEED,
    seeds: list | None = None,
) -> tuple[dict[str, dict], dict]:
    """Per-metric pair files and the summary for k runs (seeds) of A against k runs of B.

    Records: dicts with ``prompt`` and one float per metric (as in ``.scores.jsonl``). The k-th
    runs are paired prompt by prompt; a prompt's pairs over the runs form one statistical unit
    (eval/stats.py). Pairs where either side lacks the metric are an error (score both first).
    """
    if len(runs_a) != len(runs_b) or not runs_a:
        raise CompareError("compare needs the same number (>= 1) of runs of A and B")
    tie_credit = 0.0 if ties_as_loss_for_a else 0.5
    seeds = list(seeds) if seeds is not None else list(range(len(runs_a)))
    warnings: list[str] = []
    run_pairs, rules = [], []
    for k, (ra, rb) in enumerate(zip(runs_a, runs_b)):
        pairs, rule = pair_indices([r["prompt"] for r in ra], [r["prompt"] for r in rb])
        run = f" (run {k})" if len(runs_a) > 1 else ""
        if rule == "index":
            if not pair_by_index:
                raise CompareError(
                    f"{label_a} and {label_b} share no prompt{run}: they were generated from "
                    "different prompt sets. Compare manifests of the same prompt set, or pass "
                    "--pair_by_index to pair the entries by position"
                )
            warnings.append(f"no common prompt{run}: entries paired by position (--pair_by_index)")
        unpaired_a, unpaired_b = len(ra) - len(pairs), len(rb) - len(pairs)
        if unpaired_a or unpaired_b:
            warnings.append(
                f"unpaired prompts{run}: {unpaired_a} of {len(ra)} in {label_a} and "
                f"{unpaired_b} of {len(rb)} in {label_b} have no partner and are left out"
            )
        run_pairs.append(pairs)
        rules.append(rule)
    rule = "index" if "index" in rules else "prompt"

    # the statistical unit: (prompt, occurrence); pairs of all runs grouped by it
    units: dict[tuple[str, int], list[tuple[int, int, int]]] = {}
    for k, pairs in enumerate(run_pairs):
        seen: dict[str, int] = defaultdict(int)
        for i, j in pairs:
            p = runs_a[k][i]["prompt"] if rule == "prompt" else f"#{i}"
            key = (p, seen[p])
            seen[p] += 1
            units.setdefault(key, []).append((k, i, j))
    n_units = len(units)
    idx = stats.bootstrap_indices(n_units, resamples, stats_seed) if n_units else None

    per_metric, pair_files, replicates = {}, {}, {}
    for metric in metrics:
        lacking = [
            (k, i)
            for k, pairs in enumerate(run_pairs)
            for i, j in pairs
            if runs_a[k][i].get(metric) is None or runs_b[k][j].get(metric) is None
        ]
        if lacking:
            raise CompareError(
                f"metric {metric!r} is missing for {len(lacking)} paired entries (first: run "
                f"{lacking[0][0]}, A index {lacking[0][1]}); score both sides first"
            )
        rows = [
            (k, i, j, float(runs_a[k][i][metric]), float(runs_b[k][j][metric]))
            for k, pairs in enumerate(run_pairs)
            for i, j in pairs
        ]
        st = win_stats([r[3] for r in rows], [r[4] for r in rows], tie_credit)
        groups = [
            [(float(runs_a[k][i][metric]), float(runs_b[k][j][metric])) for k, i, j in members]
            for members in units.values()
        ]
        w, d = stats.per_prompt(groups, tie_credit)
        extra = stats.paired_summary(w, d, idx if idx is not None else None)
        replicates[metric] = extra.pop("_win_replicates")
        st.update(extra)
        if len(runs_a) > 1:
            per_seed = []
            for k in range(len(runs_a)):
                sk = [r for r in rows if r[0] == k]
                ws = win_stats([r[3] for r in sk], [r[4] for r in sk], tie_credit)
                per_seed.append(
                    {
                        "run": k,
                        "seed": seeds[k],
                        "n": ws["n"],
                        "win_rate_a": ws["win_rate_a"],
                        "mean_diff": ws["mean_a"] - ws["mean_b"],
                    }
                )
            st["per_seed"] = per_seed
            st["seed_sd_win_rate_a"] = _sd([p["win_rate_a"] for p in per_seed])
            st["seed_sd_mean_diff"] = _sd([p["mean_diff"] for p in per_seed])
        per_metric[metric] = st
        pair_files[metric] = {
            "metric": metric,
            "label_a": label_a,
            "label_b": label_b,
            "pairing": rule,
            **st,
            "pairs": [
                {
                    "run": k,
                    "seed": seeds[k],
                    "index_a": i,
                    "index_b": j,
                    "prompt": runs_a[k][i]["prompt"],
                    "score_a": a,
                    "score_b": b,
                }
                for k, i, j, a, b in rows
            ],
        }
    n_pairs = sum(len(p) for p in run_pairs)
    summary = {
        "label_a": label_a,
        "label_b": label_b,
        "pairing": rule,
        "n_a": sum(len(r) for r in runs_a),
        "n_b": sum(len(r) for r in runs_b),
        "n_pairs": n_pairs,
        "n_prompts": n_units,
        "n_seeds": len(runs_a),
        "seeds": seeds,
        "ties_as_loss_for_a": ties_as_loss_for_a,
        "resamples": resamples,
        "stats_seed": stats_seed,
        "ci_level": stats.LEVEL,
        "metrics": per_metric,
        **averages(per_metric, tie_credit),
        **stats.average_intervals(replicates, {m: per_metric[m]["n"] for m in per_metric}),
        "warnings": warnings,
    }
    return pair_files, summary


def compare_records(
    records_a: list[dict],
    records_b: list[dict],
    metrics: list[str],
    label_a: str = "A",
    label_b: str = "B",
    **kwargs,
) -> tuple[dict[str, dict], dict]:
    """:func:`compare_runs` for one run of each side."""
    return compare_runs([records_a], [records_b], metrics, label_a, label_b, **kwargs)


def _sd(xs: list[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _ci(lo_hi, digits: int = 3) -> str:
    lo, hi = lo_hi
    return f"[{lo:.{digits}f}, {hi:.{digits}f}]"


def format_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A plain-text table whose columns fit their longest cell (long labels stay aligned)."""
    right = set(range(1, len(headers))) if right is None else right
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]

    def line(cells):
        return " | ".join(
            f"{c:>{w}}" if n in right else f"{c:<{w}}"
            for n, (c, w) in enumerate(zip(map(str, cells), widths))
        )

    head = line(headers)
    return "\n".join([head, "-" * len(head), *[line(r) for r in rows]])


def format_summary(summary: dict) -> str:
    a, b = summary["label_a"], summary["label_b"]
    level = round(100 * summary.get("ci_level", stats.LEVEL))
    seeds = summary.get("n_seeds", 1)
    headers = [
        "metric",
        "pairs",
        "wins A",
        "wins B",
        "ties",
        f"win rate A [{level}% CI]",
        f"mean diff A-B [{level}% CI]",
        "p sign",
        "p Wilcoxon",
        "d_z",
    ]
    if seeds > 1:
        headers.append("seed sd (win rate)")
    rows = []
    for m, s in summary["metrics"].items():
        row = [
            m,
            s["n"],
            s["wins_a"],
            s["wins_b"],
            s["ties"],
            f"{s['win_rate_a']:.3f} {_ci(s['win_rate_ci'])}",
            f"{s['mean_diff']:+.4f} {_ci(s['mean_diff_ci'], 4)}",
            stats.format_p(s["sign_test_p"]),
            stats.format_p(s["wilcoxon_p"]),
            f"{s['effect_size_dz']:+.2f}",
        ]
        if seeds > 1:
            row.append(f"{s.get('seed_sd_win_rate_a', 0.0):.3f}")
        rows.append(row)
    lines = [
        f"{a} vs {b}: {summary['n_pairs']} pairs over {summary.get('n_prompts', '?')} prompts"
        f" x {seeds} seed(s), paired by {summary['pairing']}"
        + ("; ties count as losses for A" if summary.get("ties_as_loss_for_a") else ""),
        f"A = {a}   B = {b}",
        format_table(headers, rows),
        f"macro win rate {a}: {summary['macro_win_rate_a']:.4f} "
        f"{_ci(summary.get('macro_win_rate_a_ci', [math.nan] * 2))}   "
        f"micro win rate {a}: {summary['micro_win_rate_a']:.4f} "
        f"{_ci(summary.get('micro_win_rate_a_ci', [math.nan] * 2))}",
        f"({level}% bootstrap intervals over prompts, {summary.get('resamples')} resamples; "
        "p: two-sided paired tests over prompts; d_z: mean difference / sd of differences)",
    ]
    for w in summary.get("warnings", []):
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def parse_args(argv=None) -> CompareConfig:
    return parse_with_weights(
        CompareConfig, argv, module="eval.compare", doc=__doc__, check=check_compare_config
    )


def _is_scores_file(path: str) -> bool:
    return path.endswith(".jsonl")


def manifest_of(path: str) -> Path | None:
    """The manifest of an input (itself, or the manifest beside a ``.scores.jsonl``)."""
    p = Path(path)
    if not _is_scores_file(path):
        return p
    if p.name.endswith(".scores.jsonl"):
        m = p.with_name(p.name[: -len(".scores.jsonl")] + ".json")
        return m if m.is_file() else None
    return None


def load_or_score(cfg: CompareConfig) -> tuple[list[list[dict]], list[list[dict]]]:
    """Score records of every run of A and B; manifests are scored (missing metrics only)."""
    paths = [*cfg.json_a, *cfg.json_b]
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path} does not exist")
    manifests = [p for p in paths if not _is_scores_file(p)]
    if manifests:
        score_manifests(
            ScoreConfig(
                manifests=list(dict.fromkeys(manifests)),
                metrics=cfg.metrics,
                device=cfg.device,
                batch_size=cfg.batch_size,
                weights=cfg.weights,
                image_root=cfg.image_root,
            )
        )

    def records(p):
        return read_scores(p if _is_scores_file(p) else scores_path(p))

    return [records(p) for p in cfg.json_a], [records(p) for p in cfg.json_b]


def _manifest_rows(path: str) -> list[dict] | None:
    m = manifest_of(path)
    if m is None or not m.is_file():
        return None
    try:
        rows = json.loads(m.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rows if isinstance(rows, list) else None


def provenance(cfg: CompareConfig) -> dict:
    """What was compared: the files and each run's recorded generation settings."""

    def side(paths):
        out = []
        for p in paths:
            rows = _manifest_rows(p)
            md = (rows[0].get("metadata") or {}) if rows else {}
            keep = ("base_model", "family", "unet_path", "unet_sha256", *SETTING_KEYS)
            out.append({"file": str(Path(p).resolve()), **{k: md[k] for k in keep if k in md}})
        return out

    return {"a": side(cfg.json_a), "b": side(cfg.json_b)}


def default_outdir(cfg: CompareConfig) -> Path:
    safe = "".join(
        c if c.isalnum() or c in "-_." else "_" for c in f"{cfg.label_a}_vs_{cfg.label_b}"
    )
    return Path(cfg.json_a[0]).parent / safe


def main(cfg: CompareConfig) -> dict:
    records_a, records_b = load_or_score(cfg)
    prov = provenance(cfg)
    seeds = [r.get("seed", k) for k, r in enumerate(prov["a"])]
    pair_files, summary = compare_runs(
        records_a,
        records_b,
        cfg.metrics,
        cfg.label_a,
        cfg.label_b,
        pair_by_index=cfg.pair_by_index,
        ties_as_loss_for_a=cfg.ties_as_loss_for_a,
        resamples=cfg.resamples,
        stats_seed=cfg.stats_seed,
        seeds=seeds,
    )
    summary["warnings"] += setting_warnings(
        [settings_of(_manifest_rows(p)) for p in cfg.json_a],
        [settings_of(_manifest_rows(p)) for p in cfg.json_b],
        cfg.label_a,
        cfg.label_b,
    )
    summary["json_a"], summary["json_b"] = list(cfg.json_a), list(cfg.json_b)
    summary["provenance"] = prov
    outdir = Path(cfg.outdir) if cfg.outdir else default_outdir(cfg)
    outdir.mkdir(parents=True, exist_ok=True)
    for metric, data in pair_files.items():
        sdpo_io.write_json(outdir / f"{metric}.json", data)
    sdpo_io.write_json(outdir / "summary.json", summary)
    write_official(outdir / "official", pair_files, records_a, records_b, cfg.ties_as_loss_for_a)
    print(format_summary(summary))
    if cfg.report:
        from eval.report import ReportConfig, write_report

        paths = write_report(
            ReportConfig(
                json_a=list(cfg.json_a),
                json_b=list(cfg.json_b),
                compare_dir=str(outdir),
                num_samples=cfg.num_samples,
            )
        )
        print("report:", *[str(p) for p in paths])
    print(f"results: {outdir}")
    return summary


def cli(argv=None) -> dict | None:
    """The command line: expected failures are one line on stderr (exit status 1)."""
    cfg = parse_args(argv)
    try:
        return main(cfg)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
