"""The toy's tiny model folders: SD1.5-style (a deterministic VAE and a narrow UNet) or, with
``--flow``, SD3-style (the same deterministic VAE and a tiny flow-matching transformer)."""

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


def build_toy_flow_model(path: Path, images: np.ndarray, *, image_size: int, seed: int = 0) -> Path:
    """A tiny SD3-style folder fit for the toy task (``--flow``); returns ``path``.

    :func:`sdpo.testing.tiny.build_tiny_sd3` with the latent side of the toy, and its VAE
    replaced by one whose posterior is deterministic as in :func:`build_toy_model` (a VAE with
    ``quant_conv``, log-variance pinned), with ``shift_factor`` / ``scaling_factor`` set so the
    toy images' latents have zero mean and unit standard deviation, as SD3's own do.
    """
    import torch
    from diffusers import AutoencoderKL

    from sdpo.testing.tiny import build_tiny_sd3

    latent_size = image_size // 2  # the tiny VAE downsamples by 2
    path = Path(path)
    build_tiny_sd3(path, seed=seed, sample_size=latent_size)
    config = AutoencoderKL.load_config(path / "vae")
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(config, use_quant_conv=True, use_post_quant_conv=True)
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # rows [mean | logvar]
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = VAE_LOGVAR
        x = torch.from_numpy(images[:64]).float()
        mean = vae.encode(x).latent_dist.mean
    vae.register_to_config(shift_factor=mean.mean().item(), scaling_factor=1.0 / mean.std().item())
    vae.save_pretrained(path / "vae")
    return path
