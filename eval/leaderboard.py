"""A leaderboard over many checkpoints and prompt sets: scores with intervals, win rates against a
baseline, and each metric against the training step.

    python -m eval.leaderboard --runs runs/x/checkpoint-500/eval_sd15 runs/x/checkpoint-1000/eval_sd15 \\
        base=outputs/eval_base_sd15 --baseline base --outdir runs/x/leaderboard

Each ``--runs`` item is an evaluation folder (every manifest in it, as written by
scripts/eval/test_sd15.sh or eval.generate) or one manifest, optionally prefixed with ``LABEL=``.
Without a label, a run is named after its folder (the folder above ``eval_*``, e.g.
``checkpoint-1000``). A manifest's prompt set is the part of its name before ``_seed``; several
manifests of one run and set are seeds (pooled per prompt, as in eval.compare).

For every run x prompt set x metric (missing scores are computed first with eval.score's logic,
cached scores reused):

* the mean score with a 95% bootstrap interval over prompts (each prompt's score first averaged
  over its seeds);
* against ``--baseline`` (a run label; default the first run) on the same prompt set: the win
  rate with its interval, the mean difference and the Wilcoxon p-value (eval.compare's rules and
  eval/stats.py; prompts paired by their text, seeds by their value).

Writes into ``--outdir``: ``leaderboard.md`` (one table per prompt set), ``leaderboard.csv`` (one
row per run, set and metric), ``leaderboard.html`` (the tables and plots, self-contained) and,
when at least two runs carry a training step (``checkpoint-N`` / ``step-N`` in their label or
path), ``<metric>_vs_step.png``: the metric's mean and interval against the step, one line per
prompt set, the baseline as a dashed line.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eval import stats
from eval.compare import CompareError, compare_runs
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

STEP_PATTERN = re.compile(r"(?:checkpoint|step|ckpt)[-_]?(\d+)", re.IGNORECASE)


@dataclass
class LeaderboardConfig:
    """Options of ``python -m eval.leaderboard`` (see ``--help``)."""

    runs: list[str] = arg(
        help="evaluation folders or manifests, each optionally LABEL=PATH", required=True
    )
    outdir: str = arg(help="output folder", required=True)
    baseline: str | None = arg(None, "label of the run the win rates are against (default: first)")
    metrics: list[str] = arg(
        help="'all' or a comma list of " + ",".join(METRICS),
        default_factory=lambda: list(METRICS),
        metavar="METRICS",
    )
    device: str = arg("auto", "device for scoring unscored manifests")
    batch_size: int = arg(16, "scorer batch size")
    resamples: int = arg(stats.DEFAULT_RESAMPLES, "bootstrap resamples of the prompts")
    stats_seed: int = arg(stats.DEFAULT_SEED, "seed of the bootstrap draws")
    weights: dict[str, dict[str, str]] = arg(
        default_factory=dict, cli=False, help="metric -> {key: location} (the weight flags)"
    )


def check_config(cfg: LeaderboardConfig) -> LeaderboardConfig:
    cfg.metrics = parse_metrics(cfg.metrics)
    if cfg.resamples < 1:
        raise ValueError(f"--resamples must be >= 1, got {cfg.resamples}")
    return cfg


# ---------------------------------------------------------------- discovering the runs


@dataclass
class Manifest:
    run: str
    path: Path
    prompt_set: str
    seed: int
    step: int | None


def _is_manifest(path: Path) -> bool:
    if path.name.startswith("summary_") or path.name.endswith(".summary.json"):
        return False
    try:
        rows = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return (
        isinstance(rows, list)
        and bool(rows)
        and isinstance(rows[0], dict)
        and ("gen_image_path" in rows[0])
    )


def _default_label(path: Path) -> str:
    folder = path if path.is_dir() else path.parent
    return folder.parent.name if folder.name.startswith("eval") else folder.name


def _step(*texts: str) -> int | None:
    for t in texts:
        found = STEP_PATTERN.findall(t)
        if found:
            return int(found[-1])
    return None


def discover(items: list[str]) -> list[Manifest]:
    """The manifests of every ``--runs`` item (one clear error for a missing or empty one)."""
    out: list[Manifest] = []
    labels: dict[str, str] = {}
    for item in items:
        label, sep, raw = item.partition("=")
        if not sep or Path(item).exists():
            label, raw = "", item
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"--runs: {path} does not exist")
        label = label or _default_label(path)
        if labels.get(label, str(path)) != str(path):
            raise ValueError(
                f"--runs: the label {label!r} names both {labels[label]} and {path}; "
                "give distinct LABEL=PATH"
            )
        labels[label] = str(path)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        manifests = [f for f in files if _is_manifest(f)]
        if not manifests:
            raise FileNotFoundError(f"--runs: no generation manifest in {path}")
        step = _step(label, str(path.resolve()))
        for m in manifests:
            rows = json.loads(m.read_text())
            md = rows[0].get("metadata") or {}
            prompt_set = m.stem.split("_seed")[0]
            seed = md.get("seed")
            if seed is None:
                found = re.search(r"_seed(\d+)", m.stem)
                seed = int(found.group(1)) if found else 0
            out.append(Manifest(label, m, prompt_set, int(seed), step))
    return out


# ---------------------------------------------------------------- the numbers


def mean_with_interval(runs: list[list[dict]], metric: str, idx_seed: int, resamples: int):
    """Mean score over prompts (each prompt averaged over its seeds) and its bootstrap interval."""
    per_prompt: dict[tuple[str, int], list[float]] = {}
    for records in runs:
        seen: dict[str, int] = {}
        for r in records:
            k = seen.get(r["prompt"], 0)
            seen[r["prompt"]] = k + 1
            if r.get(metric) is not None:
                per_prompt.setdefault((r["prompt"], k), []).append(float(r[metric]))
    values = np.array([np.mean(v) for v in per_prompt.values()], dtype=np.float64)
    if values.size == 0:
        return math.nan, [math.nan, math.nan], 0
    idx = stats.bootstrap_indices(len(values), resamples, idx_seed)
    ci = stats.percentile_interval(values[idx].mean(axis=1))
    return float(values.mean()), list(ci), int(values.size)


def build_rows(
    manifests: list[Manifest],
    records: dict[Path, list[dict]],
    metrics: list[str],
    baseline: str,
    resamples: int,
    stats_seed: int,
) -> list[dict]:
    """One row per run x prompt set x metric (see the module docstring)."""
    groups: dict[tuple[str, str], list[Manifest]] = {}
    for m in manifests:
        groups.setdefault((m.run, m.prompt_set), []).append(m)
    rows = []
    for (run, prompt_set), ms in groups.items():
        ms = sorted(ms, key=lambda m: m.seed)
        base = {m.seed: m for m in groups.get((baseline, prompt_set), [])}
        shared = [m for m in ms if m.seed in base]
        for metric in metrics:
            mean, ci, n = mean_with_interval(
                [records[m.path] for m in ms], metric, stats_seed, resamples
            )
            row = {
                "run": run,
                "step": ms[0].step,
                "prompt_set": prompt_set,
                "metric": metric,
                "n_prompts": n,
                "seeds": [m.seed for m in ms],
                "mean": mean,
                "mean_ci": ci,
                "win_rate_vs_baseline": math.nan,
                "win_rate_ci": [math.nan, math.nan],
                "mean_diff_vs_baseline": math.nan,
                "wilcoxon_p": math.nan,
            }
            if run != baseline and shared:
                try:
                    _, summary = compare_runs(
                        [records[m.path] for m in shared],
                        [records[base[m.seed].path] for m in shared],
                        [metric],
                        run,
                        baseline,
                        resamples=resamples,
                        stats_seed=stats_seed,
                        seeds=[m.seed for m in shared],
                    )
                except CompareError as err:
                    raise CompareError(f"{run} vs {baseline} on {prompt_set}: {err}") from None
                s = summary["metrics"][metric]
                row.update(
                    win_rate_vs_baseline=s["win_rate_a"],
                    win_rate_ci=s["win_rate_ci"],
                    mean_diff_vs_baseline=s["mean_diff"],
                    wilcoxon_p=s["wilcoxon_p"],
                )
            rows.append(row)
    return rows


# ---------------------------------------------------------------- outputs


def _order(rows: list[dict]) -> list[dict]:
    """Runs by step (runs without a step first, in the given order), then set and metric."""
    first = {}
    for n, r in enumerate(rows):
        first.setdefault(r["run"], n)
    return sorted(
        rows,
        key=lambda r: (
            r["prompt_set"],
            r["step"] is not None,
            r["step"] or 0,
            first[r["run"]],
        ),
    )


def to_markdown(rows: list[dict], metrics: list[str], baseline: str) -> str:
    """One table per prompt set: a row per run, a column per metric with the mean [CI] and the
    win rate against the baseline [CI]."""
    out = [
        "# Leaderboard",
        "",
        f"Mean score [95% bootstrap interval over prompts]; below it the win rate against "
        f"**{baseline}** on the same prompts [95% interval] and the Wilcoxon p-value.",
    ]
    by_set: dict[str, list[dict]] = {}
    for r in _order(rows):
        by_set.setdefault(r["prompt_set"], []).append(r)
    for prompt_set, rs in by_set.items():
        runs = list(dict.fromkeys(r["run"] for r in rs))
        cell = {(r["run"], r["metric"]): r for r in rs}
        out += ["", f"## {prompt_set}", ""]
        out.append("| run | step | prompts x seeds | " + " | ".join(metrics) + " |")
        out.append("|---|---:|---:|" + "---:|" * len(metrics))
        for run in runs:
            any_row = next(r for r in rs if r["run"] == run)
            cells = []
            for m in metrics:
                r = cell.get((run, m))
                if r is None:
                    cells.append("-")
                    continue
                text = f"{r['mean']:.4f} [{r['mean_ci'][0]:.4f}, {r['mean_ci'][1]:.4f}]"
                if run == baseline:
                    text += "<br>(baseline)"
                elif not math.isnan(r["win_rate_vs_baseline"]):
                    lo, hi = r["win_rate_ci"]
                    text += (
                        f"<br>win {100 * r['win_rate_vs_baseline']:.1f}% [{100 * lo:.1f}, "
                        f"{100 * hi:.1f}] p={stats.format_p(r['wilcoxon_p'])}"
                    )
                cells.append(text)
            step = "" if any_row["step"] is None else str(any_row["step"])
            n = f"{any_row['n_prompts']} x {len(any_row['seeds'])}"
            out.append(f"| {run} | {step} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


CSV_FIELDS = ["run", "step", "prompt_set", "metric", "n_prompts", "seeds", "mean", "mean_ci_low",
              "mean_ci_high", "win_rate_vs_baseline", "win_rate_ci_low", "win_rate_ci_high",
              "mean_diff_vs_baseline", "wilcoxon_p"]  # fmt: skip


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in _order(rows):
        w.writerow(
            {
                **{k: r[k] for k in ("run", "prompt_set", "metric", "n_prompts", "mean")},
                "step": "" if r["step"] is None else r["step"],
                "seeds": " ".join(map(str, r["seeds"])),
                "mean_ci_low": r["mean_ci"][0],
                "mean_ci_high": r["mean_ci"][1],
                "win_rate_vs_baseline": r["win_rate_vs_baseline"],
                "win_rate_ci_low": r["win_rate_ci"][0],
                "win_rate_ci_high": r["win_rate_ci"][1],
                "mean_diff_vs_baseline": r["mean_diff_vs_baseline"],
                "wilcoxon_p": r["wilcoxon_p"],
            }
        )
    return buf.getvalue()


def plot_steps(rows: list[dict], metric: str, baseline: str):
    """A matplotlib figure of ``metric`` against the training step (None: fewer than two runs
    with a step)."""
    series = [r for r in rows if r["metric"] == metric and r["step"] is not None]
    if len({r["run"] for r in series}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    sets = sorted({r["prompt_set"] for r in series})
    steps = [r["step"] for r in series]
    # the sets' points are nudged apart along x so that their interval bars do not overlap
    nudge = 0.012 * ((max(steps) - min(steps)) or 1)
    for n, prompt_set in enumerate(sets):
        pts = sorted((r for r in series if r["prompt_set"] == prompt_set), key=lambda r: r["step"])
        x = [r["step"] + nudge * (n - (len(sets) - 1) / 2) for r in pts]
        y = [r["mean"] for r in pts]
        err = [
            [r["mean"] - r["mean_ci"][0] for r in pts],
            [r["mean_ci"][1] - r["mean"] for r in pts],
        ]
        color = f"C{n}"
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=color, label=prompt_set)
        base = [
            r
            for r in rows
            if r["run"] == baseline and r["metric"] == metric and r["prompt_set"] == prompt_set
        ]
        if base and base[0]["step"] is None:
            ax.axhline(base[0]["mean"], color=color, linestyle="--", linewidth=1,
                       label=f"{prompt_set}: {baseline}")  # fmt: skip
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{metric} (mean, 95% CI)")
    ax.set_title(f"{metric} against training step")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _figure_png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def to_html(markdown_rows: list[dict], metrics, baseline, pngs: dict[str, bytes], sources) -> str:
    rows = _order(markdown_rows)
    by_set: dict[str, list[dict]] = {}
    for r in rows:
        by_set.setdefault(r["prompt_set"], []).append(r)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>Leaderboard</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin-bottom:1em}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right;font-size:13px}"
        "td:first-child{text-align:left}.sub{color:#555;font-size:11px}"
        ".best{background:#e3f4e3}</style></head><body><h1>Leaderboard</h1>",
        f"<p>Mean score [95% bootstrap interval over prompts]; below it the win rate against "
        f"<b>{html.escape(baseline)}</b> on the same prompts [95% interval] and the Wilcoxon "
        "p-value. Highlighted: the highest mean of each metric and prompt set.</p>",
    ]
    for prompt_set, rs in by_set.items():
        runs = list(dict.fromkeys(r["run"] for r in rs))
        cell = {(r["run"], r["metric"]): r for r in rs}
        best = {
            m: max((r["mean"] for r in rs if r["metric"] == m), default=math.nan) for m in metrics
        }
        parts.append(
            f"<h2>{html.escape(prompt_set)}</h2><table><tr><th>run</th><th>step</th>"
            "<th>prompts &times; seeds</th>"
        )
        parts.append("".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "</tr>")
        for run in runs:
            first = next(r for r in rs if r["run"] == run)
            step = first["step"]
            tds = []
            for m in metrics:
                r = cell.get((run, m))
                if r is None:
                    tds.append("<td>-</td>")
                    continue
                sub = "baseline" if run == baseline else ""
                if run != baseline and not math.isnan(r["win_rate_vs_baseline"]):
                    lo, hi = r["win_rate_ci"]
                    sub = (
                        f"win {100 * r['win_rate_vs_baseline']:.1f}% [{100 * lo:.1f}, "
                        f"{100 * hi:.1f}], p {stats.format_p(r['wilcoxon_p'])}"
                    )
                cls = " class='best'" if r["mean"] == best[m] else ""
                tds.append(
                    f"<td{cls}>{r['mean']:.4f} [{r['mean_ci'][0]:.4f}, {r['mean_ci'][1]:.4f}]"
                    f"<br><span class='sub'>{sub}</span></td>"
                )
            parts.append(
                f"<tr><td>{html.escape(run)}</td><td>{'' if step is None else step}</td>"
                f"<td>{first['n_prompts']} &times; {len(first['seeds'])}</td>"
                + "".join(tds)
                + "</tr>"
            )
        parts.append("</table>")
    if pngs:
        parts.append("<h2>Metrics against training step</h2>")
        for m, data in pngs.items():
            uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
            parts.append(f"<img src='{uri}' alt='{html.escape(m)} against step'>")
    parts.append("<h2>Inputs</h2><ul>")
    for m in sources:
        parts.append(
            f"<li>{html.escape(m.run)} / {html.escape(m.prompt_set)} / seed {m.seed}: "
            f"{html.escape(str(m.path.resolve()))}</li>"
        )
    parts.append("</ul></body></html>\n")
    return "\n".join(parts)


# ---------------------------------------------------------------- driver


def parse_args(argv=None) -> LeaderboardConfig:
    return parse_with_weights(
        LeaderboardConfig, argv, module="eval.leaderboard", doc=__doc__, check=check_config
    )


def main(cfg: LeaderboardConfig) -> dict[str, Path]:
    manifests = discover(cfg.runs)
    labels = list(dict.fromkeys(m.run for m in manifests))
    baseline = cfg.baseline or labels[0]
    if baseline not in labels:
        raise ValueError(f"--baseline {baseline!r} is not one of the runs {labels}")
    score_manifests(
        ScoreConfig(
            manifests=[str(m.path) for m in manifests],
            metrics=cfg.metrics,
            device=cfg.device,
            batch_size=cfg.batch_size,
            weights=cfg.weights,
        )
    )
    records = {m.path: read_scores(scores_path(m.path)) for m in manifests}
    rows = build_rows(manifests, records, cfg.metrics, baseline, cfg.resamples, cfg.stats_seed)
    out = Path(cfg.outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = {
        "markdown": sdpo_io.write_text(
            out / "leaderboard.md", to_markdown(rows, cfg.metrics, baseline)
        ),
        "csv": sdpo_io.write_text(out / "leaderboard.csv", to_csv(rows)),
    }
    pngs = {}
    for metric in cfg.metrics:
        fig = plot_steps(rows, metric, baseline)
        if fig is not None:
            pngs[metric] = _figure_png(fig)
            written[f"{metric}_vs_step"] = sdpo_io.write_bytes(
                out / f"{metric}_vs_step.png", pngs[metric]
            )
    written["html"] = sdpo_io.write_text(
        out / "leaderboard.html", to_html(rows, cfg.metrics, baseline, pngs, manifests)
    )
    print(to_markdown(rows, cfg.metrics, baseline))
    for name, path in written.items():
        print(f"{name}: {path}")
    return written


def cli(argv=None):
    cfg = parse_args(argv)
    try:
        return main(cfg)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
