"""The toy's tiny SD1.5-style model folder (a deterministic VAE and a narrow UNet)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

VAE_LOGVAR = -30.0  # the floor DiagonalGaussianDistribution clamps to: posterior std e^-15


def build_toy_model(
    path: Path, images: np.ndarray, *, image_size: int, unet_channels=(16, 32), seed: int = 0
) -> Path:
    """A tiny SD1.5-style folder fit for the toy task; returns ``path``.

    Starts from :func:`sdpo.testing.tiny.build_tiny_sd15` and changes two things, through diffusers:

    - the VAE posterior is made deterministic (log-variance pinned to its floor) and
      ``scaling_factor`` is set so the toy images' latents have unit standard deviation, as
      SD's 0.18215 does for real images. A random VAE otherwise samples latents whose noise
      (std ~1) drowns the image (std ~0.2), and the preference would be invisible to the UNet;
    - the UNet is narrower (``unet_channels``), for speed on a CPU.

    ``images``: ``[N, 3, H, W]`` in [-1, 1], used only to measure the latent scale.
    """
    import torch
    from diffusers import AutoencoderKL

    from sdpo.testing.tiny import build_tiny_sd15

    latent_size = image_size // 2  # the tiny VAE downsamples by 2
    path = Path(path)
    build_tiny_sd15(
        path, seed=seed, sample_size=latent_size, block_out_channels=tuple(unet_channels)
    )

    vae = AutoencoderKL.from_pretrained(path / "vae")
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # rows [mean | logvar]
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = VAE_LOGVAR
        x = torch.from_numpy(images[:64]).float()
        std = vae.encode(x).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.save_pretrained(path / "vae")
    return path
