"""FLOPs of a UNet forward / backward, counted on a shape-only copy (the benchmark's MFU)."""

from __future__ import annotations

import torch


def unet_flops_per_image(
    unet, resolution: int, *, backward: bool = False, vae_scale_factor: int = 8
) -> int:
    """FLOPs of one UNet forward (``backward=True``: forward + backward w.r.t. every parameter
    that requires grad) on ONE image at ``resolution`` pixels (latent side
    ``resolution // vae_scale_factor``).

    Counted with :class:`torch.utils.flop_counter.FlopCounterMode` on a ``meta``-device copy of
    the architecture (shapes only, no arithmetic, runs on any machine in about a second):
    matmuls, convolutions and attention (2 FLOPs per multiply-add); elementwise ops, norms and
    activations are not counted (the usual MFU convention).
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = dict(unet.config)
    latent = resolution // vae_scale_factor
    device = "meta"
    x = torch.randn(1, cfg["in_channels"], latent, latent, device=device)
    t = torch.tensor([500], device=device)
    hidden = torch.randn(1, 77, cfg["cross_attention_dim"], device=device)
    kwargs = {}
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, device=device),
            "time_ids": torch.randn(1, 6, device=device),
        }
    meta_unet = _meta_copy(unet)
    with FlopCounterMode(display=False) as counter:
        out = meta_unet(x, t, encoder_hidden_states=hidden, **kwargs).sample
        if backward:
            out.float().square().mean().backward()
    return int(counter.get_total_flops())


def _meta_copy(module):
    """The same module (peft adapters and ``requires_grad`` included) on the meta device."""
    if next(module.parameters()).device.type == "meta":
        return module
    return _shell(module)


def _shell(module):
    """A deep copy of ``module`` with every parameter/buffer replaced by an empty meta tensor,
    built without copying the real data."""
    import copy

    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        if isinstance(t, torch.nn.Parameter):
            meta = torch.nn.Parameter(meta, requires_grad=t.requires_grad)
        memo[id(t)] = meta
    return copy.deepcopy(module, memo)
