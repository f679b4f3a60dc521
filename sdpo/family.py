"""Everything that differs between Stable Diffusion 1.5 and SDXL, behind one structure.

:func:`check_family` reads only the configs (``model_index.json``, ``unet/config.json``,
``scheduler/scheduler_config.json``) and rejects mismatches (``--sdxl`` with an SD1.5 folder and
vice versa, non-epsilon schedulers) before any weight is loaded. :func:`load_model_parts` returns a
:class:`ModelParts` whose ``encode_prompts`` gives the UNet's conditioning kwargs for either
family, so the training loop never asks which model it has.

Conditioning, as the reference computes it:

- SD1.5: ``encoder_hidden_states`` = last hidden state of the CLIP text encoder ``[B, 77, D]``.
- SDXL: penultimate hidden states of both encoders concatenated ``[B, 77, D1 + D2]``;
  ``added_cond_kwargs = {"text_embeds": pooled projection of encoder 2 [B, P],
  "time_ids": [H, W, 0, 0, H, W] per sample}`` (original size, crop top-left, target size).
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)


def _subfolder_config(cls, name: str, subfolder: str, revision, cache_dir) -> dict:
    return cls.load_config(name, subfolder=subfolder, revision=revision, cache_dir=cache_dir)


def check_family(cfg) -> dict:
    """Validate the base model against ``cfg.sdxl`` from its configs alone; return the UNet config.

    Raises ``ValueError`` with the flag to change when the folder is the other family, or when the
    scheduler does not predict epsilon (the losses' target is the noise).
    """
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    name, rev, cache = cfg.pretrained_model_name_or_path, cfg.revision, cfg.cache_dir
    try:
        index = DiffusionPipeline.load_config(name, revision=rev, cache_dir=cache)
        unet_config = _subfolder_config(UNet2DConditionModel, name, "unet", rev, cache)
        sched_config = _subfolder_config(DDPMScheduler, name, "scheduler", rev, cache)
    except OSError as err:
        raise ValueError(
            f"--pretrained_model_name_or_path {name!r}: cannot read the diffusers pipeline "
            f"configs (model_index.json, unet/, scheduler/): {err}"
        ) from err
    has_text_time = unet_config.get("addition_embed_type") == "text_time"
    has_encoder_2 = index.get("text_encoder_2") not in (None, [None, None])
    is_sdxl = has_text_time and has_encoder_2
    if cfg.sdxl and not is_sdxl:
        raise ValueError(
            f"--sdxl was given but {name!r} is not an SDXL pipeline (text_encoder_2: "
            f"{has_encoder_2}, UNet addition_embed_type 'text_time': {has_text_time}); "
            "drop --sdxl for SD1.5-style models"
        )
    if not cfg.sdxl and (has_text_time or has_encoder_2):
        raise ValueError(
            f"{name!r} is an SDXL-style pipeline (two text encoders / text_time UNet); pass --sdxl"
        )
    prediction = sched_config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise ValueError(
            f"{name!r}: scheduler prediction_type is {prediction!r}; the preference losses "
            "need an epsilon-prediction model"
        )
    return unet_config


@dataclass
class ModelParts:
    """The frozen encoders, the trainable UNet and the noise schedule of one base model.

    Attributes:
        unet: the UNet2DConditionModel to train (starting weights; unwrapped).
        vae: AutoencoderKL (frozen).
        text_encoders: one (SD1.5) or two (SDXL) frozen CLIP text encoders.
        tokenizers: the matching tokenizers.
        noise_scheduler: DDPMScheduler of the base model (epsilon prediction).
        resolution: training image size (for SDXL's size conditioning).
        vae_dtype_override: dtype the VAE must stay in whatever the mixed precision (SDXL's
            original VAE overflows in fp16), or None to follow the weight dtype.
    """

    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object
    resolution: int
    vae_dtype_override: torch.dtype | None = None
    _sdxl: bool = field(default=False, repr=False)

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def freeze_and_place(self, device, weight_dtype: torch.dtype) -> None:
        """Freeze VAE and text encoders (eval, no grad) and move them to ``device`` in
        ``weight_dtype`` (the VAE in ``vae_dtype_override`` when set)."""
        for module in (self.vae, *self.text_encoders):
            module.requires_grad_(False).eval()
        self.vae.to(device, dtype=self.vae_dtype_override or weight_dtype)
        for enc in self.text_encoders:
            enc.to(device, dtype=weight_dtype)

    def make_reference(self) -> torch.nn.Module:
        """A frozen copy of the starting UNet (the DPO reference policy)."""
        ref = copy.deepcopy(self.unet)
        ref.requires_grad_(False).eval()
        return ref

    @torch.no_grad()
    def encode_prompts(self, captions: list[str], device) -> dict:
        """B captions -> the UNet's conditioning kwargs (float32):
        ``{"encoder_hidden_states": [B, 77, D]}`` plus, for SDXL,
        ``"added_cond_kwargs": {"text_embeds": [B, P], "time_ids": [B, 6]}``."""
        ids = [
            tok(
                list(captions),
                padding="max_length",
                max_length=tok.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(device)
            for tok in self.tokenizers
        ]
        if not self._sdxl:
            hidden = self.text_encoders[0](ids[0], return_dict=False)[0]
            return {"encoder_hidden_states": hidden.float()}
        hiddens, pooled = [], None
        for enc, tok_ids in zip(self.text_encoders, ids):
            out = enc(tok_ids, output_hidden_states=True)
            hiddens.append(out.hidden_states[-2])
            pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (last encoder wins)
        size = self.resolution
        time_ids = torch.tensor([size, size, 0, 0, size, size], device=device, dtype=torch.float32)
        return {
            "encoder_hidden_states": torch.cat(hiddens, dim=-1).float(),
            "added_cond_kwargs": {
                "text_embeds": pooled.float(),
                "time_ids": time_ids.repeat(len(captions), 1),
            },
        }


def load_unet(cfg):
    """The UNet to train: the base model's, or ``--unet_init`` (folder, hub id, or state_dict)."""
    from diffusers import UNet2DConditionModel

    base = dict(revision=cfg.revision, cache_dir=cfg.cache_dir)
    init = cfg.unet_init
    if init and not init.endswith((".pth", ".pt", ".bin", ".safetensors")):
        sub = "unet" if os.path.isdir(os.path.join(init, "unet")) else None
        if not os.path.isdir(init):
            sub = "unet"  # a hub id of a full pipeline
        unet = UNet2DConditionModel.from_pretrained(init, subfolder=sub, cache_dir=cfg.cache_dir)
        logger.info("UNet initialised from %s", init)
        return unet
    unet = UNet2DConditionModel.from_pretrained(
        cfg.pretrained_model_name_or_path, subfolder="unet", **base
    )
    if init:
        if init.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(init)
        else:
            state = torch.load(init, map_location="cpu", weights_only=True)
        try:
            unet.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"--unet_init {init!r} does not match the base UNet: {err}") from err
        logger.info("UNet weights loaded from %s", init)
    return unet


def load_model_parts(cfg, *, with_unet: bool = True) -> ModelParts:
    """Load tokenizer(s), text encoder(s), VAE, UNet and DDPM scheduler for ``cfg``.

    ``with_unet=False`` leaves ``unet`` as None (the latent/text cache never needs it)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    check_family(cfg)
    name = cfg.pretrained_model_name_or_path
    kw = dict(revision=cfg.revision, cache_dir=cfg.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler", **kw)
    tokenizers = [AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **kw)]
    text_encoders = [CLIPTextModel.from_pretrained(name, subfolder="text_encoder", **kw)]
    if cfg.sdxl:
        tokenizers.append(AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", **kw))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", **kw)
        )
    vae_name = cfg.pretrained_vae_model_name_or_path
    if vae_name:
        sub = "vae" if os.path.isdir(os.path.join(vae_name, "vae")) else None
        vae = AutoencoderKL.from_pretrained(vae_name, subfolder=sub, cache_dir=cfg.cache_dir)
    else:
        vae = AutoencoderKL.from_pretrained(name, subfolder="vae", **kw)
    return ModelParts(
        unet=load_unet(cfg) if with_unet else None,
        vae=vae,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        noise_scheduler=noise_scheduler,
        resolution=cfg.resolution,
        # SDXL's own VAE produces NaNs in fp16; the fp16-fix VAE (a separate path) does not.
        vae_dtype_override=torch.float32 if cfg.sdxl and not vae_name else None,
        _sdxl=cfg.sdxl,
    )
