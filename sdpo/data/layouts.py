"""Preference data layouts: every supported table shape becomes Pick-a-Pic-schema pairs.

Training reads one row shape (:mod:`sdpo.data.pairs`): ``jpg_0``, ``jpg_1`` (undecoded images:
bytes, ``{"bytes", "path"}`` or a file path), ``label_0`` (1: ``jpg_0`` won, 0: ``jpg_1`` won,
0.5: tie) and ``caption``; ``model_0`` / ``model_1`` when the source names the generators. Each
layout of :data:`LAYOUTS` maps its own columns onto that shape, using only column operations
(rename, select, a computed label) except the ranked layout, which must expand one row into
several pairs. Which columns play which role comes from a mapping flag or, when the flag is not
given, from the first of a few conventional names found (the names of the public sets listed
in docs/data.md). A role that cannot be found is ONE error that lists the columns the data has
and the flag that maps the role, raised before any image is decoded or any model loads.

Layouts (``--data_layout``; ``auto`` picks the one layout whose columns are all present, or
Pick-a-Pic when it is one of several, and says so in the log):

* ``pickapic``: two images and ``label_0`` (``yuvalkirstain/pickapic_v2``);
* ``chosen_rejected``: a preferred and a rejected image column and a prompt;
* ``scores``: two images with a preference score each (votes, probabilities); the higher one
  wins, pairs whose gap is ``<= --score_tie_threshold`` are dropped as ties;
* ``ranked``: a list of images per prompt with a rank list (lower is better) or a score list
  (higher is better); ``--pair_mode best_worst`` (one pair per row) or ``all`` (every pair whose
  gap exceeds the threshold);
* ``images``: one image and a caption per row: supervised fine-tuning only (``--train_method sft``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_LAYOUT = "pickapic"  # first in LAYOUTS: detection prefers it when it fits
PAIR_MODES = ("best_worst", "all")


class DataLayoutError(ValueError):
    """The data does not have the columns the chosen layout needs (one message, flags named)."""


@dataclass(frozen=True)
class Role:
    """One column a layout needs: the flag that maps it and the conventional names tried."""

    flag: str
    candidates: tuple[str, ...]
    required: bool = True


@dataclass(frozen=True)
class Layout:
    name: str
    roles: dict[str, Role]
    paired: bool = True  # False: one image per row (SFT only)
    # Groups of roles of which exactly one must be present (ranked: ranks OR scores).
    one_of: tuple[tuple[str, ...], ...] = ()
    models: tuple[str, str] | None = None  # roles naming the generator of image 0 / image 1
    doc: str = ""


CAPTION = Role("caption_column", ("caption", "prompt", "text"))

LAYOUTS: dict[str, Layout] = {
    "pickapic": Layout(
        "pickapic",
        {
            "image_0": Role("image_0_column", ("jpg_0",)),
            "image_1": Role("image_1_column", ("jpg_1",)),
            "label": Role("label_column", ("label_0",)),
            "caption": CAPTION,
            "model_0": Role("model_0_column", ("model_0",), required=False),
            "model_1": Role("model_1_column", ("model_1",), required=False),
        },
        models=("model_0", "model_1"),
        doc="jpg_0, jpg_1, label_0 (1: jpg_0 won, 0: jpg_1 won, 0.5: tie), caption",
    ),
    "chosen_rejected": Layout(
        "chosen_rejected",
        {
            "chosen": Role("chosen_column", ("chosen", "image_chosen", "chosen_image")),
            "rejected": Role("rejected_column", ("rejected", "image_rejected", "rejected_image")),
            "caption": CAPTION,
            "model_0": Role("model_0_column", ("chosen_model",), required=False),
            "model_1": Role("model_1_column", ("rejected_model",), required=False),
        },
        models=("model_0", "model_1"),
        doc="a preferred image, a rejected image, a prompt",
    ),
    "scores": Layout(
        "scores",
        {
            "image_0": Role("image_0_column", ("image1", "image_0", "image_left", "jpg_0")),
            "image_1": Role("image_1_column", ("image2", "image_1", "image_right", "jpg_1")),
            "score_0": Role("score_0_column", ("votes_image1", "score_0", "score1", "score_left")),
            "score_1": Role("score_1_column", ("votes_image2", "score_1", "score2", "score_right")),
            "caption": CAPTION,
            "model_0": Role("model_0_column", ("model1", "model_0"), required=False),
            "model_1": Role("model_1_column", ("model2", "model_1"), required=False),
        },
        models=("model_0", "model_1"),
        doc="two images with a preference score (votes, probability) each",
    ),
    "ranked": Layout(
        "ranked",
        {
            "images": Role("images_column", ("image_path", "file_path", "images", "image_paths")),
            "ranks": Role("ranks_column", ("rank", "ranks"), required=False),
            "scores": Role(
                "scores_column", ("human_preference", "scores", "rewards"), required=False
            ),
            "caption": CAPTION,
        },
        one_of=(("ranks", "scores"),),
        doc="a list of images per prompt with a rank list (lower is better) or a score list",
    ),
    "images": Layout(
        "images",
        {"image": Role("image_column", ("image", "file_name", "img")), "caption": CAPTION},
        paired=False,
        doc="one image and its caption per row (SFT only)",
    ),
}
LAYOUT_CHOICES = (AUTO, *LAYOUTS)


@dataclass(frozen=True)
class ColumnMap:
    """The data flags that choose a layout and map its columns (None: conventional names)."""

    data_layout: str = AUTO
    columns: dict[str, str] = field(default_factory=dict)  # flag name -> column
    pair_mode: str = "best_worst"
    score_tie_threshold: float = 0.0


def mapping_flags() -> list[str]:
    """Every column-mapping flag of every layout, in a stable order."""
    return list(dict.fromkeys(r.flag for lay in LAYOUTS.values() for r in lay.roles.values()))


def _resolve(layout: Layout, names: list[str], columns: dict[str, str]):
    """``(role -> column, [missing role descriptions])`` for ``layout`` on a table's ``names``."""
    found, missing = {}, []
    for role, spec in layout.roles.items():
        given = columns.get(spec.flag)
        if given is not None:
            if given in names:
                found[role] = given
            else:
                missing.append(f"--{spec.flag} {given!r} (not a column)")
            continue
        hit = next((c for c in spec.candidates if c in names), None)
        if hit is not None:
            found[role] = hit
        elif spec.required:
            missing.append(f"{role} (one of {list(spec.candidates)}; map it with --{spec.flag})")
    for group in layout.one_of:
        present = [r for r in group if r in found]
        if len(present) != 1:
            flags = " or ".join(f"--{layout.roles[r].flag}" for r in group)
            what = "both" if present else "none"
            missing.append(f"exactly one of {list(group)} ({what} found; choose with {flags})")
    return found, missing


def detect_layout(names: list[str], cmap: ColumnMap, *, paired: bool | None = None):
    """``(layout, role -> column)`` for a table with columns ``names``.

    An explicit ``--data_layout`` is checked; ``auto`` takes the one layout whose columns are all
    present (one-image layouts only when ``paired`` is not True); none or several is an error."""
    names = list(names)
    if cmap.data_layout != AUTO:
        if cmap.data_layout not in LAYOUTS:
            raise DataLayoutError(
                f"--data_layout {cmap.data_layout!r} is not one of {list(LAYOUT_CHOICES)}"
            )
        layout = LAYOUTS[cmap.data_layout]
        found, missing = _resolve(layout, names, cmap.columns)
        if missing:
            raise DataLayoutError(_missing_message(layout, missing, names))
        return layout, found
    candidates = [lay for lay in LAYOUTS.values() if paired is not True or lay.paired]
    full = []
    best = None
    for layout in candidates:
        found, missing = _resolve(layout, names, cmap.columns)
        if not missing:
            full.append((layout, found))
        score = len(found) - len(missing)
        if best is None or score > best[0]:
            best = (score, layout, missing)
    if len(full) > 1 and full[0][0].name == DEFAULT_LAYOUT:
        # A Pick-a-Pic table that also carries scores (the pair builder's provenance columns)
        # is Pick-a-Pic: its labels are the decision, the default layout wins.
        return full[0]
    if len(full) == 1:
        return full[0]
    if len(full) > 1:
        raise DataLayoutError(
            f"the data's columns {names} fit several layouts "
            f"({[lay.name for lay, _ in full]}); choose one with --data_layout"
        )
    _, layout, missing = best
    raise DataLayoutError(
        _missing_message(layout, missing, names)
        + " (no layout matched; the closest is shown, pass --data_layout to choose another)"
    )


def _missing_message(layout: Layout, missing: list[str], names: list[str]) -> str:
    return (
        f"layout {layout.name!r} ({layout.doc}) lacks column(s): {'; '.join(missing)}; "
        f"the data has columns {names}"
    )


# ---------------------------------------------------------------------------------------------
# Normalisation to the Pick-a-Pic schema


def _undecoded(ds, column: str):
    """Image features (single or lists) stay encoded: decoding waits for the training row."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return ds.cast_column(column, datasets.Image(decode=False))
    inner = getattr(feature, "feature", None)
    if isinstance(inner, datasets.Image):
        kind = type(feature)
        return ds.cast_column(column, kind(datasets.Image(decode=False)))
    return ds


def _column(ds, name: str) -> list:
    return ds.select_columns([name])[name]


def _absolute_paths(ds, columns: list[str], base: Path | None):
    """String image values are file paths relative to the data folder: made absolute here, so
    decoding does not depend on the working directory."""
    import datasets

    todo = [c for c in columns if ds.features[c] == datasets.Value("string")]
    if not todo or base is None:
        return ds

    def fix(batch):
        return {
            c: [v if v is None or Path(v).is_absolute() else str(base / v) for v in batch[c]]
            for c in todo
        }

    return ds.map(fix, batched=True, desc="resolving image paths")


def normalise(ds, layout: Layout, found: dict, cmap: ColumnMap, base: Path | None = None):
    """The rows of ``ds`` in the Pick-a-Pic schema (``jpg_0``, ``jpg_1``, ``label_0``,
    ``caption``, + ``model_0`` / ``model_1`` if known); returns ``(dataset, counts)``."""
    counts: dict[str, int] = {"source_rows": len(ds)}
    to_pickapic = _NORMALISE[layout.name]
    ds, extra = to_pickapic(ds, found, cmap, base)
    counts.update(extra)
    return ds, counts


def _rename(ds, found: dict, targets: dict[str, str]):
    """Select the roles of ``targets`` (role -> schema name) and rename them."""
    keep = {found[r]: t for r, t in targets.items() if r in found}
    ds = ds.select_columns(list(keep))
    # Two-step rename: a source column may already carry another role's target name.
    ds = ds.rename_columns({src: f"__{dst}" for src, dst in keep.items()})
    return ds.rename_columns({f"__{dst}": dst for dst in keep.values()})


_MODELS = {"model_0": "model_0", "model_1": "model_1"}


def _pickapic(ds, found, cmap, base):
    ds = _rename(
        ds,
        found,
        {"image_0": "jpg_0", "image_1": "jpg_1", "label": "label_0", "caption": "caption"}
        | _MODELS,
    )
    return _absolute_paths(ds, ["jpg_0", "jpg_1"], base), {}


def _chosen_rejected(ds, found, cmap, base):
    ds = _rename(
        ds, found, {"chosen": "jpg_0", "rejected": "jpg_1", "caption": "caption"} | _MODELS
    )
    ds = ds.add_column("label_0", [1.0] * len(ds))
    return _absolute_paths(ds, ["jpg_0", "jpg_1"], base), {}


def _as_float(values) -> np.ndarray:
    return np.asarray([np.nan if v is None else float(v) for v in values], np.float64)


def _scores(ds, found, cmap, base):
    s0 = _as_float(_column(ds, found["score_0"]))
    s1 = _as_float(_column(ds, found["score_1"]))
    gap = s0 - s1
    valid = np.isfinite(gap)
    tie = valid & (np.abs(gap) <= cmap.score_tie_threshold)
    keep = np.flatnonzero(valid & ~tie)
    ds = _rename(
        ds,
        found,
        {"image_0": "jpg_0", "image_1": "jpg_1", "caption": "caption"} | _MODELS,
    ).select(keep)
    ds = ds.add_column("label_0", (gap[keep] > 0).astype(np.float64).tolist())
    counts = {"score_ties_dropped": int(tie.sum()), "malformed_rows_dropped": int((~valid).sum())}
    return _absolute_paths(ds, ["jpg_0", "jpg_1"], base), counts


def rank_pairs(values, *, higher_is_better: bool, mode: str, threshold: float = 0.0):
    """``[(winner index, loser index)]`` of one ranked list: the best against the worst, or
    every pair whose gap exceeds ``threshold`` (ties never pair)."""
    v = np.asarray(values, np.float64)
    if not higher_is_better:
        v = -v
    if mode == "best_worst":
        best, worst = int(np.argmax(v)), int(np.argmin(v))
        return [(best, worst)] if v[best] - v[worst] > threshold else []
    return [
        (i, j) for i in range(len(v)) for j in range(len(v)) if i != j and v[i] - v[j] > threshold
    ]


def _ranked(ds, found, cmap, base):
    score_role = "ranks" if "ranks" in found else "scores"
    ranking = _column(ds, found[score_role])
    import pyarrow.compute as pc

    # List lengths from Arrow directly: the image bytes are never read here.
    images = ds.select_columns([found["images"]]).with_format("arrow")[found["images"]]
    lengths = [-1 if n is None else n for n in pc.list_value_length(images).to_pylist()]
    rows, winners, losers, malformed = [], [], [], 0
    for r, (values, n) in enumerate(zip(ranking, lengths)):
        try:
            if values is None or n < 2 or len(values) != n:
                raise ValueError
            pairs = rank_pairs(
                [float(x) for x in values],
                higher_is_better=score_role == "scores",
                mode=cmap.pair_mode,
                threshold=cmap.score_tie_threshold,
            )
        except (TypeError, ValueError):
            malformed += 1
            continue
        for w, lo in pairs:
            rows.append(r)
            winners.append(w)
            losers.append(lo)
    images_col, caption_col = found["images"], found["caption"]
    picked = ds.select_columns([images_col, caption_col]).select(rows)
    picked = picked.add_column("__w", winners).add_column("__l", losers)

    def expand(batch):
        return {
            "jpg_0": [imgs[w] for imgs, w in zip(batch[images_col], batch["__w"])],
            "jpg_1": [imgs[lo] for imgs, lo in zip(batch[images_col], batch["__l"])],
            "caption": batch[caption_col],
            "label_0": [1.0] * len(batch["__w"]),
        }

    inner = getattr(ds.features[images_col], "feature", None)
    import datasets

    features = datasets.Features(
        {
            "jpg_0": inner,
            "jpg_1": inner,
            "caption": datasets.Value("string"),
            "label_0": datasets.Value("float64"),
        }
    )
    out = picked.map(
        expand,
        batched=True,
        remove_columns=picked.column_names,
        features=features,
        desc="expanding ranked lists",
    )
    counts = {"ranked_rows": len(ds), "malformed_rows_dropped": malformed}
    return _absolute_paths(out, ["jpg_0", "jpg_1"], base), counts


def _images(ds, found, cmap, base):
    ds = _rename(ds, found, {"image": "jpg_0", "caption": "caption"})
    ds = ds.add_column("label_0", [1.0] * len(ds))
    return _absolute_paths(ds, ["jpg_0"], base), {}


_NORMALISE = {
    "pickapic": _pickapic,
    "chosen_rejected": _chosen_rejected,
    "scores": _scores,
    "ranked": _ranked,
    "images": _images,
}


def prepare_layout(ds, cmap: ColumnMap, *, paired: bool | None = None, base: Path | None = None):
    """Detect / check the layout of ``ds``, log it, and return ``(pickapic-schema ds, counts)``.

    ``counts`` has ``layout`` and the layout's own drop counts."""
    layout, found = detect_layout(ds.column_names, cmap, paired=paired)
    how = "detected" if cmap.data_layout == AUTO else "chosen"
    mapping = ", ".join(f"{role}={col!r}" for role, col in found.items())
    logger.info("data layout %r (%s): %s", layout.name, how, mapping)
    print(f"data layout {layout.name!r} ({how}): {mapping}", flush=True)
    if paired and not layout.paired:
        raise DataLayoutError(
            f"layout {layout.name!r} has one image per row: only --train_method sft trains on it"
        )
    for role, col in found.items():
        if role in ("image_0", "image_1", "chosen", "rejected", "images", "image"):
            ds = _undecoded(ds, col)
    ds, counts = normalise(ds, layout, found, cmap, base)
    return ds, {"layout": layout.name, **counts}
