"""Generation throughput: images/s at batch 1 vs batched, with the same images.

Uses :func:`eval.generate.generate_batch` and :func:`eval.generate.shared_noise` (the evaluation's
own code path: Euler scheduler, guidance ``cond + cfg·(cond − uncond)``, one shared initial noise,
VAE decode in fp32 one image at a time) on a pipeline assembled from the given random-weight
models. "Same images": every prompt is generated once alone and once inside a batch, and the
two uint8 images are compared (maximum absolute pixel difference and the share identical).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch


def build_pipeline(parts, *, device, dtype):
    """The family's diffusers pipeline from a :class:`sdpo.families.ModelParts` (denoiser and
    text encoders in ``dtype``, VAE in fp32, Euler scheduler from the training schedule's config)."""
    pipe = parts.family.pipeline_from_parts(parts)
    pipe.to(device)
    pipe.unet.to(dtype=dtype)
    for enc in parts.text_encoders:
        enc.to(dtype=dtype)
    pipe.vae.to(dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def bench_generation(
    parts, *, device, dtype, resolution: int, prompts: list[str], batch: int, steps: int
) -> dict:
    """Images/s at batch 1 and at ``batch``; pixel agreement of the two sets of images.

    One warm-up call per batch size (excluded), then one timed pass over all ``prompts``."""
    from eval.generate import GenerateConfig, Plan, generate_batch, shared_noise

    pipe = build_pipeline(parts, device=device, dtype=dtype)
    # In-memory models: a plan with no files (generate_batch reads only the image size).
    plan = Plan(
        base="bench (in-memory random weights)",
        family=parts.family,
        unet_kind="base",
        unet_file=None,
        vae=None,
        height=resolution,
        width=resolution,
        entries=[],
        manifest=Path("-"),
        image_dir=Path("-"),
        provenance={},
    )
    gen_cfg = GenerateConfig(prompts="bench", outdir="-", steps=steps, cfg=7.5)
    noise = shared_noise(pipe, resolution, resolution, 0, device)

    def run(size: int):
        generate_batch(pipe, prompts[:size], noise, plan, gen_cfg)  # warm-up
        _sync(device)
        start = time.perf_counter()
        images = []
        for i in range(0, len(prompts), size):
            images += generate_batch(pipe, prompts[i : i + size], noise, plan, gen_cfg)
        _sync(device)
        return images, time.perf_counter() - start

    single, t_single = run(1)
    batched, t_batched = run(batch)
    diffs = [
        int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
        for a, b in zip(single, batched)
    ]
    return {
        "images": len(prompts),
        "steps": steps,
        "batch": batch,
        "images_per_s_batch1": len(prompts) / t_single,
        "images_per_s_batched": len(prompts) / t_batched,
        "speedup": t_single / t_batched,
        "max_pixel_diff": max(diffs),
        "identical_fraction": sum(d == 0 for d in diffs) / len(diffs),
    }
