"""On-policy preference pairs: generate K images per prompt, score them, pair best against worst.

    python -m eval.pairs --prompts prompts.txt --outdir data/onpolicy \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        [--unet_path runs/x/unet.pth] --num_images 4 --metrics pickscore,hpsv2 \\
        [--metric_weights 1,0.5] [--pair_mode best_worst|all] [--min_gap 0]
    accelerate launch -m eval.pairs ...          # generation shared over the GPUs
    python train.py --train_data_dir data/onpolicy ...   # trains on the result, no extra flag

The stages are the evaluation's own code, so images and scores are exactly what evaluation
would produce (the on-policy / iterative DPO recipe: the model being aligned proposes, a reward
model judges):

1. prompts: a prompt file or set in the evaluation format (:mod:`eval.prompts`), or a column of
   a data set (``--prompt_data`` + ``--prompt_column``; distinct values, in order);
2. generation: :func:`eval.generate.run` once per seed ``seed, seed+1, ..., seed+K-1`` (one
   shared initial noise per seed, batched, sharded over processes, resumable); image k of every
   prompt comes from seed ``seed+k``;
3. scoring: :func:`eval.score.score_manifests` (all metrics loaded once, each image decoded once
   for all of them, resumable), on the main process;
4. pairs: with one metric its raw score; with several, the weighted sum of the metrics each
   standardised over all generated images (``z = (s - mean) / std``), so weights compare
   metrics of different scales. Per prompt the best image against the worst, or every pair
   whose gap exceeds ``--min_gap`` (in the combined score's unit); exact ties never pair
   (:func:`sdpo.data.layouts.rank_pairs`, the ranked layout's rule);
5. output: ``data/train-XXXXX-of-YYYYY.parquet`` in the Pick-a-Pic schema (``jpg_0`` = the
   winner's PNG bytes, ``jpg_1`` the loser's, ``label_0`` = 1, ``caption``) with provenance
   columns (``model_0`` / ``model_1``, ``seed_0`` / ``seed_1``, ``score_0`` / ``score_1``,
   ``metric``, ``<metric>_0`` / ``<metric>_1``, ``prompt_index``, ``image_0`` / ``image_1``),
   each shard written atomically; ``README.md`` (the data card: counts, settings, the exact
   command), ``gap_histogram.png`` and ``pairs_summary.json``. Work files (prompt list, images,
   manifests, score files) stay under ``work/``.

A rerun of the same command finishes an interrupted one: generation and scoring skip what
exists, and the pair files are rebuilt from the scores (deterministic), replacing older shards.
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sdpo import io
from sdpo.cli import arg, parse

PAIR_MODES = ("best_worst", "all")
# Flags handed to eval.generate unchanged (same names, same meaning).
GENERATE_FIELDS = (
    "pretrained_model_name_or_path",
    "sdxl",
    "vae",
    "unet_path",
    "size",
    "steps",
    "cfg",
    "batch_size",
    "dtype",
    "device",
    "prompts_dir",
)


class PairsError(ValueError):
    """Bad input to the pair builder (raised before any model loads)."""


@dataclass
class PairsConfig:
    """Options of ``python -m eval.pairs`` (see ``--help``)."""

    outdir: str = arg(help="output folder (the data set train.py reads)", required=True)
    prompts: str | None = arg(None, "prompt set name or prompt file (.json/.txt, eval format)")
    prompt_data: str | None = arg(
        None, "instead of --prompts: a data set (hub id or local folder) holding the prompts"
    )
    prompt_column: str = arg("caption", "column of --prompt_data with the prompts")
    prompt_split: str = arg("train", "split of --prompt_data")
    max_prompts: int | None = arg(None, "only the first N prompts")
    num_images: int = arg(4, "images per prompt, K >= 2 (seeds --seed ... --seed + K - 1)")
    seed: int = arg(0, "seed of the first image of every prompt")
    pretrained_model_name_or_path: str | None = arg(
        None, "base pipeline (hub id or folder); default: the family's base model"
    )
    sdxl: bool | None = arg(
        None, "SDXL pipeline (default: detected)", flags=["--sdxl", "--no-sdxl"]
    )
    vae: str = arg("auto", "VAE, as eval.generate's --vae")
    unet_path: str | None = arg(None, "trained unet.pth / UNet folder (default: the base's)")
    size: int | None = arg(None, "image side (default: the family's)")
    steps: int = arg(50, "sampling steps")
    cfg: float = arg(7.5, "guidance, as eval.generate's --cfg")
    batch_size: int = arg(1, "prompts per pipeline call")
    dtype: str = arg("bf16", "UNet / text encoder dtype", choices=["bf16", "fp16", "fp32"])
    device: str | None = arg(None, "e.g. cuda:0 or cpu (default: accelerate's)")
    prompts_dir: str | None = arg(None, "folder where prompt set names are looked up")
    metrics: str = arg(
        "pickscore",
        "one metric, or a comma list combined as a weighted sum of standardised scores "
        "(pickscore, hpsv2, clip, aesthetics, imagereward)",
    )
    metric_weights: str | None = arg(None, "comma list of weights, one per metric (default: 1)")
    score_device: str = arg("auto", "device of the scorers")
    score_batch_size: int = arg(16, "images per scorer forward")
    pair_mode: str = arg(
        "best_worst", "best vs worst per prompt, or every pair", choices=PAIR_MODES
    )
    min_gap: float = arg(0.0, "pairs need a score gap above this (ties are always dropped)")
    shard_size: int = arg(1000, "pairs per parquet shard")
    weights: dict = field(default_factory=dict, metadata={"cli": False})
    argv: list = field(
        default_factory=list, metadata={"cli": False}
    )  # for the data card  # scorer weight paths


def _finish_argv(cfg, argv):
    cfg.argv = list(sys.argv[1:] if argv is None else argv)
    return cfg


def _finish(cfg: PairsConfig, namespace) -> PairsConfig:
    from eval.score import weights_from_args

    cfg.weights = weights_from_args(namespace)
    return cfg


def _extend(parser) -> None:
    """eval.score's weight flags; their help holds URLs whose '%' argparse would read as a
    format character, so it is escaped here (``python -m eval.score --help`` has that bug)."""
    from eval.score import add_weight_flags

    before = set(map(id, parser._actions))
    add_weight_flags(parser)
    for action in parser._actions:
        if id(action) not in before and action.help:
            action.help = action.help.replace("%", "%%")


def parse_args(argv: list[str] | None = None) -> PairsConfig:
    return parse(
        PairsConfig,
        argv,
        prog="python -m eval.pairs",
        description="Build on-policy preference pairs: generate, score, pair, write parquet.",
        extend=_extend,
        finish=lambda cfg, ns: _finish_argv(_finish(cfg, ns), argv),
        check=validate,
    )


def metric_weights(cfg: PairsConfig) -> dict[str, float]:
    """``{metric: weight}`` in the order given."""
    from eval.score import parse_metrics

    try:
        metrics = parse_metrics(cfg.metrics)
    except ValueError as err:
        raise PairsError(f"--metrics: {err}") from None
    if cfg.metric_weights is None:
        return {m: 1.0 for m in metrics}
    try:
        weights = [float(w) for w in cfg.metric_weights.split(",")]
    except ValueError:
        raise PairsError(f"--metric_weights: not numbers: {cfg.metric_weights!r}") from None
    if len(weights) != len(metrics):
        raise PairsError(
            f"--metric_weights: {len(weights)} weight(s) for {len(metrics)} metric(s) {metrics}"
        )
    if not any(weights):
        raise PairsError("--metric_weights: at least one weight must be non-zero")
    return dict(zip(metrics, weights))


def validate(cfg: PairsConfig) -> PairsConfig:
    if bool(cfg.prompts) == bool(cfg.prompt_data):
        raise PairsError("--prompts: give exactly one of --prompts or --prompt_data")
    if cfg.num_images < 2:
        raise PairsError(
            f"--num_images: a pair needs K >= 2 images per prompt, got {cfg.num_images}"
        )
    if not cfg.min_gap >= 0:
        raise PairsError(f"--min_gap: must be >= 0, got {cfg.min_gap}")
    for name in ("shard_size", "score_batch_size"):
        if getattr(cfg, name) < 1:
            raise PairsError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_prompts is not None and cfg.max_prompts < 1:
        raise PairsError(f"--max_prompts: must be >= 1, got {cfg.max_prompts}")
    if cfg.pair_mode not in PAIR_MODES:
        raise PairsError(f"--pair_mode: {cfg.pair_mode!r} is not one of {list(PAIR_MODES)}")
    metric_weights(cfg)
    return cfg


# ----------------------------------------------------------------------------------------------
# Stages


def work_dir(outdir) -> Path:
    return Path(outdir) / "work"


def prompt_source(cfg: PairsConfig) -> str:
    """The prompt file generation reads: ``--prompts``, or ``work/prompts.json`` written from
    the distinct values of ``--prompt_column`` (main process only)."""
    if cfg.prompts:
        return cfg.prompts
    import datasets

    from sdpo.data.pickapic import load_local_folder

    local = Path(cfg.prompt_data)
    if local.is_dir():
        ds, _ = load_local_folder(local, cfg.prompt_split)
    else:
        ds = datasets.load_dataset(cfg.prompt_data, split=cfg.prompt_split)
    if cfg.prompt_column not in ds.column_names:
        raise PairsError(
            f"--prompt_column {cfg.prompt_column!r} is not a column of {cfg.prompt_data!r}; "
            f"it has {ds.column_names}"
        )
    values = ds.select_columns([cfg.prompt_column])[cfg.prompt_column]
    prompts = list(dict.fromkeys(str(v).strip() for v in values if v and str(v).strip()))
    path = work_dir(cfg.outdir) / "prompts.json"
    if not path.is_file() or json.loads(path.read_text()) != prompts:
        io.write_json(path, prompts, ensure_ascii=False)
    return str(path)


def generate_config(cfg: PairsConfig, prompts: str, k: int):
    """The :class:`eval.generate.GenerateConfig` of image ``k`` of every prompt."""
    from eval.generate import GenerateConfig

    shared = {name: getattr(cfg, name) for name in GENERATE_FIELDS}
    return GenerateConfig(
        prompts=prompts,
        outdir=str(work_dir(cfg.outdir) / "images"),
        seed=cfg.seed + k,
        limit=cfg.max_prompts,
        **shared,
    )


def combined_scores(records: list[list[dict]], weights: dict[str, float]):
    """``[K][N]`` combined scores from per-seed score records: the raw metric when only one has
    a non-zero weight, else ``sum_m w_m * (s_m - mean_m) / std_m`` over all K·N images."""
    import numpy as np

    used = {m: w for m, w in weights.items() if w}
    raw = {m: np.asarray([[r[m] for r in recs] for recs in records], np.float64) for m in used}
    if len(used) == 1:
        ((m, w),) = used.items()
        return raw[m] * (1.0 if w > 0 else -1.0)
    total = 0.0
    for m, w in used.items():
        std = raw[m].std()
        total = total + w * (raw[m] - raw[m].mean()) / (std if std > 0 else 1.0)
    return total


def metric_label(weights: dict[str, float]) -> str:
    used = {m: w for m, w in weights.items() if w}
    if len(used) == 1:
        ((m, w),) = used.items()
        return m if w > 0 else f"-{m}"
    return " + ".join(f"{w:g}*z({m})" for m, w in used.items())


def build_pairs(records, manifests, weights, *, mode: str, min_gap: float, model: str, seeds):
    """Pair rows (dicts, without image bytes) and counts from the score records
    (``records[k][i]``: prompt i, seed ``seeds[k]``)."""
    from sdpo.data.layouts import rank_pairs

    scores = combined_scores(records, weights)
    label = metric_label(weights)
    n_prompts = len(records[0])
    rows, unpaired = [], 0
    for i in range(n_prompts):
        values = [float(scores[k][i]) for k in range(len(records))]
        pairs = rank_pairs(values, higher_is_better=True, mode=mode, threshold=min_gap)
        unpaired += not pairs
        for w, lo in pairs:
            row = {
                "caption": records[w][i]["prompt"],
                "label_0": 1.0,
                "prompt_index": i,
                "model_0": model,
                "model_1": model,
                "seed_0": int(seeds[w]),
                "seed_1": int(seeds[lo]),
                "score_0": values[w],
                "score_1": values[lo],
                "metric": label,
                "image_0": str(Path(manifests[w]).parent / records[w][i]["image"]),
                "image_1": str(Path(manifests[lo]).parent / records[lo][i]["image"]),
            }
            for m in weights:
                row[f"{m}_0"] = float(records[w][i][m])
                row[f"{m}_1"] = float(records[lo][i][m])
            rows.append(row)
    counts = {
        "prompts": n_prompts,
        "images": n_prompts * len(records),
        "pairs": len(rows),
        "prompts_without_pair": unpaired,
    }
    return rows, counts


def shard_names(n_rows: int, shard_size: int) -> list[str]:
    n = max(1, -(-n_rows // shard_size))
    return [f"train-{k:05d}-of-{n:05d}.parquet" for k in range(n)]


def write_table_shards(columns: dict[str, list], folder: Path, shard_size: int) -> list[Path]:
    """``train-XXXXX-of-YYYYY.parquet`` shards of ``columns`` (``jpg_*`` as binary), each written
    atomically; shards of an earlier run with another count are removed afterwards."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    io.remove_stale(folder)
    n_rows = len(next(iter(columns.values()))) if columns else 0
    names = shard_names(n_rows, shard_size)
    written = []
    for k, name in enumerate(names):
        part = slice(k * shard_size, (k + 1) * shard_size)
        table = pa.table(
            {
                key: pa.array(values[part], type=pa.binary() if key.startswith("jpg") else None)
                for key, values in columns.items()
            }
        )
        written.append(io.atomic_write(folder / name, lambda tmp, t=table: pq.write_table(t, tmp)))
    for old in folder.glob("train-*-of-*.parquet"):
        if old.name not in names:
            old.unlink()
    return written


def write_shards(rows: list[dict], folder: Path, shard_size: int, outdir: Path) -> list[Path]:
    """The pair rows as Pick-a-Pic-schema shards, image bytes read from the generated PNGs."""
    columns: dict[str, list] = {
        "jpg_0": [Path(r["image_0"]).read_bytes() for r in rows],
        "jpg_1": [Path(r["image_1"]).read_bytes() for r in rows],
    }
    for key in rows[0] if rows else ():
        values = [r[key] for r in rows]
        if key in ("image_0", "image_1"):  # provenance: relative to the output folder
            values = [str(Path(v).relative_to(outdir)) for v in values]
        columns[key] = values
    return write_table_shards(columns, folder, shard_size)


def write_card(outdir: Path, counts: dict, rows: list[dict], cfg: PairsConfig, command: str):
    """``README.md`` (data card), ``gap_histogram.png`` and ``pairs_summary.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    gaps = np.asarray([r["score_0"] - r["score_1"] for r in rows], np.float64)
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.hist(gaps, bins=min(30, max(1, len(gaps))))
    ax.set_xlabel(f"score gap (winner - loser), {metric_label(metric_weights(cfg))}")
    ax.set_ylabel("pairs")
    fig.tight_layout()
    io.atomic_write(outdir / "gap_histogram.png", lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    gap_stats = (
        {"min": float(gaps.min()), "median": float(np.median(gaps)), "max": float(gaps.max())}
        if len(gaps)
        else {}
    )
    summary = {
        **counts,
        "gap": gap_stats,
        "metric": metric_label(metric_weights(cfg)),
        "weights": metric_weights(cfg),
        "pair_mode": cfg.pair_mode,
        "min_gap": cfg.min_gap,
        "seeds": [cfg.seed + k for k in range(cfg.num_images)],
        "model": _model_label(cfg),
        "command": command,
    }
    io.write_json(outdir / "pairs_summary.json", summary)
    gap_line = (
        f"min {gap_stats['min']:.4g}, median {gap_stats['median']:.4g}, max {gap_stats['max']:.4g}"
        if gap_stats
        else "no pairs"
    )
    card = f"""# On-policy preference pairs

Built by `python -m eval.pairs` (generate -> score -> pair). Pick-a-Pic schema: `jpg_0` is the
winner, `jpg_1` the loser, `label_0` = 1; train with `python train.py --train_data_dir <this
folder>`.

| | |
|---|---|
| prompts | {counts["prompts"]} |
| images per prompt | {cfg.num_images} (seeds {summary["seeds"]}) |
| images | {counts["images"]} |
| pairs | {counts["pairs"]} ({cfg.pair_mode}, gap > {cfg.min_gap:g}) |
| prompts without a pair (ties) | {counts["prompts_without_pair"]} |
| model | `{summary["model"]}` |
| score | `{summary["metric"]}` |
| gap | {gap_line} |

![gap histogram](gap_histogram.png)

Provenance columns: `model_0`/`model_1`, `seed_0`/`seed_1`, `score_0`/`score_1` (the combined
score), `metric`, one `<metric>_0`/`<metric>_1` per metric (raw), `prompt_index`, `image_0`/
`image_1` (the generated PNGs under `work/`).

Command:

```
{command}
```
"""
    io.write_text(outdir / "README.md", card)
    return summary


def _model_label(cfg: PairsConfig) -> str:
    base = cfg.pretrained_model_name_or_path or "default base"
    return f"{base} + {cfg.unet_path}" if cfg.unet_path else base


# ----------------------------------------------------------------------------------------------
# Driver


def run(cfg: PairsConfig, state, *, scorer_factory=None, command: str | None = None) -> dict:
    """All stages; returns the summary (main process) or ``{}``. ``state``: an accelerate
    ``PartialState`` or a stand-in (see :func:`eval.generate.run`)."""
    from eval.generate import make_plan
    from eval.generate import run as generate
    from eval.score import ScoreConfig, read_scores, score_manifests, scores_path

    validate(cfg)
    weights = metric_weights(cfg)
    outdir = Path(cfg.outdir)
    if state.is_main_process:
        prompts = prompt_source(cfg)
    state.wait_for_everyone()
    prompts = prompt_source(cfg) if not state.is_main_process else prompts
    configs = [generate_config(cfg, prompts, k) for k in range(cfg.num_images)]
    for gcfg in configs:
        make_plan(gcfg)  # every input checked before the first model loads
    if scorer_factory is None and state.is_main_process:
        from eval.scorers import resolve_weights

        # Missing scorer weights fail now, not after hours of generation.
        for m in weights:
            resolve_weights(m, **cfg.weights.get(m, {}))
    manifests = [generate(gcfg, state) for gcfg in configs]
    if not state.is_main_process:
        state.wait_for_everyone()
        return {}
    score_manifests(
        ScoreConfig(
            manifests=[str(m) for m in manifests],
            metrics=list(weights),
            device=cfg.score_device,
            batch_size=cfg.score_batch_size,
            weights=cfg.weights,
        ),
        scorer_factory=scorer_factory,
    )
    records = [read_scores(scores_path(m)) for m in manifests]
    rows, counts = build_pairs(
        records,
        manifests,
        weights,
        mode=cfg.pair_mode,
        min_gap=cfg.min_gap,
        model=_model_label(cfg),
        seeds=[c.seed for c in configs],
    )
    write_shards(rows, outdir / "data", cfg.shard_size, outdir)
    command = command or "python -m eval.pairs " + shlex.join(cfg.argv)
    summary = write_card(outdir, counts, rows, cfg, command)
    print(
        f"{counts['pairs']} pairs from {counts['prompts']} prompts x {cfg.num_images} images "
        f"-> {outdir / 'data'}",
        flush=True,
    )
    state.wait_for_everyone()
    return summary


def main(cfg: PairsConfig, *, scorer_factory=None) -> dict:
    from accelerate import PartialState

    return run(cfg, PartialState(cpu=cfg.device == "cpu"), scorer_factory=scorer_factory)


if __name__ == "__main__":
    from eval.generate import GenerationError
    from eval.prompts import PromptSetError

    _cfg = parse_args()
    try:
        main(_cfg)
    except (PairsError, GenerationError, PromptSetError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
