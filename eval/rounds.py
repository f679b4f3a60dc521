"""Iterative on-policy preference training: N rounds of generate -> score -> pair -> train.

    python -m eval.rounds --outdir runs/iter --rounds 3 --prompts prompts.txt \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --pairs_args "--num_images 4 --metrics pickscore" \\
        --train_args "--train_method diffusion-dpo --max_train_steps 500 --mixed_precision bf16"

Round r (``{outdir}/round_{r}/``):

1. ``pairs/``: :mod:`eval.pairs` with the model entering the round (round 0: the base model;
   later: the previous round's ``unet.pth`` as ``--unet_path``), seeds ``seed + r*K ...`` so
   every round samples fresh images;
2. ``train/``: ``train.py`` (:func:`sdpo.training.main`) on ``pairs/`` starting from the previous
   round's ``unet.pth`` (``--unet_init``). The reference of the preference loss is either
   refreshed to the previous round's policy every round (``--reference refresh``, the
   iterative-DPO recipe: the reference is the denoiser training starts from) or kept at the
   original base model (``--reference base``: ``train.py --ref_unet_init base``).

``rounds_summary.json`` / ``rounds_summary.md``: per round the pairs made, the mean score of
each metric over the images the entering model generated (its reward), and the last training
step's loss and implicit accuracy. Rerunning resumes: generation and scoring skip finished work,
and a finished round's training is not repeated (training itself resumes from its checkpoints).
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from sdpo import io
from sdpo.cli import arg, parse

REFERENCES = ("refresh", "base")


@dataclass
class RoundsConfig:
    outdir: str = arg(help="one folder per round is made inside", required=True)
    prompts: str = arg(help="prompt set or file (eval format) of every round", required=True)
    pretrained_model_name_or_path: str = arg(help="base pipeline (folder or hub id)", required=True)
    rounds: int = arg(2, "number of rounds")
    reference: str = arg("refresh", "reference of each round's loss", choices=REFERENCES)
    seed: int = arg(0, "first seed; round r uses seed + r*K ... seed + r*K + K - 1")
    pairs_args: str = arg("", "extra eval.pairs flags (one string), e.g. '--num_images 4'")
    train_args: str = arg("", "extra train.py flags (one string), e.g. '--max_train_steps 500'")


def validate(cfg: RoundsConfig) -> RoundsConfig:
    if cfg.rounds < 1:
        raise ValueError(f"--rounds: must be >= 1, got {cfg.rounds}")
    return cfg


def parse_args(argv=None) -> RoundsConfig:
    return parse(
        RoundsConfig,
        argv,
        prog="python -m eval.rounds",
        description="N rounds of on-policy pairs and preference training.",
        check=validate,
    )


def _pairs_argv(cfg: RoundsConfig, r: int, unet: str | None, folder: Path) -> list[str]:
    import eval.pairs as P

    extra = shlex.split(cfg.pairs_args)
    k = P.parse_args(["--outdir", "x", "--prompts", "x", *extra]).num_images
    argv = [
        "--outdir", str(folder), "--prompts", cfg.prompts,
        "--pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
        "--seed", str(cfg.seed + r * k), *extra,
    ]  # fmt: skip
    return argv + (["--unet_path", unet] if unet else [])


def _train_argv(cfg: RoundsConfig, unet: str | None, data: Path, out: Path) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", cfg.pretrained_model_name_or_path,
        "--train_data_dir", str(data), "--output_dir", str(out),
        *shlex.split(cfg.train_args),
    ]  # fmt: skip
    if unet:
        argv += ["--unet_init", unet]
        if cfg.reference == "base":  # the policy moves on, the reference stays the base model
            argv += ["--ref_unet_init", "base"]
    return argv


def _round_row(r: int, pairs_dir: Path, train_dir: Path, unet_in: str | None) -> dict:
    from eval.score import read_scores

    summary = json.loads((pairs_dir / "pairs_summary.json").read_text())
    rewards: dict[str, list[float]] = {}
    for scores in sorted((pairs_dir / "work" / "images").glob("*.scores.jsonl")):
        for rec in read_scores(scores):
            for m in summary["weights"]:
                rewards.setdefault(m, []).append(rec[m])
    log = train_dir / "train_log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1]) if log.is_file() else {}
    return {
        "round": r,
        "model_in": unet_in or "base",
        "pairs": summary["pairs"],
        "reward": {m: sum(v) / len(v) for m, v in rewards.items()},
        "train_steps": last.get("step"),
        "train_loss": last.get("loss"),
        "implicit_acc": last.get("implicit_acc"),
        "unet_pth": str(train_dir / "unet.pth"),
    }


def format_table(rows: list[dict]) -> str:
    metrics = list(rows[0]["reward"]) if rows else []
    head = ["round", "model in", "pairs", *[f"{m} (mean)" for m in metrics], "steps", "loss", "acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    for row in rows:
        cells = [row["round"], Path(row["model_in"]).parent.parent.name or row["model_in"]]
        cells += [row["pairs"], *[row["reward"][m] for m in metrics]]
        cells += [row["train_steps"], row["train_loss"], row["implicit_acc"]]
        lines.append("| " + " | ".join(fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run(cfg: RoundsConfig, *, scorer_factory=None) -> list[dict]:
    import eval.pairs as P
    from sdpo import training
    from sdpo.config import parse_args as train_parse

    validate(cfg)
    out = Path(cfg.outdir)
    unet: str | None = None
    rows = []
    for r in range(cfg.rounds):
        folder = out / f"round_{r}"
        pairs_dir, train_dir = folder / "pairs", folder / "train"
        argv = _pairs_argv(cfg, r, unet, pairs_dir)
        P.main(P.parse_args(argv), scorer_factory=scorer_factory)
        targs = train_parse(_train_argv(cfg, unet, pairs_dir, train_dir))
        done = train_dir / "train_summary.json"
        if not (
            done.is_file() and json.loads(done.read_text())["global_step"] >= targs.max_train_steps
        ):
            training.main(targs)
        rows.append(_round_row(r, pairs_dir, train_dir, unet))
        unet = str(train_dir / "unet.pth")
        io.write_json(out / "rounds_summary.json", rows)
        io.write_text(out / "rounds_summary.md", format_table(rows))
        print(format_table(rows), flush=True)
    return rows


def main(cfg: RoundsConfig, *, scorer_factory=None) -> list[dict]:
    return run(cfg, scorer_factory=scorer_factory)


if __name__ == "__main__":
    _cfg = parse_args()
    try:
        main(_cfg)
    except ValueError as e:
        sys.exit(f"error: {e}")
