"""Preference fine-tuning of diffusion models (Diffusion-DPO, DSPO, DMPO, SFT), optionally with
the SDPO winner-preserving safeguard (arXiv 2511.03317).

    accelerate launch train.py --pretrained_model_name_or_path ... --dataset_name ... [flags]
    python train.py --help

This file is only the command line: the configuration is :class:`sdpo.config.TrainConfig`, the
loop :func:`sdpo.training.main`. Outputs in --output_dir: checkpoint-N/, unet.pth, unet/,
train_log.jsonl, train_summary.json, logs/.
"""

from __future__ import annotations

from sdpo.config import TrainConfig, parse_args
from sdpo.training import cli, main

__all__ = ["TrainConfig", "cli", "main", "parse_args"]

if __name__ == "__main__":
    cli()
