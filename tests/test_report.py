"""The A/B report renders: HTML parses, every embedded image decodes, the PNG grid exists."""

from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import eval.scorers
from eval import compare, report, score

METRICS = ["pickscore", "hpsv2", "clip", "aesthetics", "imagereward"]


class _Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.tags, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs))

    def handle_data(self, data):
        self.text.append(data)


def _scored_manifest(folder: Path, prompts: list[str], seed: int, color_shift: int) -> Path:
    """Manifest + 32 px PNGs + a complete scores file (as eval.score would write it)."""
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True)
    entries, records = [], []
    for i, p in enumerate(prompts):
        px = np.clip(rng.integers(0, 200, (32, 40, 3)) + color_shift, 0, 255).astype(np.uint8)
        rel = f"imgs/{i}_32x40.png"
        Image.fromarray(px).save(folder / rel)
        entries.append({"prompt": p, "gen_image_path": rel, "raw_image_path": "", "metadata": {}})
        rec = {"index": i, "prompt": p, "image": rel, "image_sha1": score._sha1(folder / rel)}
        rec.update({m: float(rng.normal()) for m in METRICS})
        records.append(rec)
    manifest = folder / "set_seed0_32x40_1s_5cfg.json"
    manifest.write_text(json.dumps(entries))
    score.write_scores(score.scores_path(manifest), records)
    return manifest


@pytest.fixture
def ab(tmp_path, monkeypatch):
    def no_models(*args, **kwargs):
        raise AssertionError("all scores are cached: no scorer may be built")

    monkeypatch.setattr(eval.scorers, "get_scorer", no_models)
    prompts = [f"prompt number {i} <b>&</b>" for i in range(12)]
    a = _scored_manifest(tmp_path / "A", prompts, seed=0, color_shift=0)
    b = _scored_manifest(tmp_path / "B", prompts[::-1], seed=1, color_shift=50)
    return a, b


def test_compare_writes_report_that_parses_and_embeds_decodable_images(ab, tmp_path):
    a, b = ab
    out = tmp_path / "cmp"
    cfg = compare.parse_args(
        [
            "--json_a",
            str(a),
            "--json_b",
            str(b),
            "--label_a",
            "base",
            "--label_b",
            "sdpo",
            "--outdir",
            str(out),
            "--num_samples",
            "5",
        ]
    )
    summary = compare.main(cfg)  # manifests given: cached scores are reused, nothing recomputed
    html_file, png_file = out / "report.html", out / "grid.png"
    page = html_file.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(page)
    parser.close()
    assert parser.tags[:2] == ["html", "head"] and "table" in parser.tags
    text = "".join(parser.text)
    assert text.count(" <b>&</b>") == 5  # the 5 sampled prompts, shown as text (escaped)
    assert f"{100 * summary['macro_win_rate_a']:.1f}%" in text
    lo, hi = summary["macro_win_rate_a_ci"]
    assert f"[{100 * lo:.1f}, {100 * hi:.1f}]" in text  # the interval is shown with the average
    # what was compared, how the cards are ordered, one histogram of differences per metric
    assert "What was compared" in text and str(a.resolve()) in text and str(b.resolve()) in text
    assert "Ordering:" in text and "evenly spaced ranks" in text
    assert page.count("<figure class='hist'>") == len(METRICS)
    assert "p Wilcoxon" in text and "95% CI" in text
    for m in METRICS:
        assert f"{100 * summary['metrics'][m]['win_rate_a']:.1f}%" in text
    # 5 sampled prompts x (A, B); each image is embedded and decodes to a thumbnail
    assert len(parser.imgs) == 10
    for img in parser.imgs:
        src = img["src"]
        assert src.startswith("data:image/jpeg;base64,")
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as im:
            im.load()
            assert max(im.size) == 256
    with Image.open(png_file) as grid:
        grid.load()
        assert grid.width > 2 * 256 and grid.height > 8 * 256  # header + 8 rows of thumbnails


def test_report_sample_spans_best_to_worst(ab, tmp_path):
    a, b = ab
    out = tmp_path / "cmp"
    compare.main(
        compare.parse_args(
            ["--json_a", str(a), "--json_b", str(b), "--outdir", str(out), "--no_report"]
        )
    )
    pair_files = {m: json.loads((out / f"{m}.json").read_text()) for m in METRICS}
    picked = report.select_samples(pair_files, 4)
    every = report.select_samples(pair_files, 100)
    assert len(every) == 12 and len(picked) == 4
    # sorted by A's advantage; the sample keeps both extremes
    adv = [r["advantage"] for r in every]
    assert adv == sorted(adv, reverse=True)
    assert picked[0]["advantage"] == adv[0] and picked[-1]["advantage"] == adv[-1]
    # re-render from the CLI with other paths and sizes
    paths = report.main(
        report.parse_args(
            [
                "--json_a",
                str(a),
                "--json_b",
                str(b),
                "--compare_dir",
                str(out),
                "--thumb",
                "64",
                "--grid_rows",
                "3",
                "--out_html",
                str(tmp_path / "r.html"),
            ]
        )
    )
    assert paths[0] == tmp_path / "r.html" and paths[1].is_file()
    with Image.open(paths[1]) as grid:
        rows = 28 + 3 * (64 + 6) + 6  # the A | B header and 3 rows
        assert grid.height - rows in (26, 44, 62)  # above them the title, 1 to 3 lines


def test_test_vs_script_end_to_end_on_cached_scores(ab, tmp_path):
    import os
    import subprocess
    import sys

    a, b = ab
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "vs"
    env = {**os.environ, "PYTHON": sys.executable}
    # the scorer weights point nowhere: the run must not need them (every score is cached)
    env["SDPO_PICKSCORE_MODEL"] = str(tmp_path / "absent")
    done = subprocess.run(
        [
            "bash",
            str(root / "scripts/eval/test_vs.sh"),
            "--json_a",
            str(a),
            "--json_b",
            str(b),
            "--label_a",
            "A1",
            "--label_b",
            "B1",
            "--device",
            "cpu",
            "--batch_size",
            "2",
            "--outdir",
            str(out),
            "--metrics",
            "pickscore,clip",
            "--num_samples",
            "3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "macro win rate A1" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["metrics"]) == ["pickscore", "clip"] and summary["n_pairs"] == 12
    assert (out / "report.html").is_file() and (out / "grid.png").is_file()
    bad = subprocess.run(
        ["bash", str(root / "scripts/eval/test_vs.sh"), "--json_a", str(a)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "--json_b are required" in bad.stderr
