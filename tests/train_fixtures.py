"""Shared helpers of the training tests: tiny model folders, synthetic Pick-a-Pic, CLI args."""

from __future__ import annotations

from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def build_models(root: Path) -> dict[str, Path]:
    """Tiny SD1.5- and SDXL-style pipeline folders under ``root``."""
    from sdpo.testing.tiny import build_tiny_sd15, build_tiny_sdxl

    return {"sd15": build_tiny_sd15(root / "sd15"), "sdxl": build_tiny_sdxl(root / "sdxl")}


def train_args(model: Path, data: Path, out: Path, *extra: str, sdxl: bool = False) -> list[str]:
    """A small deterministic CPU run: 32 px, 2 pairs per batch, 2 steps, lr big enough to move."""
    args = [
        "--pretrained_model_name_or_path",
        str(model),
        "--train_data_dir",
        str(data),
        "--output_dir",
        str(out),
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        "2",
        "--mixed_precision",
        "no",
        "--report_to",
        "none",
        "--seed",
        "7",
        "--learning_rate",
        "1e-4",
        "--lr_warmup_steps",
        "1",
        "--checkpointing_steps",
        "100",
    ]
    if sdxl:
        args.append("--sdxl")
    return args + list(extra)


def load_unet_state(model: Path) -> dict[str, torch.Tensor]:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def relative_gap(a: dict, b: dict, start: dict) -> float:
    """‖a − b‖ / ‖a − start‖ over all parameters: how far two runs differ, relative to the update."""
    num = sum(float((a[k].float() - b[k].float()).square().sum()) for k in a)
    den = sum(float((a[k].float() - start[k].float()).square().sum()) for k in a)
    return (num / den) ** 0.5


def load_tiny_parts(model: Path, resolution: int = 32):
    """:class:`sdpo.families.ModelParts` of a tiny SD1.5 folder, frozen on the CPU in float32."""
    from sdpo.families import ModelSource, get_family

    parts = get_family("sd15").load_parts(ModelSource(str(model)), resolution=resolution)
    parts.freeze_and_place("cpu", torch.float32)
    return parts
