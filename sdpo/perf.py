"""The optional speed-ups of ``train.py`` in one place (every one off by default).

* ``--precomputed_dir``: batches of cached VAE posteriors and text embeddings (:mod:`sdpo.cache`)
  instead of images and captions; the VAE and text encoders then stay on the CPU.
* ``--lora_rank`` > 0: LoRA adapters (:mod:`sdpo.lora`); the reference is the same UNet with its
  adapters disabled, so no second UNet is held.
* ``--channels_last``: NHWC memory format for the UNet(s) (faster convolutions on tensor cores).
* ``--torch_compile``: ``torch.compile`` of the policy UNet (and of the reference copy).
* ``--use_fused_adam``: the fused CUDA AdamW kernel (see :func:`sdpo.step.build_optimizer`).

Attention always runs through PyTorch's ``scaled_dot_product_attention`` (diffusers' default
``AttnProcessor2_0``: flash / memory-efficient kernels on GPUs), so there is no flag for it.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def build_loader(cfg, *, paired: bool, seed: int):
    """``(loader, dataset, sampler, info)`` from the cache when ``--precomputed_dir`` is set (the
    cache is checked against the flags first), else from the images."""
    if getattr(cfg, "precomputed_dir", None):
        from sdpo.cache import build_cached_dataloader

        return build_cached_dataloader(cfg, paired=paired, seed=seed)
    from sdpo.data import build_dataloader

    return build_dataloader(cfg, paired=paired, seed=seed)


def setup_models(cfg, parts, spec, device, weight_dtype):
    """Place the frozen parts, build the reference, apply LoRA / memory format / checkpointing /
    compile to the policy. Returns ``(unet, ref_unet or None, trainable parameters)``."""
    if getattr(cfg, "precomputed_dir", None):
        # Batches carry the encoders' outputs: keep the VAE / text encoders off the GPU.
        for module in (parts.vae, *parts.text_encoders):
            module.requires_grad_(False).eval()
    else:
        parts.freeze_and_place(device, weight_dtype)
    unet = parts.unet.to(device)
    ref_unet = None
    if getattr(cfg, "lora_rank", 0) > 0:
        from sdpo.lora import AdapterDisabledReference, add_lora

        add_lora(unet, cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
        if spec.needs_reference:
            ref_unet = AdapterDisabledReference(unet)
    elif spec.needs_reference:  # frozen copy of the starting UNet, never given to the optimizer
        ref_unet = parts.make_reference().to(device, dtype=weight_dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if getattr(cfg, "channels_last", False):
        unet.to(memory_format=torch.channels_last)
        if isinstance(ref_unet, torch.nn.Module):
            ref_unet.to(memory_format=torch.channels_last)
    if getattr(cfg, "torch_compile", False):
        unet = torch.compile(unet)
        if isinstance(ref_unet, torch.nn.Module):
            ref_unet = torch.compile(ref_unet)
    return unet, ref_unet, params


def unet_state_for_eval(accelerator, unet) -> dict:
    """The plain UNet ``state_dict`` evaluation loads (collective, like ``get_state_dict``): the
    merged weights in LoRA mode, the trained weights otherwise."""
    from sdpo.lora import has_lora, merged_unet_state_dict

    model = accelerator.unwrap_model(unet)
    if has_lora(model):
        return merged_unet_state_dict(model)
    return accelerator.get_state_dict(unet)
