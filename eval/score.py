"""Score generation manifests with the five metrics: per-image JSONL + summary JSON + a table.

    python -m eval.score --manifest M1.json [M2.json ...] [--metrics all|pickscore,hpsv2,...]
        [--device auto] [--batch_size 16] [--summary_out PATH] [--<metric>_<weight> PATH ...]

Beside each manifest ``M.json`` it writes

* ``M.scores.jsonl``: one line per manifest entry, in order: ``index``, ``prompt``, ``image``
  (the manifest's ``gen_image_path``), ``image_sha1`` (of the file's bytes) and one key per metric;
* ``M.summary.json``: ``{"manifest", "n", "metrics": {metric: {"mean", "std", "n"}}}``
  (``std`` is the sample standard deviation, 0 for one image).

Resumable: a metric already stored for an entry with the same prompt and image bytes is not
recomputed; the scores file is rewritten atomically after every ``--save_every`` batches.
Missing images, a malformed manifest or missing weights are reported before any model loads.
Weight flags (``--pickscore_model`` ...) and their environment variables: see eval/scorers.py.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from sdpo import io as sdpo_io
from sdpo.cli import arg, parse

METRICS = ("pickscore", "hpsv2", "clip", "aesthetics", "imagereward")


@dataclass
class ScoreConfig:
    """Options of ``python -m eval.score`` (see ``--help``)."""

    manifests: list[str] = arg(
        help="manifest JSON file(s) to score", flags=["--manifest"], required=True
    )
    metrics: list[str] = arg(
        help="'all' or a comma list of " + ",".join(METRICS),
        default_factory=lambda: list(METRICS),
        metavar="METRICS",
    )
    device: str = arg("auto", "auto (cuda if available), cpu, cuda, cuda:N")
    batch_size: int = arg(16, "images per forward pass of each scorer")
    save_every: int = arg(20, "rewrite the scores file every this many batches (resume step)")
    summary_out: str | None = arg(None, "combined summary JSON of all manifests (optional)")
    image_root: str | None = arg(
        None,
        "folder relative image paths start from (default: beside the manifest, else the working "
        "directory, as the official scripts write them)",
    )
    weights: dict[str, dict[str, str]] = arg(
        default_factory=dict, cli=False, help="metric -> {key: location} (the weight flags)"
    )


def parse_metrics(text: str | list[str]) -> list[str]:
    """``"all"`` or a comma list of metric names (or a list of such) -> ordered list; unknown
    names are an error."""
    if not isinstance(text, str):
        text = ",".join(text)
    if text.strip().lower() == "all":
        return list(METRICS)
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown or not names:
        raise ValueError(
            f"--metrics: unknown metric(s) {unknown or text!r}; choose from {list(METRICS)}"
        )
    return list(dict.fromkeys(names))


def add_weight_flags(parser: argparse.ArgumentParser) -> None:
    """One ``--<metric>_<key>`` flag per weight location of eval.scorers.WEIGHT_SPECS."""
    from eval.scorers import WEIGHT_SPECS

    group = parser.add_argument_group("weight locations (local path or hub id; override env)")
    for metric, specs in WEIGHT_SPECS.items():
        for spec in specs:
            text = f"{spec.what} (env {spec.env}, default {spec.shown_default})"
            # '%' is argparse's format character: a URL's %2B must be doubled (help would crash)
            group.add_argument(f"--{metric}_{spec.key}", default=None, help=text.replace("%", "%%"))


def weights_from_args(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    from eval.scorers import WEIGHT_SPECS

    out: dict[str, dict[str, str]] = {}
    for metric, specs in WEIGHT_SPECS.items():
        for spec in specs:
            value = getattr(args, f"{metric}_{spec.key}", None)
            if value:
                out.setdefault(metric, {})[spec.key] = value
    return out


def with_weights(cfg, namespace: argparse.Namespace):
    """``finish`` of the parsers that take the weight flags: they go into ``cfg.weights``."""
    cfg.weights = weights_from_args(namespace)
    return cfg


def check_score_config(cfg: ScoreConfig) -> ScoreConfig:
    for name in ("batch_size", "save_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    cfg.metrics = parse_metrics(cfg.metrics)
    return cfg


def parse_with_weights(cls, argv, *, module: str, doc: str, check):
    """The parser of an evaluation command that scores: ``cls``'s flags plus one weight flag
    per scorer weight (into ``cfg.weights``), then ``check``."""
    return parse(
        cls,
        argv,
        prog=f"python -m {module}",
        description=doc.split("\n")[0],
        extend=add_weight_flags,
        finish=with_weights,
        check=check,
    )


def parse_args(argv=None) -> ScoreConfig:
    return parse_with_weights(
        ScoreConfig, argv, module="eval.score", doc=__doc__, check=check_score_config
    )


# ---------------------------------------------------------------- manifests and score files


def load_manifest(path: str | Path) -> list[dict]:
    """Read a manifest: a JSON list of objects with ``prompt`` and ``gen_image_path``.

    The official generation scripts may store ``gen_image_path`` as a list of paths: the first
    non-empty one is the image (as the official comparison reads it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"manifest {path} is not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise ValueError(f"manifest {path} must be a JSON list of entries")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str):
            raise ValueError(f"manifest {path} entry {i} has no string 'prompt'")
        img = entry.get("gen_image_path")
        if isinstance(img, list):
            entry["gen_image_path"] = next((p for p in img if isinstance(p, str) and p), "")
        if not entry.get("gen_image_path") or not isinstance(entry["gen_image_path"], str):
            raise ValueError(f"manifest {path} entry {i} has no 'gen_image_path'")
    return entries


def image_file(manifest: str | Path, entry: dict, root: str | Path | None = None) -> Path:
    """``gen_image_path`` as a file: absolute paths are kept; a relative one is taken under
    ``root`` when given (``--image_root``), else beside the manifest (this project's manifests)
    and, if no file is there, under the working directory (the official scripts store paths
    relative to the directory they ran in)."""
    p = Path(entry["gen_image_path"]).expanduser()
    if p.is_absolute():
        return p
    if root is not None:
        return Path(root).expanduser() / p
    beside = Path(manifest).parent / p
    if beside.is_file() or not p.is_file():
        return beside
    return p.resolve()


def scores_path(manifest: str | Path) -> Path:
    m = Path(manifest)
    return m.with_name(m.stem + ".scores.jsonl")


def summary_path(manifest: str | Path) -> Path:
    m = Path(manifest)
    return m.with_name(m.stem + ".summary.json")


def read_scores(path: str | Path) -> list[dict]:
    """Records of a ``.scores.jsonl`` file (empty list if it does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_scores(path: str | Path, records: list[dict]) -> None:
    sdpo_io.write_jsonl(path, records)


def summarize(records: list[dict], metrics: list[str]) -> dict[str, dict[str, float]]:
    """Per metric ``mean``, sample ``std`` and ``n`` over the records that carry it."""
    out = {}
    for metric in metrics:
        values = [r[metric] for r in records if r.get(metric) is not None]
        n = len(values)
        mean = sum(values) / n if n else float("nan")
        var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
        out[metric] = {"mean": mean, "std": math.sqrt(var), "n": n}
    return out


def format_table(rows: dict[str, dict[str, dict[str, float]]], metrics: list[str]) -> str:
    """Plain-text table: one row per label, ``mean ± sd`` per metric (the sd is the spread of the
    scores over the images, said under the table: it is not an uncertainty of the mean)."""
    width = max([len("set")] + [len(k) for k in rows])
    head = f"{'set':<{width}} | " + " | ".join(f"{m:>20}" for m in metrics)
    lines = [head, "-" * len(head)]
    for label, summary in rows.items():
        cells = []
        for m in metrics:
            s = summary.get(m)
            cells.append(f"{s['mean']:>10.4f} ± {s['std']:<7.4f}" if s and s["n"] else f"{'-':>20}")
        lines.append(f"{label:<{width}} | " + " | ".join(cells))
    lines.append(
        "(mean ± sd over images; the sd is their spread, not an uncertainty: for intervals and "
        "p-values compare runs with eval.compare)"
    )
    return "\n".join(lines)


def _sha1(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


# ---------------------------------------------------------------- scoring


def scorer_id(metric: str, weights: dict[str, str] | None = None) -> str:
    """A short id of how ``metric`` is configured: its weight locations and options as given
    (flag, else environment, else default; not resolved, so no download) and the scorer's
    revision. A stored score is reused only under the same id: switching the HPSv2
    preprocessing or pointing a flag at other weights recomputes that metric."""
    from eval.scorers import SCORER_REVISIONS, WEIGHT_SPECS

    weights = weights or {}
    parts = {
        spec.key: weights.get(spec.key) or os.environ.get(spec.env) or spec.default
        for spec in WEIGHT_SPECS[metric]
    }
    parts["_revision"] = SCORER_REVISIONS.get(metric, 1)
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def prepare(cfg: ScoreConfig) -> list[tuple[Path, list[dict], list[dict]]]:
    """Validate everything cheap first; return (manifest, entries, records to complete) each.

    Records keep every stored metric of an entry whose prompt and image bytes are unchanged and
    whose scorer id (:func:`scorer_id`) is the current one (a record without ids, written before
    they existed, is trusted). Raises one error listing all missing images, then one for missing
    weights.
    """
    jobs, missing = [], []
    for manifest in cfg.manifests:
        entries = load_manifest(manifest)
        root = cfg.image_root
        missing += [
            str(image_file(manifest, e, root))
            for e in entries
            if not image_file(manifest, e, root).is_file()
        ]
        jobs.append((Path(manifest), entries))
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in the manifest(s) are missing (relative paths are "
            "looked up beside the manifest, then in the working directory; --image_root sets "
            f"the folder they start from):\n  {shown}{more}"
        )
    ids = {m: scorer_id(m, cfg.weights.get(m)) for m in cfg.metrics}
    out = []
    for manifest, entries in jobs:
        old = read_scores(scores_path(manifest))
        records = []
        for i, entry in enumerate(entries):
            path = image_file(manifest, entry, cfg.image_root)
            rec = {
                "index": i,
                "prompt": entry["prompt"],
                "image": entry["gen_image_path"],
                "image_file": str(path.resolve()),  # where it was found (any path convention)
                "image_sha1": _sha1(path),
            }
            prev = old[i] if i < len(old) else None
            if (
                prev
                and prev.get("prompt") == rec["prompt"]
                and prev.get("image_sha1") == rec["image_sha1"]
            ):
                stored = prev.get("scorer_ids") or {}
                # a stored score stays unless both ids are known and differ
                keep = [
                    m
                    for m in METRICS
                    if prev.get(m) is not None
                    and not (m in stored and m in ids and stored[m] != ids[m])
                ]
                rec.update({m: prev[m] for m in keep})
                kept_ids = {m: stored[m] for m in keep if m in stored}
                if kept_ids:
                    rec["scorer_ids"] = kept_ids
            records.append(rec)
        out.append((manifest, entries, records))
    return out


def score_manifests(cfg: ScoreConfig, scorer_factory=None) -> dict[str, dict]:
    """Score every manifest of ``cfg``; return ``{manifest path: summary dict}``.

    ``scorer_factory(metric, device, batch_size, **weights)`` defaults to eval.scorers.get_scorer.
    All needed scorers are loaded together so each image is decoded once.
    """
    from eval.scorers import get_scorer, resolve_weights

    scorer_factory = scorer_factory or get_scorer
    jobs = prepare(cfg)
    needed = [m for m in cfg.metrics if any(r.get(m) is None for _, _, recs in jobs for r in recs)]
    if needed:
        # resolve every weight location (one clear error) before building any model
        resolved = {m: resolve_weights(m, **cfg.weights.get(m, {})) for m in needed}
        device = resolve_device(cfg.device)
        scorers = {
            m: scorer_factory(m, device=device, batch_size=cfg.batch_size, **resolved[m])
            for m in needed
        }
        ids = {m: scorer_id(m, cfg.weights.get(m)) for m in needed}
        for manifest, _entries, records in jobs:
            _score_records(manifest, records, scorers, cfg, ids)
    summaries = {}
    for manifest, _entries, records in jobs:
        write_scores(scores_path(manifest), records)
        summary = {
            "manifest": str(manifest),
            "n": len(records),
            "metrics": summarize(records, cfg.metrics),
        }
        sdpo_io.write_json(summary_path(manifest), summary)
        summaries[str(manifest)] = summary
    return summaries


def _score_records(
    manifest: Path, records: list[dict], scorers: dict, cfg: ScoreConfig, ids: dict[str, str]
) -> None:
    from tqdm.auto import tqdm

    todo = [r for r in records if any(r.get(m) is None for m in scorers)]
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for k, batch in enumerate(
            tqdm(batches, desc=f"scoring {manifest.name}", disable=not batches)
        ):
            images = list(
                pool.map(
                    _load_rgb,
                    [
                        r.get("image_file") or image_file(manifest, {"gen_image_path": r["image"]})
                        for r in batch
                    ],  # fmt: skip
                )
            )
            prompts = [r["prompt"] for r in batch]
            for metric, scorer in scorers.items():
                rows = [j for j, r in enumerate(batch) if r.get(metric) is None]
                if not rows:
                    continue
                values = scorer.score([images[j] for j in rows], [prompts[j] for j in rows])
                for j, v in zip(rows, values.tolist()):
                    batch[j][metric] = float(v)
                    batch[j].setdefault("scorer_ids", {})[metric] = ids[metric]
            if (k + 1) % cfg.save_every == 0:
                write_scores(scores_path(manifest), records)


def main(cfg: ScoreConfig) -> dict[str, dict]:
    summaries = score_manifests(cfg)
    rows = {Path(m).stem: s["metrics"] for m, s in summaries.items()}
    print(format_table(rows, cfg.metrics))
    if cfg.summary_out:
        Path(cfg.summary_out).parent.mkdir(parents=True, exist_ok=True)
        sdpo_io.write_json(cfg.summary_out, summaries)
    return summaries


def cli(argv=None) -> dict[str, dict] | None:
    """The command line: expected failures (a missing manifest or image, a malformed manifest,
    weights that cannot be found) are one line on stderr, exit status 1."""
    cfg = parse_args(argv)
    try:
        return main(cfg)
    except (FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    cli()
