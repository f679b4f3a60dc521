"""FLOPs of a denoiser forward / backward, counted on a shape-only copy (the benchmark's MFU)."""

from __future__ import annotations

import torch


def unet_flops_per_image(unet, family, latent_shape, *, backward: bool = False) -> int:
    """FLOPs of one denoiser forward (``backward=True``: forward + backward w.r.t. every
    parameter that requires grad) on ONE image whose latents have ``latent_shape``
    ``(channels, h, w)`` (SD1.5 / SDXL: ``(4, R/8, R/8)`` at R pixels).

    The denoiser is called the way training calls it, ``family.predict(denoiser, noisy, t,
    cond)`` with ``cond = family.dummy_cond(...)`` (:mod:`sdpo.families`: SDXL's pooled text and
    size ids included), so every family is counted through its own conditioning.

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a ``meta``-device copy of
    the architecture (shapes only, no arithmetic, runs on any machine in about a second):
    matmuls, convolutions and attention (2 FLOPs per multiply-add); elementwise ops, norms and
    activations are not counted (the usual MFU convention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    device = "meta"
    x = torch.randn(1, *latent_shape, device=device)
    t = torch.full((1,), 500, device=device)  # a mid-schedule step; the cost does not depend on it
    cond = family.dummy_cond(dict(unet.config), 1, device)
    meta_unet = _shell(unet)
    if getattr(meta_unet, "is_gradient_checkpointing", False):
        meta_unet.disable_gradient_checkpointing()  # MFU counts no recomputation
    with FlopCounterMode(display=False) as counter:
        out = family.predict(meta_unet, x, t, cond)
        if backward:
            out.float().square().mean().backward()
    return int(counter.get_total_flops())


def _shell(module):
    """A deep copy of ``module`` (peft adapters and ``requires_grad`` included) with every
    parameter/buffer replaced by an empty meta tensor, built without copying the real data."""
    import copy

    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, torch.nn.Parameter):
            meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(module, memo)
