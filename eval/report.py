"""A picture report of an A/B comparison: a self-contained HTML page and a PNG grid.

    python -m eval.report --json_a A.json --json_b B.json --compare_dir D [--num_samples 16]

``D`` is the output folder of ``eval.compare`` (``summary.json`` and ``<metric>.json``). Writes
``D/report.html`` and ``D/grid.png``:

* the metric table (means, wins, ties, win rate of A as a bar) with macro / micro averages;
* for a sample of prompts, the A and B images side by side with their per-image scores (the
  higher one of each metric in bold). The sample is spread over the whole range of the pairs
  sorted by A's advantage (mean over metrics of the per-metric standardised score difference):
  the first cards are where A is most clearly better, the last where B is, the middle close calls.

Images are embedded as base64 JPEG thumbnails, so the page is one file that can be mailed or
archived without the image folders, and it still shows every picture if those move; at the
default 256 px a 16-prompt page is about 1 MB.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
from dataclasses import dataclass
from pathlib import Path

from eval.score import read_scores, scores_path


@dataclass
class ReportConfig:
    json_a: str = ""  # manifest JSON or .scores.jsonl of A (images resolve beside it)
    json_b: str = ""  # manifest JSON or .scores.jsonl of B
    compare_dir: str = ""  # eval.compare output folder (summary.json, <metric>.json)
    num_samples: int = 16  # prompts shown side by side in the HTML
    grid_rows: int = 8  # prompts in the PNG grid
    thumb: int = 256  # thumbnail edge in pixels
    out_html: str | None = None  # default <compare_dir>/report.html
    out_png: str | None = None  # default <compare_dir>/grid.png


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

    Returns dicts ``{index_a, index_b, prompt, advantage, scores: {metric: (a, b)}}``.
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


def _metric_table(summary: dict) -> str:
    a, b = html.escape(summary["label_a"]), html.escape(summary["label_b"])
    out = [
        "<table class='metrics'><tr><th>metric</th><th>pairs</th>"
        f"<th>mean {a}</th><th>mean {b}</th><th>wins {a}</th><th>wins {b}</th><th>ties</th>"
        f"<th>win rate {a}</th></tr>"
    ]
    for m, s in summary["metrics"].items():
        pct = 100 * s["win_rate_a"]
        out.append(
            f"<tr><td>{html.escape(m)}</td><td>{s['n']}</td><td>{s['mean_a']:.4f}</td>"
            f"<td>{s['mean_b']:.4f}</td><td>{s['wins_a']}</td><td>{s['wins_b']}</td><td>{s['ties']}</td>"
            f"<td><div class='bar'><div class='fill' style='width:{pct:.1f}%'></div>"
            f"<span>{pct:.1f}%</span></div></td></tr>"
        )
    out.append("</table>")
    out.append(
        f"<p class='avg'>macro win rate of {a}: <b>{100 * summary['macro_win_rate_a']:.1f}%</b> &nbsp; "
        f"micro win rate of {a}: <b>{100 * summary['micro_win_rate_a']:.1f}%</b> &nbsp; "
        f"({summary['n_pairs']} pairs, paired by {html.escape(summary['pairing'])})</p>"
    )
    return "\n".join(out)


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
.bar{position:relative;width:180px;height:18px;background:#f3c6c6}
.fill{position:absolute;left:0;top:0;bottom:0;background:#8fcf8f}
.bar span{position:relative;font-size:12px;padding-left:4px}
.card{display:inline-block;vertical-align:top;margin:8px;padding:8px;background:#fff;
border:1px solid #ddd;border-radius:6px;max-width:560px}
.card p{margin:4px 0 8px 0;font-size:14px}
.side{display:inline-block;vertical-align:top;margin-right:8px;text-align:center}
.side ul{list-style:none;padding:0;margin:4px 0;font-size:12px;text-align:left}
.win{font-weight:bold;color:#1a7f1a}
"""


def render_html(summary: dict, samples: list[dict], images_a: list, images_b: list) -> str:
    a, b = html.escape(summary["label_a"]), html.escape(summary["label_b"])
    cards = []
    for s, ia, ib in zip(samples, images_a, images_b):
        cards.append(
            "<div class='card'>"
            f"<p>{html.escape(s['prompt'])}</p>"
            f"<div class='side'><b>{a}</b><br><img src='{_data_uri(ia)}' alt='{a}'>{_score_list(s['scores'], 0)}</div>"
            f"<div class='side'><b>{b}</b><br><img src='{_data_uri(ib)}' alt='{b}'>{_score_list(s['scores'], 1)}</div>"
            "</div>"
        )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{a} vs {b}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{a} vs {b}</h1>\n{_metric_table(summary)}\n"
        f"<h2>Side by side ({len(samples)} prompts, from most in favour of {a} to most in favour of {b})</h2>\n"
        + "\n".join(cards)
        + "\n</body></html>\n"
    )


def render_grid(
    samples: list[dict], images_a: list, images_b: list, label_a: str, label_b: str, thumb: int
):
    """PIL image: a header row with the labels, then one row per prompt (A | B | prompt text)."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=14)
    except TypeError:  # Pillow < 10.1 has no sized default font
        font = ImageFont.load_default()
    text_w, pad, head = 300, 6, 28
    width = 2 * thumb + text_w + 4 * pad
    height = head + len(samples) * (thumb + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 6), label_a, fill="black", font=font)
    draw.text((2 * pad + thumb, 6), label_b, fill="black", font=font)
    for row, (s, ia, ib) in enumerate(zip(samples, images_a, images_b)):
        y = head + row * (thumb + pad)
        canvas.paste(ia, (pad, y))
        canvas.paste(ib, (2 * pad + thumb, y))
        wins = sum(sa > sb for sa, sb in s["scores"].values())
        lines = textwrap.wrap(s["prompt"], 40)[: max(1, thumb // 18 - 2)]
        lines.append(f"{label_a} higher on {wins}/{len(s['scores'])} metrics")
        draw.multiline_text((3 * pad + 2 * thumb, y), "\n".join(lines), fill="black", font=font)
    return canvas


def write_report(cfg: ReportConfig) -> tuple[Path, Path]:
    """Write report.html and grid.png; return their paths."""
    from PIL import Image

    cdir = Path(cfg.compare_dir)
    summary_file = cdir / "summary.json"
    if not summary_file.is_file():
        raise FileNotFoundError(f"{summary_file} not found (run eval.compare first)")
    summary = json.loads(summary_file.read_text())
    pair_files = {m: json.loads((cdir / f"{m}.json").read_text()) for m in summary["metrics"]}
    records_a, base_a = _records(cfg.json_a)
    records_b, base_b = _records(cfg.json_b)
    samples = select_samples(pair_files, cfg.num_samples)
    thumbs_a = [
        _thumbnail(_image_path(base_a, records_a[s["index_a"]]["image"]), cfg.thumb)
        for s in samples
    ]
    thumbs_b = [
        _thumbnail(_image_path(base_b, records_b[s["index_b"]]["image"]), cfg.thumb)
        for s in samples
    ]

    out_html = Path(cfg.out_html) if cfg.out_html else cdir / "report.html"
    out_png = Path(cfg.out_png) if cfg.out_png else cdir / "grid.png"
    page = render_html(summary, samples, thumbs_a, thumbs_b)
    tmp = out_html.with_name(f".{out_html.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out_html)

    # the grid shows the same spread, fewer rows; thumbnails padded to squares for alignment
    rows = select_samples(pair_files, cfg.grid_rows)
    idx = {(s["index_a"], s["index_b"]): n for n, s in enumerate(samples)}

    def square(im):
        sq = Image.new("RGB", (cfg.thumb, cfg.thumb), "white")
        sq.paste(im, ((cfg.thumb - im.width) // 2, (cfg.thumb - im.height) // 2))
        return sq

    def thumb_of(s, side):
        n = idx.get((s["index_a"], s["index_b"]))
        if n is not None:
            return square((thumbs_a if side == 0 else thumbs_b)[n])
        rec, base = (
            (records_a[s["index_a"]], base_a) if side == 0 else (records_b[s["index_b"]], base_b)
        )
        return square(_thumbnail(_image_path(base, rec["image"]), cfg.thumb))

    grid = render_grid(
        rows,
        [thumb_of(s, 0) for s in rows],
        [thumb_of(s, 1) for s in rows],
        summary["label_a"],
        summary["label_b"],
        cfg.thumb,
    )
    tmp_png = out_png.with_name(f".{out_png.name}.tmp.png")
    grid.save(tmp_png)
    tmp_png.replace(out_png)
    return out_html, out_png


def parse_args(argv=None) -> ReportConfig:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--json_a", required=True, help="manifest JSON or .scores.jsonl of A")
    parser.add_argument("--json_b", required=True, help="manifest JSON or .scores.jsonl of B")
    parser.add_argument("--compare_dir", required=True, help="eval.compare output folder")
    parser.add_argument("--num_samples", type=int, default=16, help="prompts in the HTML page")
    parser.add_argument("--grid_rows", type=int, default=8, help="prompts in the PNG grid")
    parser.add_argument("--thumb", type=int, default=256, help="thumbnail edge (px)")
    parser.add_argument("--out_html", default=None, help="HTML path (default compare_dir)")
    parser.add_argument("--out_png", default=None, help="PNG path (default compare_dir)")
    a = parser.parse_args(argv)
    return ReportConfig(
        a.json_a,
        a.json_b,
        a.compare_dir,
        a.num_samples,
        a.grid_rows,
        a.thumb,
        a.out_html,
        a.out_png,
    )


def main(cfg: ReportConfig) -> tuple[Path, Path]:
    paths = write_report(cfg)
    print("report:", *[str(p) for p in paths])
    return paths


if __name__ == "__main__":
    main(parse_args())
