"""Relabel or filter a preference set with a reward model, offline, scores cached by image bytes.

    python -m eval.relabel --train_data_dir data/pickapic --outdir data/pickapic_pickscore \\
        --metric pickscore --action flip|drop|label [--min_gap 0] [any data layout flag]
    python train.py --train_data_dir data/pickapic_pickscore ...

Any layout :mod:`sdpo.data.layouts` reads (and the same flags) is accepted; ties are dropped
first, as for training. Each image is scored once with its prompt through the evaluation's
scorers (batched, weights loaded once); scores are cached in ``work/scores.jsonl`` under the
sha1 of the image bytes and of the prompt, so a rerun, another ``--action`` or another output of
the same images costs no scoring. The reward model's decision per pair: ``reward_label_0`` = 1
when ``jpg_0`` scores higher by more than ``--min_gap``, 0 when ``jpg_1`` does, 0.5 otherwise
(a reward tie). A pair *disagrees* when the reward model decides (0 or 1) against the human
label. ``--action``:

* ``label``: every pair, human labels kept, the reward columns added;
* ``drop``: the pairs that disagree (and those whose images do not decode) are removed;
* ``flip``: the disagreeing pairs take the reward model's label.

Output: ``data/train-XXXXX-of-YYYYY.parquet`` in the Pick-a-Pic schema with ``label_0`` (the
label training uses), ``human_label_0``, ``reward_label_0``, ``reward_0``, ``reward_1``,
``reward_metric``; ``relabel_summary.json`` and a short ``README.md`` with the counts and the
command.

This is the offline counterpart of ``train.py --choice_model``, which re-scores both images of
every pair each time training reads it (every epoch, inside the data loader, one pair per
forward, with the reward model resident beside the UNet); here each image is scored once,
batched, and the result is a plain data set that can also be cached with ``python -m sdpo.cache``.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdpo import io
from sdpo.cli import arg, parse
from sdpo.config import DataFlags, validate_data

ACTIONS = ("label", "drop", "flip")
METRICS = ("pickscore", "hpsv2", "clip", "aesthetics", "imagereward")


@dataclass
class RelabelConfig(DataFlags):
    """Options of ``python -m eval.relabel``: the data flags of ``train.py`` plus these."""

    outdir: str | None = arg(None, "output folder (a data set train.py reads)")
    metric: str = arg("pickscore", "reward model", choices=list(METRICS))
    action: str = arg(
        "flip", "label: add columns; drop / flip the disagreeing pairs", choices=ACTIONS
    )
    min_gap: float = arg(0.0, "reward gaps up to this are reward ties (never disagree)")
    device: str = arg("auto", "scorer device (auto: cuda if available)")
    batch_size: int = arg(16, "images per scorer forward")
    shard_size: int = arg(1000, "pairs per parquet shard")
    seed: int = arg(0, "seed of a --max_train_samples subset")
    weights: dict = field(default_factory=dict, metadata={"cli": False})
    argv: list = field(default_factory=list, metadata={"cli": False})  # for the data card


def validate(cfg: RelabelConfig) -> RelabelConfig:
    if not cfg.outdir:
        raise ValueError("--outdir: is required")
    validate_data(cfg, cached=True)
    if not cfg.min_gap >= 0:
        raise ValueError(f"--min_gap: must be >= 0, got {cfg.min_gap}")
    for name in ("batch_size", "shard_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
    return cfg


def _finish_argv(cfg, argv):
    cfg.argv = list(sys.argv[1:] if argv is None else argv)
    return cfg


def _finish(cfg, namespace):
    from eval.score import weights_from_args

    cfg.weights = weights_from_args(namespace)
    return cfg


def _extend(parser):
    from eval.pairs import _extend as weight_flags

    weight_flags(parser)


def parse_args(argv=None) -> RelabelConfig:
    return parse(
        RelabelConfig,
        argv,
        prog="python -m eval.relabel",
        description="Relabel / filter preference pairs with a reward model (offline, cached).",
        extend=_extend,
        finish=lambda cfg, ns: _finish_argv(_finish(cfg, ns), argv),
        check=validate,
    )


def cache_key(image: bytes, prompt: str) -> str:
    return hashlib.sha1(image).hexdigest() + ":" + hashlib.sha1(prompt.encode()).hexdigest()[:16]


def score_images(items, scorer, cache: dict, *, batch_size: int, save) -> int:
    """Score the ``(key, bytes, prompt)`` items missing from ``cache`` (key -> score, or None
    for an image that does not decode), batched; ``save()`` after every batch. Returns how many
    images were scored."""
    from sdpo.data.pairs import decode_image

    todo = list(
        {key: (key, data, prompt) for key, data, prompt in items if key not in cache}.values()
    )
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        images, prompts, keys = [], [], []
        for key, data, prompt in batch:
            try:
                images.append(decode_image(data))
            except Exception:  # PIL raises several types on corrupt bytes
                cache[key] = None
                continue
            prompts.append(prompt)
            keys.append(key)
        if images:
            for key, value in zip(keys, scorer.score(images, prompts).tolist()):
                cache[key] = float(value)
        save()
    return len(todo)


def decide(r0, r1, human: float, min_gap: float) -> tuple[float | None, bool]:
    """``(reward label, disagrees)`` of one pair (None: an image did not decode)."""
    if r0 is None or r1 is None:
        return None, False
    reward = 1.0 if r0 - r1 > min_gap else 0.0 if r1 - r0 > min_gap else 0.5
    return reward, reward != 0.5 and reward != human


def run(cfg: RelabelConfig, scorer_factory=None, command: str | None = None) -> dict:
    from eval.pairs import write_table_shards
    from eval.score import resolve_device
    from eval.scorers import get_scorer, resolve_weights
    from sdpo.data import DataSource
    from sdpo.data.pairs import image_bytes
    from sdpo.data.pickapic import load_pairs

    validate(cfg)
    out = Path(cfg.outdir)
    ds, info = load_pairs(DataSource.from_flags(cfg), cfg.seed, paired=True)
    keep_cols = [c for c in ("model_0", "model_1") if c in ds.column_names]
    rows = []
    for i in range(len(ds)):
        row = ds[i]
        b0, b1, prompt = image_bytes(row["jpg_0"]), image_bytes(row["jpg_1"]), row["caption"] or ""
        rows.append((b0, b1, prompt, float(row["label_0"]), [row[c] for c in keep_cols]))

    cache_file = out / "work" / "scores.jsonl"
    cache = {}
    if cache_file.is_file():
        for line in cache_file.read_text().splitlines():
            rec = json.loads(line)
            if rec["metric"] == cfg.metric:
                cache[rec["key"]] = rec["score"]
    items = [(cache_key(b, p), b, p) for b0, b1, p, _, _ in rows for b in (b0, b1)]
    scored = 0
    if any(key not in cache for key, _, _ in items):
        factory = scorer_factory or get_scorer
        # Weight locations are resolved (one clear error) only for the real scorers.
        given = cfg.weights.get(cfg.metric, {})
        weights = given if scorer_factory else resolve_weights(cfg.metric, **given)
        scorer = factory(
            cfg.metric, device=resolve_device(cfg.device), batch_size=cfg.batch_size, **weights
        )

        def save():
            io.write_jsonl(
                cache_file,
                ({"key": k, "metric": cfg.metric, "score": v} for k, v in cache.items()),
            )

        scored = score_images(items, scorer, cache, batch_size=cfg.batch_size, save=save)

    columns: dict[str, list] = {
        k: []
        for k in (
            "jpg_0",
            "jpg_1",
            "caption",
            "label_0",
            "human_label_0",
            "reward_label_0",
            "reward_0",
            "reward_1",
            "reward_metric",
            *keep_cols,
        )
    }
    counts = {"pairs_in": len(rows), "disagree": 0, "reward_ties": 0, "undecodable": 0}
    for b0, b1, prompt, human, extra in rows:
        r0, r1 = cache[cache_key(b0, prompt)], cache[cache_key(b1, prompt)]
        reward, disagrees = decide(r0, r1, human, cfg.min_gap)
        counts["disagree"] += disagrees
        counts["reward_ties"] += reward == 0.5
        counts["undecodable"] += reward is None
        if cfg.action == "drop" and (disagrees or reward is None):
            continue
        label = reward if cfg.action == "flip" and disagrees else human
        values = (b0, b1, prompt, label, human, reward, r0, r1, cfg.metric, *extra)
        for key, value in zip(columns, values):
            columns[key].append(value)
    counts["pairs_out"] = len(columns["jpg_0"])
    counts["flipped"] = counts["disagree"] if cfg.action == "flip" else 0
    counts["dropped"] = counts["pairs_in"] - counts["pairs_out"]
    write_table_shards(columns, out / "data", cfg.shard_size)
    command = command or "python -m eval.relabel " + shlex.join(cfg.argv)
    summary = {
        **counts,
        "images_scored": scored,
        "metric": cfg.metric,
        "action": cfg.action,
        "min_gap": cfg.min_gap,
        "source": info,
        "command": command,
    }
    io.write_json(out / "relabel_summary.json", summary)
    io.write_text(
        out / "README.md",
        "# Relabelled preference pairs\n\n"
        f"Reward model `{cfg.metric}`, action `{cfg.action}` (min gap {cfg.min_gap:g}), by "
        "`python -m eval.relabel`; train with `python train.py --train_data_dir <this folder>`."
        "\n\n| | |\n|---|---|\n"
        + "".join(f"| {k} | {counts[k]} |\n" for k in counts)
        + f"\nCommand:\n\n```\n{command}\n```\n",
    )
    print(
        f"{counts['pairs_in']} pairs, {counts['disagree']} disagree with {cfg.metric}; "
        f"{cfg.action}: {counts['pairs_out']} written to {out / 'data'}",
        flush=True,
    )
    return summary


def main(cfg: RelabelConfig, scorer_factory=None) -> dict:
    return run(cfg, scorer_factory)


if __name__ == "__main__":
    _cfg = parse_args()
    try:
        main(_cfg)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
