"""The optional speed-ups of ``train.py`` in one place (every one off by default).

* ``--precomputed_dir``: batches of cached VAE posteriors and text embeddings
  (:mod:`sdpo.data.cached`) instead of images and captions; the VAE and text encoders then stay
  on the CPU.
* ``--lora_rank`` > 0: LoRA adapters (:mod:`sdpo.lora`); the reference is the same denoiser with
  its adapters disabled, so no second copy is held.
* ``--channels_last``: NHWC memory format for the denoiser(s) (faster convolutions on tensor cores).
* ``--torch_compile``: ``torch.compile`` of the policy (and of the reference copy).
* ``--use_fused_adam``: the fused CUDA AdamW kernel (see :func:`sdpo.step.build_optimizer`).

Attention always runs through PyTorch's ``scaled_dot_product_attention`` (diffusers' default
``AttnProcessor2_0``: flash / memory-efficient kernels on GPUs), so there is no flag for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraSettings:
    """``--lora_rank`` / ``--lora_alpha`` / ``--lora_target_modules``."""

    rank: int
    alpha: float | None = None
    target_modules: str = "to_q,to_k,to_v,to_out.0"


@dataclass(frozen=True)
class ModelSetup:
    """How the policy and reference are set up (the training flags of the same names)."""

    cached: bool = False  # --precomputed_dir: encoders stay on the CPU
    lora: LoraSettings | None = None
    gradient_checkpointing: bool = False
    channels_last: bool = False
    torch_compile: bool = False

    @classmethod
    def from_flags(cls, cfg) -> ModelSetup:
        return cls(
            cached=bool(cfg.precomputed_dir),
            lora=LoraSettings(cfg.lora_rank, cfg.lora_alpha, cfg.lora_target_modules)
            if cfg.lora_rank > 0
            else None,
            gradient_checkpointing=cfg.gradient_checkpointing,
            channels_last=cfg.channels_last,
            torch_compile=cfg.torch_compile,
        )


def setup_models(
    parts, setup: ModelSetup, *, needs_reference: bool, device, weight_dtype, reference=None
):
    """Place the frozen parts, build the reference (``reference``: a given denoiser instead of a
    copy of the start), apply LoRA / memory format / checkpointing / compile to the policy.
    Returns ``(unet, ref_unet or None, trainable parameters)``."""
    if setup.cached:
        # Batches carry the encoders' outputs: keep the VAE / text encoders off the GPU.
        for module in (parts.vae, *parts.text_encoders):
            module.requires_grad_(False).eval()
    else:
        parts.freeze_and_place(device, weight_dtype)
    unet = parts.unet.to(device)
    ref_unet = None
    if setup.lora is not None:
        from sdpo.lora import AdapterDisabledReference, add_lora

        add_lora(unet, setup.lora.rank, setup.lora.alpha, setup.lora.target_modules)
        if needs_reference:
            ref_unet = AdapterDisabledReference(unet)
    elif needs_reference:  # frozen copy of the starting denoiser, never given to the optimizer
        if reference is not None:
            ref_unet = reference.requires_grad_(False).eval()
        else:
            ref_unet = parts.make_reference()
        ref_unet = ref_unet.to(device, dtype=weight_dtype)
    params = [p for p in unet.parameters() if p.requires_grad]
    unet.train()
    if setup.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if setup.channels_last:
        unet.to(memory_format=torch.channels_last)
        if isinstance(ref_unet, torch.nn.Module):
            ref_unet.to(memory_format=torch.channels_last)
    if setup.torch_compile:
        unet = torch.compile(unet)
        if isinstance(ref_unet, torch.nn.Module):
            ref_unet = torch.compile(ref_unet)
    return unet, ref_unet, params


def unet_state_for_eval(accelerator, unet) -> dict:
    """The plain denoiser ``state_dict`` evaluation loads (collective, like ``get_state_dict``):
    the merged weights in LoRA mode, the trained weights otherwise."""
    from sdpo.lora import has_lora, merged_unet_state_dict

    model = accelerator.unwrap_model(unet)
    if has_lora(model):
        return merged_unet_state_dict(model)
    return accelerator.get_state_dict(unet)
