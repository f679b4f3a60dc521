"""A picture report of an A/B comparison: a self-contained HTML page and a PNG grid.

    python -m eval.report --json_a A.json --json_b B.json --compare_dir D [--num_samples 16]

``D`` is the output folder of ``eval.compare`` (``summary.json`` and ``<metric>.json``); with
several seeds, ``--json_a``/``--json_b`` list the runs in the order given to eval.compare. Writes
``D/report.html`` and ``D/grid.png``:

* what was compared (files, base model, weights and their hash, generation settings) and any
  warning of eval.compare (unpaired prompts, differing settings);
* the metric table (means with sd, wins, ties, win rate of A as a bar with its 95% interval, mean
  difference with its interval, p-values, effect size, between-seed spread) with macro / micro
  averages and their intervals;
* per metric, a histogram of the per-prompt score differences A - B (0 marked);
* for a sample of prompts, the A and B images side by side with their per-image scores (the
  higher one of each metric in bold). The sample is spread over the whole range of the pairs
  sorted by A's advantage (mean over metrics of the per-metric standardised score difference):
  the first cards are where A is most clearly better, the last where B is, the middle close calls;
  the page states this rule above the cards.

Images are embedded as base64 JPEG thumbnails, so the page is one file that can be mailed or
archived without the image folders, and it still shows every picture if those move; at the
default 256 px a 16-prompt page is about 1 MB.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from eval import stats
from eval.score import read_scores, scores_path
from sdpo import io as sdpo_io
from sdpo.cli import arg, parse


@dataclass
class ReportConfig:
    """Options of ``python -m eval.report`` (see ``--help``)."""

    json_a: list[str] = arg(
        help="manifest JSON(s) or .scores.jsonl of A, as given to eval.compare", required=True
    )
    json_b: list[str] = arg(help="manifest JSON(s) or .scores.jsonl of B", required=True)
    compare_dir: str = arg(help="eval.compare output folder (summary.json, <metric>.json)",
                           required=True)  # fmt: skip
    num_samples: int = arg(16, "prompts shown side by side in the HTML page")
    grid_rows: int = arg(8, "prompts in the PNG grid")
    thumb: int = arg(256, "thumbnail edge in pixels")
    out_html: str | None = arg(None, "HTML path (default <compare_dir>/report.html)")
    out_png: str | None = arg(None, "PNG path (default <compare_dir>/grid.png)")

    def __post_init__(self):
        # one file per side is accepted as a plain string (programmatic use)
        if isinstance(self.json_a, str):
            self.json_a = [self.json_a]
        if isinstance(self.json_b, str):
            self.json_b = [self.json_b]


def _records(path: str) -> tuple[list[dict], Path]:
    p = Path(path)
    scores = p if p.name.endswith(".jsonl") else scores_path(p)
    if not scores.is_file():
        raise FileNotFoundError(f"no score file {scores} (run eval.score / eval.compare first)")
    return read_scores(scores), scores.parent


def _image_path(base: Path, rel: str) -> Path:
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p


def _thumbnail(path: Path, edge: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
    # fit the longest side to ``edge``: shrink smoothly, enlarge small (test) images blockily
    scale = edge / max(im.size)
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return im.resize(size, resample)


def _data_uri(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def select_samples(pair_files: dict[str, dict], k: int) -> list[dict]:
    """Up to ``k`` pairs spread evenly over the pairs sorted by A's advantage (see module doc).

    Returns dicts ``{run, index_a, index_b, prompt, advantage, scores: {metric: (a, b)}}``.
    """
    metrics = list(pair_files)
    if not metrics:
        return []
    base = pair_files[metrics[0]]["pairs"]
    rows = []
    for n, pair in enumerate(base):
        scores = {
            m: (pair_files[m]["pairs"][n]["score_a"], pair_files[m]["pairs"][n]["score_b"])
            for m in metrics
        }
        rows.append(
            {
                "run": pair.get("run", 0),
                "index_a": pair["index_a"],
                "index_b": pair["index_b"],
                "prompt": pair["prompt"],
                "scores": scores,
            }
        )
    for m in metrics:  # standardise each metric's differences so that no scale dominates
        diffs = [r["scores"][m][0] - r["scores"][m][1] for r in rows]
        mean = sum(diffs) / len(diffs) if diffs else 0.0
        std = (sum((d - mean) ** 2 for d in diffs) / len(diffs)) ** 0.5 if diffs else 0.0
        for r, d in zip(rows, diffs):
            r.setdefault("advantage", 0.0)
            r["advantage"] += (d / std if std > 0 else 0.0) / len(metrics)
    rows.sort(key=lambda r: -r["advantage"])
    if len(rows) <= k:
        return rows
    if k <= 1:
        return rows[:k]
    picks = sorted({round(i * (len(rows) - 1) / (k - 1)) for i in range(k)})
    return [rows[i] for i in picks]


def _pct_ci(ci) -> str:
    lo, hi = ci
    return "" if lo != lo else f"[{100 * lo:.1f}, {100 * hi:.1f}]"


def _metric_table(summary: dict) -> str:
    a, b = html.escape(summary["label_a"]), html.escape(summary["label_b"])
    level = round(100 * summary.get("ci_level", stats.LEVEL))
    seeds = summary.get("n_seeds", 1)
    seed_head = "<th>between-seed sd of win rate A</th>" if seeds > 1 else ""
    # the labels go in a legend: long run names in every header would widen the table
    out = [
        f"<p class='legend'><b>A</b> = {a} &nbsp;&nbsp; <b>B</b> = {b}</p>",
        "<table class='metrics'><tr><th>metric</th><th>pairs</th>"
        "<th>mean A (sd)</th><th>mean B (sd)</th><th>wins A</th><th>wins B</th>"
        f"<th>ties</th><th>win rate A [{level}% CI]</th>"
        f"<th>mean diff A &minus; B [{level}% CI]</th><th>p sign test</th>"
        f"<th>p Wilcoxon</th><th>effect size d<sub>z</sub></th>{seed_head}</tr>",
    ]
    for m, s in summary["metrics"].items():
        pct = 100 * s["win_rate_a"]
        lo, hi = (100 * v for v in s.get("win_rate_ci", [math.nan, math.nan]))
        whisker = (
            f"<div class='ci' style='left:{lo:.1f}%;width:{max(hi - lo, 0.5):.1f}%'></div>"
            if lo == lo
            else ""
        )
        dlo, dhi = s.get("mean_diff_ci", [math.nan, math.nan])
        seed_cell = (
            f"<td>{100 * s.get('seed_sd_win_rate_a', 0.0):.1f} pts</td>" if seeds > 1 else ""
        )
        out.append(
            f"<tr><td>{html.escape(m)}</td><td>{s['n']}</td>"
            f"<td>{s['mean_a']:.4f} ({s.get('std_a', math.nan):.4f})</td>"
            f"<td>{s['mean_b']:.4f} ({s.get('std_b', math.nan):.4f})</td>"
            f"<td>{s['wins_a']}</td><td>{s['wins_b']}</td><td>{s['ties']}</td>"
            f"<td><div class='bar'><div class='fill' style='width:{pct:.1f}%'></div>{whisker}"
            f"<span>{pct:.1f}% {_pct_ci(s.get('win_rate_ci', [math.nan] * 2))}</span></div></td>"
            f"<td>{s.get('mean_diff', math.nan):+.4f} [{dlo:+.4f}, {dhi:+.4f}]</td>"
            f"<td>{stats.format_p(s.get('sign_test_p', math.nan))}</td>"
            f"<td>{stats.format_p(s.get('wilcoxon_p', math.nan))}</td>"
            f"<td>{s.get('effect_size_dz', math.nan):+.2f}</td>{seed_cell}</tr>"
        )
    out.append("</table>")
    ties = "ties count as losses for A" if summary.get("ties_as_loss_for_a") else "ties count 1/2"
    out.append(
        f"<p class='avg'>macro win rate of {a}: <b>{100 * summary['macro_win_rate_a']:.1f}%</b> "
        f"{_pct_ci(summary.get('macro_win_rate_a_ci', [math.nan] * 2))} &nbsp; "
        f"micro win rate of {a}: <b>{100 * summary['micro_win_rate_a']:.1f}%</b> "
        f"{_pct_ci(summary.get('micro_win_rate_a_ci', [math.nan] * 2))} &nbsp; "
        f"({summary['n_pairs']} pairs over {summary.get('n_prompts', '?')} prompts &times; "
        f"{seeds} seed(s), paired by {html.escape(summary['pairing'])}, {ties})</p>"
        f"<p class='note'>Intervals: {level}% percentile bootstrap over prompts "
        f"({summary.get('resamples', '?')} resamples, seed {summary.get('stats_seed', '?')}); "
        "with several seeds each prompt's outcome is first averaged over its seeds. p: two-sided "
        "paired tests over prompts (sign test of the prompts won vs lost; Wilcoxon signed-rank "
        "of the per-prompt score differences). d<sub>z</sub>: mean difference / sd of the "
        "differences. The sd in brackets after a mean is the spread of the scores over images, "
        "not an uncertainty of the mean.</p>"
    )
    return "\n".join(out)


def _provenance(summary: dict) -> str:
    """What was compared: one row per run of each side."""
    prov = summary.get("provenance") or {}
    keys = ["file", "base_model", "unet_path", "unet_sha256", "seed", "height", "width",
            "steps", "cfg", "scheduler", "dtype", "vae", "prompts_sha256"]  # fmt: skip
    rows = []
    for side, label in (("a", summary["label_a"]), ("b", summary["label_b"])):
        for run in prov.get(side, []):
            cells = []
            for k in keys:
                v = run.get(k, "")
                if k.endswith("sha256") and v:
                    v = str(v)[:12]
                cells.append(f"<td>{html.escape(str(v))}</td>")
            rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}</tr>")
    if not rows:
        return ""
    head = "".join(f"<th>{html.escape(k)}</th>" for k in ["system", *keys])
    return (
        "<h2>What was compared</h2><div class='scroll'><table class='prov'><tr>"
        + head
        + "</tr>"
        + "".join(rows)
        + "</table></div>"
    )


def _warnings(summary: dict) -> str:
    items = summary.get("warnings") or []
    if not items:
        return ""
    return (
        "<div class='warn'><b>Warnings</b><ul>"
        + "".join(f"<li>{html.escape(w)}</li>" for w in items)
        + "</ul></div>"
    )


def histogram_svg(diffs: list[float], title: str, bins: int = 20, w: int = 300, h: int = 140):
    """An inline SVG histogram of per-prompt differences with the zero line (no plotting lib)."""
    if not diffs:
        return ""
    lo, hi = min(diffs + [0.0]), max(diffs + [0.0])
    if hi == lo:
        hi = lo + 1.0
    counts = [0] * bins
    for d in diffs:
        counts[min(bins - 1, int((d - lo) / (hi - lo) * bins))] += 1
    top, pad, bw = max(counts), 18, w / bins
    bars = []
    for i, c in enumerate(counts):
        bh = (h - 2 * pad) * c / top
        color = "#8fcf8f" if lo + (i + 0.5) * (hi - lo) / bins > 0 else "#f3a6a6"
        bars.append(
            f"<rect x='{i * bw:.1f}' y='{h - pad - bh:.1f}' width='{bw - 1:.1f}' "
            f"height='{bh:.1f}' fill='{color}'><title>{c}</title></rect>"
        )
    zx = (0.0 - lo) / (hi - lo) * w
    return (
        f"<figure class='hist'><svg width='{w}' height='{h}' role='img'>"
        + "".join(bars)
        + f"<line x1='{zx:.1f}' x2='{zx:.1f}' y1='0' y2='{h - pad}' stroke='#333' "
        "stroke-dasharray='3,2'/>"
        f"<text x='0' y='{h - 4}' font-size='10'>{lo:.3g}</text>"
        f"<text x='{w}' y='{h - 4}' font-size='10' text-anchor='end'>{hi:.3g}</text>"
        f"<text x='{zx:.1f}' y='10' font-size='10' text-anchor='middle'>0</text></svg>"
        f"<figcaption>{html.escape(title)}</figcaption></figure>"
    )


def _histograms(summary: dict, pair_files: dict[str, dict]) -> str:
    a, b = summary["label_a"], summary["label_b"]
    figs = []
    for m, pf in pair_files.items():
        per_unit: dict[tuple, list[float]] = {}
        seen: dict[tuple, int] = {}
        for p in pf["pairs"]:  # pool seeds per prompt occurrence, as the statistics do
            key = (p.get("run", 0), p["prompt"])
            seen[key] = seen.get(key, -1) + 1
            per_unit.setdefault((p["prompt"], seen[key]), []).append(p["score_a"] - p["score_b"])
        diffs = [sum(v) / len(v) for v in per_unit.values()]
        figs.append(histogram_svg(diffs, f"{m}: {a} − {b} per prompt (n={len(diffs)})"))
    return (
        "<h2>Per-prompt score differences</h2><p class='note'>Right of the dashed line (green): "
        f"prompts where {html.escape(a)} scores higher; left (red): {html.escape(b)}.</p>"
        + "".join(figs)
    )


def _score_list(scores: dict, side: int) -> str:
    items = []
    for m, (sa, sb) in scores.items():
        mine, other = (sa, sb) if side == 0 else (sb, sa)
        cls = " class='win'" if mine > other else ""
        items.append(f"<li{cls}>{html.escape(m)}: {mine:.4f}</li>")
    return "<ul>" + "".join(items) + "</ul>"


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;background:#fafafa;color:#222}
table.metrics{border-collapse:collapse;margin-bottom:.5em}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:4px 10px;text-align:right}
.bar{position:relative;width:200px;height:22px;background:#f3c6c6}
.fill{position:absolute;left:0;top:0;bottom:0;background:#8fcf8f}
.bar span{position:relative;font-size:12px;padding-left:4px;white-space:nowrap}
.card{display:inline-block;vertical-align:top;margin:8px;padding:8px;background:#fff;
border:1px solid #ddd;border-radius:6px;max-width:600px}
.card p{margin:4px 0 8px 0;font-size:14px}
.side{display:inline-block;vertical-align:top;margin-right:8px;text-align:center;width:270px;
overflow-wrap:anywhere}
.side ul{list-style:none;padding:0;margin:4px 0;font-size:12px;text-align:left}
.win{font-weight:bold;color:#1a7f1a}
.ci{position:absolute;bottom:0;height:4px;background:#335}
.legend{font-size:15px}
.scroll{overflow-x:auto;max-width:100%}
.note{font-size:13px;color:#555;max-width:1100px}
table.prov{border-collapse:collapse;font-size:12px}
table.prov td,table.prov th{border:1px solid #ddd;padding:2px 6px;text-align:left}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 12px;margin:1em 0;max-width:1100px}
figure.hist{display:inline-block;margin:6px 12px 6px 0}
figure.hist figcaption{font-size:12px}
"""


def render_html(
    summary: dict, samples: list[dict], images_a: list, images_b: list, pair_files=None
) -> str:
    a, b = html.escape(summary["label_a"]), html.escape(summary["label_b"])
    cards = []
    for s, ia, ib in zip(samples, images_a, images_b):
        seed = f" <small>(seed run {s['run']})</small>" if summary.get("n_seeds", 1) > 1 else ""
        cards.append(
            "<div class='card'>"
            f"<p>{html.escape(s['prompt'])}{seed}</p>"
            f"<div class='side'><b>{a}</b><br><img src='{_data_uri(ia)}' alt='{a}'>{_score_list(s['scores'], 0)}</div>"
            f"<div class='side'><b>{b}</b><br><img src='{_data_uri(ib)}' alt='{b}'>{_score_list(s['scores'], 1)}</div>"
            "</div>"
        )
    rule = (
        f"<p class='note'>Ordering: every pair gets A's advantage = the mean over the metrics of "
        "the score difference A &minus; B divided by that metric's sd of differences; pairs are "
        f"sorted from the largest advantage (most in favour of {a}) to the smallest (most in "
        f"favour of {b}) and {len(samples)} are taken at evenly spaced ranks, so the first cards "
        "are clear wins of A, the middle close calls, the last clear wins of B. Higher score of "
        "each metric in bold green.</p>"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{a} vs {b}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{a} vs {b}</h1>\n{_warnings(summary)}\n{_metric_table(summary)}\n"
        + (_histograms(summary, pair_files) if pair_files else "")
        + f"\n{_provenance(summary)}\n"
        f"<h2>Side by side ({len(samples)} prompts, from most in favour of {a} to most in favour of {b})</h2>\n"
        + rule
        + "\n".join(cards)
        + "\n</body></html>\n"
    )


def render_grid(
    samples: list[dict],
    images_a: list,
    images_b: list,
    label_a: str,
    label_b: str,
    thumb: int,
    title: str = "",
):
    """PIL image: the title (naming A and B, wrapped), a header row A | B, then one row per
    prompt (A | B | prompt text and each metric's two scores, A's compared with B's)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    text_w, pad, head = 340, 6, 28
    width = 2 * thumb + text_w + 4 * pad
    # the title (which names A and B) wrapped to the canvas; the columns are headed A and B
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title_lines: list[str] = []
    for word in title.split():
        trial = f"{title_lines[-1]} {word}" if title_lines else word
        if title_lines and probe.textlength(trial, font=font) <= width - 2 * pad:
            title_lines[-1] = trial
        else:
            title_lines.append(word)
    top = 8 + 18 * len(title_lines) if title_lines else 0
    height = top + head + len(samples) * (thumb + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title_lines:
        draw.multiline_text((pad, 6), "\n".join(title_lines), fill="black", font=font, spacing=4)
    draw.text((pad, top + 6), "A", fill="black", font=font)
    draw.text((2 * pad + thumb, top + 6), "B", fill="black", font=font)
    line_h = 17
    for row, (s, ia, ib) in enumerate(zip(samples, images_a, images_b)):
        y = top + head + row * (thumb + pad)
        canvas.paste(ia, (pad, y))
        canvas.paste(ib, (2 * pad + thumb, y))
        score_lines = [
            f"{m}: {sa:.4f} {'>' if sa > sb else ('<' if sa < sb else '=')} {sb:.4f}"
            for m, (sa, sb) in s["scores"].items()
        ]
        wins = sum(sa > sb for sa, sb in s["scores"].values())
        room = max(1, thumb // line_h - len(score_lines) - 1)
        lines = textwrap.wrap(s["prompt"], 42)[:room]
        lines += [f"A higher on {wins}/{len(s['scores'])} metrics", *score_lines]
        draw.multiline_text((3 * pad + 2 * thumb, y), "\n".join(lines), fill="black", font=font)
    return canvas


def grid_title(summary: dict) -> str:
    lo, hi = summary.get("macro_win_rate_a_ci", [math.nan, math.nan])
    ci = f" [{100 * lo:.1f}, {100 * hi:.1f}]" if lo == lo else ""
    return (
        f"A = {summary['label_a']} vs B = {summary['label_b']}: macro win rate of A "
        f"{100 * summary['macro_win_rate_a']:.1f}%{ci}, {summary['n_pairs']} pairs"
    )


def _runs(paths: list[str]) -> list[tuple[list[dict], Path]]:
    return [_records(p) for p in paths]


def write_report(cfg: ReportConfig) -> tuple[Path, Path]:
    """Write report.html and grid.png; return their paths."""
    from PIL import Image

    cdir = Path(cfg.compare_dir)
    summary_file = cdir / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file} not found (run eval.compare first)")
    summary = json.loads(summary_file.read_text())
    pair_files = {m: json.loads((cdir / f"{m}.json").read_text()) for m in summary["metrics"]}
    runs_a, runs_b = _runs(cfg.json_a), _runs(cfg.json_b)

    def thumbnail(s, side):
        records, base = (runs_a if side == 0 else runs_b)[s.get("run", 0)]
        rec = records[s["index_a"] if side == 0 else s["index_b"]]
        found = rec.get("image_file")  # resolved by eval.score (official path conventions too)
        path = Path(found) if found and Path(found).is_file() else _image_path(base, rec["image"])
        return _thumbnail(path, cfg.thumb)

    samples = select_samples(pair_files, cfg.num_samples)
    thumbs_a = [thumbnail(s, 0) for s in samples]
    thumbs_b = [thumbnail(s, 1) for s in samples]

    out_html = Path(cfg.out_html) if cfg.out_html else cdir / "report.html"
    out_png = Path(cfg.out_png) if cfg.out_png else cdir / "grid.png"
    page = render_html(summary, samples, thumbs_a, thumbs_b, pair_files)
    sdpo_io.write_text(out_html, page)

    # the grid shows the same spread, fewer rows; thumbnails padded to squares for alignment
    rows = select_samples(pair_files, cfg.grid_rows)
    idx = {(s["run"], s["index_a"], s["index_b"]): n for n, s in enumerate(samples)}

    def square(im):
        sq = Image.new("RGB", (cfg.thumb, cfg.thumb), "white")
        sq.paste(im, ((cfg.thumb - im.width) // 2, (cfg.thumb - im.height) // 2))
        return sq

    def thumb_of(s, side):
        n = idx.get((s["run"], s["index_a"], s["index_b"]))
        if n is not None:
            return square((thumbs_a if side == 0 else thumbs_b)[n])
        return square(thumbnail(s, side))

    grid = render_grid(
        rows,
        [thumb_of(s, 0) for s in rows],
        [thumb_of(s, 1) for s in rows],
        summary["label_a"],
        summary["label_b"],
        cfg.thumb,
        title=grid_title(summary),
    )
    sdpo_io.save_image(grid, out_png, format="PNG")
    return out_html, out_png


def parse_args(argv=None) -> ReportConfig:
    return parse(
        ReportConfig, argv, prog="python -m eval.report", description=__doc__.split("\n")[0]
    )


def main(cfg: ReportConfig) -> tuple[Path, Path]:
    paths = write_report(cfg)
    print("report:", *[str(p) for p in paths])
    return paths


if __name__ == "__main__":
    _cfg = parse_args()
    try:
        main(_cfg)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
