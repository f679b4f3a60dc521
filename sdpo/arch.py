"""Real-size SD1.5 / SDXL architectures written out as explicit configs, with random weights.

The configs are the published ``config.json`` files of ``stable-diffusion-v1-5/stable-diffusion-v1-5``
and ``stabilityai/stable-diffusion-xl-base-1.0`` (UNet, VAE, text encoders, DDPM scheduler), copied
field by field so that nothing is downloaded. They serve the benchmark (``bench/``) and FLOP
counting; training loads real weights through :mod:`sdpo.family`.

Parameter counts (checked by ``tests/test_arch.py``):

===================  ==============
SD1.5 UNet           859,520,964
SD1.5 / SDXL VAE      83,653,863
CLIP-L text encoder  123,060,480
SDXL UNet          2,567,463,684
OpenCLIP bigG text   694,659,840   (CLIPTextModelWithProjection, 1280-d projection)
===================  ==============

Building: modules are created on the ``meta`` device (no memory, ~0.2 s for 860 M parameters),
then materialised with :meth:`torch.nn.Module.to_empty` and filled by :func:`random_init_`, which
draws every tensor in one call on the target device. PyTorch's own per-layer initialisation of the
SD1.5 UNet takes ~20 s on a CPU; this takes a few seconds and well under one on a GPU.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

FAMILIES = ("sd15", "sdxl")

SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=[
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)

SDXL_UNET = dict(
    act_fn="silu",
    addition_embed_type="text_time",
    addition_embed_type_num_heads=64,
    addition_time_embed_dim=256,
    attention_head_dim=[5, 10, 20],
    block_out_channels=[320, 640, 1280],
    center_input_sample=False,
    cross_attention_dim=2048,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
    norm_num_groups=32,
    out_channels=4,
    projection_class_embeddings_input_dim=2816,  # 1280 pooled text + 6 size ids x 256
    sample_size=128,
    transformer_layers_per_block=[1, 2, 10],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    use_linear_projection=True,
)

_VAE_COMMON = dict(
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    in_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    out_channels=3,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
SD15_VAE = dict(_VAE_COMMON, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(_VAE_COMMON, sample_size=1024, scaling_factor=0.13025, force_upcast=True)

# CLIP ViT-L/14 text tower (SD1.5's text encoder and SDXL's first one). eos_token_id = 2 keeps
# transformers' legacy pooling (argmax of the token ids = the end-of-text token).
CLIP_L_TEXT = dict(
    hidden_act="quick_gelu",
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    max_position_embeddings=77,
    vocab_size=49408,
    projection_dim=768,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# OpenCLIP ViT-bigG/14 text tower (SDXL's second encoder, with its 1280-d text projection).
OPENCLIP_BIGG_TEXT = dict(
    CLIP_L_TEXT,
    hidden_act="gelu",
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
)

# The SD1.5 / SDXL training noise schedule (identical for both).
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="epsilon",
    steps_offset=1,
)

EXPECTED_PARAMS = {
    "sd15_unet": 859_520_964,
    "sd15_vae": 83_653_863,
    "clip_l_text": 123_060_480,
    "sdxl_unet": 2_567_463_684,
    "sdxl_vae": 83_653_863,
    "openclip_bigg_text": 694_659_840,
}

DEFAULT_RESOLUTION = {"sd15": 512, "sdxl": 1024}


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
    """A random-weight real-size ``UNet2DConditionModel`` (``device='meta'``: shapes only)."""
    from diffusers import UNet2DConditionModel

    _check_family(family)
    config = SD15_UNET if family == "sd15" else SDXL_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return _materialise(unet, device, dtype, seed)


def build_vae(family: str = "sd15", *, device="meta", dtype=torch.float32, seed: int = 1):
    from diffusers import AutoencoderKL

    _check_family(family)
    with torch.device("meta"):
        vae = AutoencoderKL(**(SD15_VAE if family == "sd15" else SDXL_VAE))
    return _materialise(vae, device, dtype, seed)


def build_text_encoders(family: str = "sd15", *, device="meta", dtype=torch.float32, seed=2):
    """``[CLIP-L]`` (SD1.5) or ``[CLIP-L, OpenCLIP-bigG with projection]`` (SDXL)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    _check_family(family)
    with torch.device("meta"):
        encoders = [CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT))]
        if family == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_TEXT)))
    return [_materialise(e, device, dtype, seed + i) for i, e in enumerate(encoders)]


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULER)


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
    """A :class:`sdpo.family.ModelParts` of random real-size models (the benchmark's stand-in for a
    downloaded pipeline). Tokenizers are the character-level CLIP tokenizers of
    :func:`sdpo.tiny.write_char_tokenizer` (ids < 514, inside CLIP's 49,408-entry vocabulary)
    written under ``tokenizer_dir``. Pass ``unet`` / ``vae`` / ``text_encoders`` to use tiny or
    pre-built modules instead.
    """
    from transformers import CLIPTokenizer

    from sdpo.family import ModelParts
    from sdpo.tiny import write_char_tokenizer

    _check_family(family)
    tokenizers = [CLIPTokenizer.from_pretrained(write_char_tokenizer(Path(tokenizer_dir) / "t1"))]
    if family == "sdxl":
        # SDXL's second tokenizer pads with "!" (as the published tokenizer_2).
        path = write_char_tokenizer(Path(tokenizer_dir) / "t2", pad_token="!")
        tokenizers.append(CLIPTokenizer.from_pretrained(path))
    return ModelParts(
        unet=unet if unet is not None else build_unet(family, device=device, dtype=dtype),
        vae=vae if vae is not None else build_vae(family, device=device, dtype=dtype),
        text_encoders=text_encoders
        if text_encoders is not None
        else build_text_encoders(family, device=device, dtype=dtype),
        tokenizers=tokenizers,
        noise_scheduler=build_scheduler(),
        resolution=resolution or DEFAULT_RESOLUTION[family],
        _sdxl=family == "sdxl",
    )


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
