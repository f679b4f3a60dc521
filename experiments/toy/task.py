"""The toy's synthetic preference task: coloured shapes, a clean winner and a degraded loser per
pair, written and read as Pick-a-Pic parquet (``jpg_0``, ``jpg_1``, ``label_0``, ``caption``)."""

from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np

from sdpo import io as sdpo_io

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle")
SUPERSAMPLE = 4  # draw at 4x and downsample: anti-aliased edges at 16 px


def caption_of(colour: str, shape: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def draw_scene(
    colour: str, shape: str, background: str, centre: tuple[float, float], radius: float, size: int
):
    """One RGB PIL image ``size``x``size``: a filled shape on a plain background.

    ``centre`` and ``radius`` are fractions of the image side.
    """
    from PIL import Image, ImageDraw

    big = size * SUPERSAMPLE
    img = Image.new("RGB", (big, big), COLOURS[background])
    draw = ImageDraw.Draw(img)
    cx, cy, r = centre[0] * big, centre[1] * big, radius * big
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _jpeg_bytes(img) -> bytes:
    # Full-resolution chroma (subsampling=0): 4:2:0 would smear the colours of a 16-px image.
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


LOSER_KINDS = ("wrong_colour", "wrong_shape", "noisy", "blurry")
# Quality defects by default: with caption mismatches, the tiny random text encoder leaves the
# preference almost unlearnable on held-out pairs in 100 steps (margin ~0), see docs/toy.md.
DEFAULT_LOSER_KINDS = ("noisy", "blurry")


def _degrade(img, kind: str, rng: random.Random):
    """The same picture, worse: pixel noise (std 0.2 of the range) or a Gaussian blur."""
    from PIL import Image, ImageFilter

    if kind == "blurry":
        return img.filter(ImageFilter.GaussianBlur(radius=1.0))
    a = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 0.2 * 255, a.shape)
    return Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8))


def make_pairs(
    n_pairs: int, *, size: int, seed: int, loser_kinds: tuple[str, ...] = DEFAULT_LOSER_KINDS
) -> list[dict]:
    """``n_pairs`` preference pairs in the Pick-a-Pic schema, drawn from ``random.Random(seed)``.

    Winner: the caption's scene, clean. Loser: the same layout made worse in one way
    (``loser_kind``, drawn from ``loser_kinds``): the shape's colour or the shape itself does
    not match the caption, or the picture is noisy or blurry. Which of ``jpg_0`` / ``jpg_1``
    wins is random, as in Pick-a-Pic (``label_0`` 1: jpg_0 won, 0: jpg_1 won).
    """
    unknown = set(loser_kinds) - set(LOSER_KINDS)
    if unknown or not loser_kinds:
        raise ValueError(
            f"loser_kinds must be a non-empty subset of {LOSER_KINDS}; got {loser_kinds}"
        )
    rng = random.Random(seed)
    names = list(COLOURS)
    rows = []
    for _ in range(n_pairs):
        background = rng.choice(names)
        colour = rng.choice([c for c in names if c != background])
        shape = rng.choice(SHAPES)
        centre = (rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65))
        radius = rng.uniform(0.22, 0.32)
        kind = rng.choice(loser_kinds)
        winner = draw_scene(colour, shape, background, centre, radius, size)
        if kind == "wrong_colour":
            bad = rng.choice([c for c in names if c not in (background, colour)])
            loser = draw_scene(bad, shape, background, centre, radius, size)
        elif kind == "wrong_shape":
            bad = rng.choice([s for s in SHAPES if s != shape])
            loser = draw_scene(colour, bad, background, centre, radius, size)
        else:
            loser = _degrade(winner, kind, rng)
        winner_first = rng.random() < 0.5
        a, b = (winner, loser) if winner_first else (loser, winner)
        rows.append(
            {
                "caption": caption_of(colour, shape, background),
                "jpg_0": _jpeg_bytes(a),
                "jpg_1": _jpeg_bytes(b),
                "label_0": 1.0 if winner_first else 0.0,
                "label_1": 0.0 if winner_first else 1.0,
                "loser_kind": kind,
            }
        )
    return rows


def write_parquet(rows: list[dict], path: Path) -> Path:
    """Write rows atomically as one parquet file."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    return sdpo_io.atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def load_pairs(folder: Path) -> list[dict]:
    """Read every parquet in ``folder`` (sorted) back as row dicts."""
    import pandas as pd

    files = sorted(Path(folder).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}")
    return pd.concat([pd.read_parquet(f) for f in files]).to_dict("records")


def winner_loser_arrays(rows: list[dict]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode pairs to winner-first float arrays ``[N, 3, H, W]`` in [-1, 1] and the captions."""
    from PIL import Image

    def decode(b: bytes) -> np.ndarray:
        a = np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.float32)
        return a.transpose(2, 0, 1) / 127.5 - 1.0

    winners, losers, captions = [], [], []
    for r in rows:
        if r["label_0"] == 0.5:
            continue
        w, lo = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        winners.append(decode(w))
        losers.append(decode(lo))
        captions.append(r["caption"])
    return np.stack(winners), np.stack(losers), captions
