"""Tiny random SD1.5- and SDXL-style diffusers folders, built offline from explicit configs.

Tests, the CPU toy demo and the CPU mode of the benchmark use these in place of real weights:
they have the real folder layout (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
``tokenizer/``, ``scheduler/`` and for SDXL ``text_encoder_2/``, ``tokenizer_2/``), so every loading
path of the project is exercised exactly as with a hub download.

The tokenizer is a character-level CLIP BPE vocabulary written by :func:`write_char_tokenizer`
(no merges): transformers ships no CLIP vocabulary and nothing may be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sdpo.testing.configs import SD_SCHEDULER

# Byte-to-unicode table of GPT-2/CLIP BPE: the 256 printable stand-ins for raw bytes.


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    extra = [b for b in range(256) if b not in printable]
    codes = printable + [256 + i for i in range(len(extra))]
    return [chr(c) for c in codes]


TINY_VOCAB_SIZE = 1000  # text encoders are built with this many embeddings (> the 514 tokens used)


def write_char_tokenizer(path: str | Path, *, pad_token: str = "<|endoftext|>") -> Path:
    """Write a CLIP tokenizer folder whose vocabulary is every byte, alone and word-final."""
    from transformers import CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained on a folder: the constructor alone gives a broken tokenizer on transformers 5.
    tok = CLIPTokenizer.from_pretrained(path, pad_token=pad_token, model_max_length=77)
    tok.save_pretrained(path)
    return path


def _text_encoder_config(*, hidden: int, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    tok_size = 2 * 256  # byte tokens, then the two specials
    return CLIPTextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=5,
        max_position_embeddings=77,
        bos_token_id=tok_size,
        eos_token_id=tok_size + 1,
        pad_token_id=tok_size + 1,
        hidden_act="gelu",
        projection_dim=projection_dim or hidden,
    )


def _vae(block_out_channels=(32, 64)):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(
        block_out_channels=list(block_out_channels),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=4,
        norm_num_groups=min(32, block_out_channels[0]),
    )


def _scheduler():
    # The real SD1.5 / SDXL training schedule, so the tiny models are noised like the real ones.
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_SCHEDULER)


def tiny_unet_config(
    *, sdxl: bool = False, sample_size: int = 32, block_out_channels=(32, 64)
) -> dict:
    """The UNet2DConditionModel config of the tiny SD1.5 (``sdxl=False``) or SDXL UNet."""
    cfg = dict(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        block_out_channels=list(block_out_channels),
        layers_per_block=2,
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
        norm_num_groups=min(32, block_out_channels[0]),
    )
    if sdxl:
        # SDXL conditioning: two concatenated text encoders (32 + 32 = 64) and the "text_time"
        # embedding of the pooled text (32) plus the six size ids (6 * 8): 80 inputs.
        cfg.update(
            cross_attention_dim=64,
            attention_head_dim=[2, 4],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=[1, 2],
            projection_class_embeddings_input_dim=80,
        )
    else:
        cfg.update(cross_attention_dim=32, attention_head_dim=8)
    return cfg


def build_tiny_sd15(
    path: str | Path, *, seed: int = 0, sample_size: int = 32, block_out_channels=(32, 64)
) -> Path:
    """Save a tiny random SD1.5-style pipeline folder at ``path`` and return it.

    ``block_out_channels`` sets the UNet's width (the toy demo uses a narrower (16, 32)).
    """
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    pipe = StableDiffusionPipeline(
        unet=UNet2DConditionModel(
            **tiny_unet_config(sample_size=sample_size, block_out_channels=block_out_channels)
        ),
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(hidden=32)),
        tokenizer=_load_tokenizer(path / "_tok"),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _rm_tree(path / "_tok")
    return path


def build_tiny_sdxl(path: str | Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a tiny random SDXL-style pipeline folder (two text encoders) at ``path``."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    pipe = StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**tiny_unet_config(sdxl=True, sample_size=sample_size)),
        vae=_vae(),
        text_encoder=CLIPTextModel(_text_encoder_config(hidden=32)),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_encoder_config(hidden=32, projection_dim=32)
        ),
        tokenizer=_load_tokenizer(path / "_tok"),
        tokenizer_2=_load_tokenizer(path / "_tok2", pad_token="!"),
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _rm_tree(path / "_tok")
    _rm_tree(path / "_tok2")
    return path


def build_tiny_sdxl_refiner(path: str | Path, *, seed: int = 0, sample_size: int = 32) -> Path:
    """Save a tiny random SDXL-refiner-style folder: ``text_encoder_2`` only, a ``text_time``
    UNet whose added embedding takes the pooled text (32) plus five ids (5 * 8)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    unet_config = tiny_unet_config(sdxl=True, sample_size=sample_size)
    unet_config.update(cross_attention_dim=32, projection_class_embeddings_input_dim=72)
    pipe = StableDiffusionXLImg2ImgPipeline(
        unet=UNet2DConditionModel(**unet_config),
        vae=_vae(),
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=CLIPTextModelWithProjection(
            _text_encoder_config(hidden=32, projection_dim=32)
        ),
        tokenizer_2=_load_tokenizer(path / "_tok2", pad_token="!"),
        scheduler=_scheduler(),
        requires_aesthetics_score=True,
        force_zeros_for_empty_prompt=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    _rm_tree(path / "_tok2")
    return path


def _load_tokenizer(tmp: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    write_char_tokenizer(tmp, pad_token=pad_token)
    return CLIPTokenizer.from_pretrained(tmp)


def _rm_tree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Flow-matching transformers (SD3 / SD3.5, FLUX)
# ---------------------------------------------------------------------------------------------

TINY_T5_WIDTH = 32  # d_model of the tiny T5; SD3 pads the CLIP states up to it


def write_char_t5_tokenizer(path: str | Path) -> Path:
    """Write a T5 tokenizer folder (Unigram on the ``tokenizers`` library) whose vocabulary is
    every printable ASCII character, alone and word-initial (``▁a``): no sentencepiece model
    to download, and every test caption tokenizes to known pieces."""
    from transformers import T5Tokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    tok = T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)
    tok.save_pretrained(path)
    return path


def _t5_encoder(width: int = TINY_T5_WIDTH):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=TINY_VOCAB_SIZE,
            d_model=width,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            is_encoder_decoder=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _flow_vae(*, latent_channels: int, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=latent_channels,
        norm_num_groups=32,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=shift_factor,
        scaling_factor=scaling_factor,
    )


def tiny_sd3_transformer_config(*, sd35: bool = False, sample_size: int = 16) -> dict:
    """SD3Transformer2DModel config: 4 latent channels, patch 2, joint width = the T5 width
    (CLIP-L 16 + CLIP-G 16 = 32 ≤ 32, so nothing is cropped). ``sd35``: SD3.5-Medium-style
    (MMDiT-X dual attention in the first layer and RMS qk-norm)."""
    cfg = dict(
        sample_size=sample_size,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_projection_dim=32,
        joint_attention_dim=TINY_T5_WIDTH,
        pooled_projection_dim=32,
        pos_embed_max_size=sample_size,  # ≥ latent side / patch
    )
    if sd35:
        cfg.update(dual_attention_layers=(0,), qk_norm="rms_norm")
    return cfg


def build_tiny_sd3(
    path: str | Path, *, seed: int = 0, sd35: bool = False, sample_size: int = 16
) -> Path:
    """Save a tiny random SD3-style (``sd35``: SD3.5-style) pipeline folder at ``path``.

    Latents of 32-pixel images are 16×16 (the VAE halves once); ``sample_size`` is the
    transformer's latent side."""
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    path = Path(path)
    torch.manual_seed(seed)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(
            **tiny_sd3_transformer_config(sd35=sd35, sample_size=sample_size)
        ),
        vae=_flow_vae(latent_channels=4, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(
            _text_encoder_config(hidden=16, projection_dim=16)
        ),
        text_encoder_2=CLIPTextModelWithProjection(
            _text_encoder_config(hidden=16, projection_dim=16)
        ),
        text_encoder_3=_t5_encoder(),
        tokenizer=_load_tokenizer(path / "_tok"),
        tokenizer_2=_load_tokenizer(path / "_tok2", pad_token="!"),
        tokenizer_3=_load_t5_tokenizer(path / "_tok3"),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for sub in ("_tok", "_tok2", "_tok3"):
        _rm_tree(path / sub)
    return path


def tiny_flux_transformer_config(*, guidance_embeds: bool = True) -> dict:
    """FluxTransformer2DModel config: packed 2×2 latents of 4 channels (16 inputs), rope axes
    summing to the head width, guidance embedding as FLUX.1-dev."""
    return dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )


def build_tiny_flux(path: str | Path, *, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Save a tiny random FLUX-style pipeline folder at ``path`` (dev-like: guidance embedding;
    ``guidance_embeds=False``: schnell-like)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    path = Path(path)
    torch.manual_seed(seed)
    pipe = FluxPipeline(
        transformer=FluxTransformer2DModel(
            **tiny_flux_transformer_config(guidance_embeds=guidance_embeds)
        ),
        vae=_flow_vae(latent_channels=4, shift_factor=0.1159, scaling_factor=0.3611),
        text_encoder=CLIPTextModel(_text_encoder_config(hidden=32, projection_dim=32)),
        text_encoder_2=_t5_encoder(),
        tokenizer=_load_tokenizer(path / "_tok"),
        tokenizer_2=_load_t5_tokenizer(path / "_tok2"),
        # FLUX.1-dev's schedule: resolution-dependent shift at sampling, none in the sigmas.
        scheduler=FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000,
            shift=3.0,
            use_dynamic_shifting=True,
            base_shift=0.5,
            max_shift=1.15,
            base_image_seq_len=256,
            max_image_seq_len=4096,
        ),
    )
    pipe.save_pretrained(path, safe_serialization=True)
    for sub in ("_tok", "_tok2"):
        _rm_tree(path / sub)
    return path


def _load_t5_tokenizer(tmp: Path):
    from transformers import T5Tokenizer

    write_char_t5_tokenizer(tmp)
    return T5Tokenizer.from_pretrained(tmp)
