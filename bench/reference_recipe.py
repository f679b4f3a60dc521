"""Baseline emulation: one micro-step as the reference ``train.py`` computes it (for timing only).

What it reproduces of the official training script, as far as cost is concerned:

* the VAE encodes the 2B images and the text encoder(s) the B captions at EVERY step;
* the reference policy is a second, full, frozen UNet (cast to the weight dtype);
* the safeguard's λ is computed from ``torch.autograd.grad`` of the winner and loser
  mean-squared errors (two extra autograd passes), not in closed form;
* the optimizer is ``torch.optim.AdamW`` with PyTorch's defaults (foreach, not fused).

Noise, timesteps and the posterior sample come from the global RNG, as in the reference. The
loss is Diffusion-DPO with the straight-through loser scale (arXiv 2511.03317, Sec. 3), on DDPM ε-prediction
families only (the reference trains SD1.5 / SDXL). Conditioning and the denoiser call come from
the model family (:mod:`sdpo.families`). Not used for training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def autograd_lambda(model_pred: torch.Tensor, target: torch.Tensor, mu: float) -> torch.Tensor:
    """λ the reference way: gradients of mse_w and mse_l w.r.t. the (detached) predictions.
    ``model_pred``, ``target``: ``[2B, C, H, W]``, winners first. Returns a detached 0-dim λ."""
    b = model_pred.shape[0] // 2
    with torch.enable_grad():
        pred_w = model_pred[:b].detach().float().requires_grad_(True)
        pred_l = model_pred[b:].detach().float().requires_grad_(True)
        (g_w,) = torch.autograd.grad(F.mse_loss(pred_w, target[:b].float()), pred_w)
        (g_l,) = torch.autograd.grad(F.mse_loss(pred_l, target[b:].float()), pred_l)
    num = g_w.square().sum()
    den = (g_l * g_w).sum()
    lam = torch.clamp((1 - mu) * num / (den + 1e-9), 0.0, 1.0)
    return torch.where(den > 0, lam, torch.ones_like(lam)).detach()


def reference_step(
    *, parts, unet, ref_unet, pixels, captions, beta: float, mu: float, use_safeguard: bool
):
    """Loss of one micro-batch, reference style. ``pixels``: ``[2B, 3, R, R]`` (winners first);
    ``captions``: B strings; ``unet`` runs under the caller's autocast. Returns the loss."""
    b = len(captions)
    device = pixels.device
    family = parts.family
    with torch.no_grad():
        vae = parts.vae
        latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample().float()
        latents = family.scale_latents(vae, latents)
        noise = torch.randn_like(latents[:b]).repeat(2, 1, 1, 1)
        steps = parts.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (b,), device=device).repeat(2)
        noisy = parts.noise_scheduler.add_noise(latents, noise, timesteps)
        cond = _repeat(parts.encode_prompts(captions, device), 2)  # winners' copy, losers'
    model_pred = family.predict(unet, noisy, timesteps, cond).float()
    model_err = (model_pred - noise).square().mean(dim=(1, 2, 3))
    err_w, err_l = model_err.chunk(2)
    if use_safeguard:
        lam = autograd_lambda(model_pred, noise, mu)
        err_l = err_l.detach() + lam * (err_l - err_l.detach())
    with torch.no_grad():
        ref_pred = family.predict(ref_unet, noisy, timesteps, cond).float()
        ref_w, ref_l = (ref_pred - noise).square().mean(dim=(1, 2, 3)).chunk(2)
    u = -0.5 * beta * ((err_w - ref_w) - (err_l - ref_l))
    return -F.logsigmoid(u).mean()


def _repeat(cond, n: int):
    """Every tensor of a (nested) conditioning dict repeated n times along the batch."""
    if isinstance(cond, dict):
        return {k: _repeat(v, n) for k, v in cond.items()}
    return cond.repeat(n, *[1] * (cond.ndim - 1))
