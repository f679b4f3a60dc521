"""Random-weight real-size SD1.5 / SDXL / SD3.5-M / FLUX.1-dev models built from
:mod:`sdpo.testing.configs`.

They stand in for downloaded pipelines in the benchmark and in parameter-count tests.

Building: modules are created on the ``meta`` device (no memory, ~0.2 s for 860 M parameters),
then materialised with :meth:`torch.nn.Module.to_empty` and filled by :func:`random_init_`, which
draws every tensor in one call on the target device. PyTorch's own per-layer initialisation of the
SD1.5 UNet takes ~20 s on a CPU; this takes a few seconds and well under one on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sdpo.testing.configs import (
    CLIP_L_TEXT,
    DEFAULT_RESOLUTION,
    FAMILIES,
    FLUX_DEV_TRANSFORMER,
    FLUX_SCHEDULER,
    FLUX_VAE,
    OPENCLIP_BIGG_TEXT,
    SD3_SCHEDULER,
    SD3_VAE,
    SD15_UNET,
    SD15_VAE,
    SD35M_TRANSFORMER,
    SD_SCHEDULER,
    SDXL_UNET,
    SDXL_VAE,
    T5_XXL_ENCODER,
)

# Per family: (diffusers denoiser class, its config), the VAE config, and the text encoders as
# (transformers class, config kind, config); the scheduler (class, config).
DENOISERS = {
    "sd15": ("UNet2DConditionModel", SD15_UNET),
    "sdxl": ("UNet2DConditionModel", SDXL_UNET),
    "sd3": ("SD3Transformer2DModel", SD35M_TRANSFORMER),
    "flux": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
}
VAES = {"sd15": SD15_VAE, "sdxl": SDXL_VAE, "sd3": SD3_VAE, "flux": FLUX_VAE}
TEXT_ENCODERS = {
    "sd15": [("CLIPTextModel", "clip", CLIP_L_TEXT)],
    "sdxl": [
        ("CLIPTextModel", "clip", CLIP_L_TEXT),
        ("CLIPTextModelWithProjection", "clip", OPENCLIP_BIGG_TEXT),
    ],
    "sd3": [
        ("CLIPTextModelWithProjection", "clip", CLIP_L_TEXT),
        ("CLIPTextModelWithProjection", "clip", OPENCLIP_BIGG_TEXT),
        ("T5EncoderModel", "t5", T5_XXL_ENCODER),
    ],
    "flux": [("CLIPTextModel", "clip", CLIP_L_TEXT), ("T5EncoderModel", "t5", T5_XXL_ENCODER)],
}
SCHEDULERS = {
    "sd15": ("DDPMScheduler", SD_SCHEDULER),
    "sdxl": ("DDPMScheduler", SD_SCHEDULER),
    "sd3": ("FlowMatchEulerDiscreteScheduler", SD3_SCHEDULER),
    "flux": ("FlowMatchEulerDiscreteScheduler", FLUX_SCHEDULER),
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


_POOL_SIZE = (1 << 20) + 7  # prime-ish length, so tiles of successive rows do not line up


@torch.no_grad()
def random_init_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with PyTorch-like default values, fast, deterministically from ``seed``.

    Linear / conv weights: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's default bound);
    embeddings: N(0, 0.02) (CLIP's init); norm weights 1; biases 0. Integer ``position_ids``
    buffers (CLIP) are reset to ``arange``; any other buffer is an error (it would be garbage after
    ``to_empty``).

    On a GPU every element is drawn independently. On a CPU, drawing 860 M numbers costs ~8 s,
    so each tensor is tiled from one pool of ~1 M uniform numbers at a random offset (values that
    repeat every ~1 M elements: fine for timing and FLOP runs, which is all CPU real-size
    models are for).
    """
    device = next(module.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    pool = None
    if device.type == "cpu":
        pool = torch.rand(2 * _POOL_SIZE, generator=gen) * 2 - 1
    for mod in module.modules():
        for name, param in mod.named_parameters(recurse=False):
            if name == "bias":
                param.zero_()
            elif isinstance(mod, torch.nn.Embedding):
                param.normal_(0.0, 0.02, generator=gen)
            elif param.ndim == 1:  # GroupNorm / LayerNorm scale
                param.fill_(1.0)
            else:
                bound = 1.0 / math.sqrt(param[0].numel())
                if pool is None:
                    param.uniform_(-bound, bound, generator=gen)
                else:
                    _fill_from_pool(param, pool, gen, bound)
    for name, buf in module.named_buffers():
        if name.endswith("position_ids"):
            buf.copy_(torch.arange(buf.shape[-1], device=buf.device).expand_as(buf))
        elif name.endswith("pos_embed") and buf.is_floating_point():
            # SD3's fixed sin-cos position table: any values of its scale time the same.
            buf.normal_(0.0, 0.02, generator=gen)
        else:
            raise ValueError(f"random_init_: no rule for buffer {name!r}")
    return module


def _fill_from_pool(param: torch.Tensor, pool: torch.Tensor, gen, bound: float) -> None:
    flat = param.view(-1)
    start = int(torch.randint(0, _POOL_SIZE, (1,), generator=gen))
    for offset in range(0, flat.numel(), _POOL_SIZE):
        chunk = flat[offset : offset + _POOL_SIZE]
        chunk.copy_(pool[start : start + chunk.numel()]).mul_(bound)


def _materialise(module, device, dtype, seed: int):
    if torch.device(device).type == "meta":
        return module if dtype == torch.float32 else module.to(dtype=dtype)
    module = module.to_empty(device=device)
    random_init_(module, seed)
    return module if dtype == torch.float32 else module.to(dtype=dtype)


def build_unet(family: str = "sd15", *, device="meta", dtype=torch.float32, seed: int = 0):
    """The family's random-weight real-size denoiser (a UNet, or the SD3 / FLUX transformer;
    ``device='meta'``: shapes only)."""
    import diffusers

    _check_family(family)
    cls_name, config = DENOISERS[family]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    return _materialise(model, device, dtype, seed)


def build_vae(family: str = "sd15", *, device="meta", dtype=torch.float32, seed: int = 1):
    from diffusers import AutoencoderKL

    _check_family(family)
    with torch.device("meta"):
        vae = AutoencoderKL(**VAES[family])
    return _materialise(vae, device, dtype, seed)


def build_text_encoders(family: str = "sd15", *, device="meta", dtype=torch.float32, seed=2):
    """The family's text encoders: ``[CLIP-L]`` (SD1.5), ``[CLIP-L, OpenCLIP-bigG with
    projection]`` (SDXL), ``[CLIP-L, CLIP-G, T5-XXL]`` (SD3), ``[CLIP-L, T5-XXL]`` (FLUX)."""
    import transformers

    _check_family(family)
    config_cls = {"clip": transformers.CLIPTextConfig, "t5": transformers.T5Config}
    encoders = []
    with torch.device("meta"):
        for cls_name, kind, config in TEXT_ENCODERS[family]:
            encoders.append(getattr(transformers, cls_name)(config_cls[kind](**config)))
    return [_materialise(e, device, dtype, seed + i) for i, e in enumerate(encoders)]


def build_scheduler(family: str = "sd15"):
    import diffusers

    cls_name, config = SCHEDULERS[family]
    return getattr(diffusers, cls_name)(**config)


def build_model_parts(
    family: str,
    tokenizer_dir: str | Path,
    *,
    device="cpu",
    dtype=torch.float32,
    resolution: int | None = None,
    unet=None,
    vae=None,
    text_encoders=None,
):
    """A :class:`sdpo.families.ModelParts` of random real-size models (the benchmark's stand-in for a
    downloaded pipeline). Tokenizers are the character-level CLIP tokenizers of
    :func:`sdpo.testing.tiny.write_char_tokenizer` (ids < 514, inside CLIP's 49,408-entry
    vocabulary) written under ``tokenizer_dir``. Pass ``unet`` / ``vae`` / ``text_encoders`` to use tiny or
    pre-built modules instead.
    """
    from transformers import CLIPTokenizer

    from sdpo.families import get_family
    from sdpo.testing.tiny import write_char_tokenizer

    _check_family(family)
    # One character-level tokenizer per text encoder (the real-size rows run from cached
    # conditioning, so the vocabulary only has to fit); SDXL's second pads with "!" as published.
    tokenizers = []
    for i in range(len(TEXT_ENCODERS[family])):
        pad = "!" if i == 1 else "<|endoftext|>"
        path = write_char_tokenizer(Path(tokenizer_dir) / f"t{i + 1}", pad_token=pad)
        tokenizers.append(CLIPTokenizer.from_pretrained(path))
    return get_family(family).parts_from_modules(
        unet=unet if unet is not None else build_unet(family, device=device, dtype=dtype),
        vae=vae if vae is not None else build_vae(family, device=device, dtype=dtype),
        text_encoders=text_encoders
        if text_encoders is not None
        else build_text_encoders(family, device=device, dtype=dtype),
        tokenizers=tokenizers,
        scheduler=build_scheduler(family),
        resolution=resolution or DEFAULT_RESOLUTION[family],
    )
