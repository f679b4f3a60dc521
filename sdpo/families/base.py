"""What every model family provides, and the parts that are the same for all of them.

A :class:`ModelFamily` answers every question whose answer depends on the model: does a folder
hold this family (:meth:`ModelFamily.matches`, from the configs alone), how its parts load, how a
prompt becomes the denoiser's conditioning, how a pair is noised and what the training target is
(the family's :class:`Objective`), how the denoiser is called, how conditioning is cached, which
diffusers pipeline generates with it, and how a ``unet.pth`` loads into it. Training, the cache,
LoRA, evaluation and the bench ask the family; none of them tests "is it SDXL".

This module imports no heavy library at import time (diffusers, transformers and torch are
imported inside the functions), so evaluation can import it without the training stack.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


# ---------------------------------------------------------------------------------------------
# Where a model comes from, and its configs
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSource:
    """Where a base model's files come from.

    Attributes:
        name_or_path: hub id or local diffusers pipeline folder.
        revision, cache_dir: hub revision and cache folder.
        vae: a separate VAE (hub id or folder; a folder holding ``vae/`` works too), or None.
        denoiser_init: start the denoiser from another one (a diffusers folder, a hub id, or a
            ``unet.pth`` / ``.safetensors`` state dict); "" = the base model's.
    """

    name_or_path: str
    revision: str | None = None
    cache_dir: str | None = None
    vae: str | None = None
    denoiser_init: str = ""

    @classmethod
    def from_flags(cls, cfg, *, denoiser_init: str = "") -> ModelSource:
        """From the model and data flags shared by ``train.py`` and the cache tool
        (``pretrained_model_name_or_path``, ``revision``, ``cache_dir``,
        ``pretrained_vae_model_name_or_path``); ``denoiser_init``: ``--unet_init``."""
        return cls(
            name_or_path=cfg.pretrained_model_name_or_path,
            revision=cfg.revision,
            cache_dir=cfg.cache_dir,
            vae=cfg.pretrained_vae_model_name_or_path,
            denoiser_init=denoiser_init or "",
        )


@dataclass(frozen=True)
class ModelConfigs:
    """The configs a family is recognised from: ``model_index.json``, the denoiser's
    ``config.json`` and the scheduler's config (each ``{}`` when absent)."""

    index: dict
    denoiser: dict
    scheduler: dict


def _read_json(source: ModelSource, filename: str) -> dict | None:
    """A JSON file of a local folder or a hub repository (the hub cache is used offline)."""
    local = Path(source.name_or_path).expanduser()
    if local.is_dir():
        path = local / filename
        return json.loads(path.read_text()) if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(
            source.name_or_path, filename, revision=source.revision, cache_dir=source.cache_dir
        )
    except LocalEntryNotFoundError:
        raise  # offline and not in the cache: not the same as "the repository has no such file"
    except EntryNotFoundError:
        return None
    return json.loads(Path(path).read_text())


def read_configs(source: ModelSource) -> ModelConfigs:
    """Read the configs of ``source`` (no weight is touched). Raises ``ValueError`` when the
    folder or hub repository is not a diffusers pipeline or cannot be read."""
    name = source.name_or_path
    try:
        index = _read_json(source, "model_index.json")
        if index is None:
            raise OSError("no model_index.json")
        denoiser = {}
        for sub in ("unet", "transformer"):
            if sub in index:
                denoiser = _read_json(source, f"{sub}/config.json") or {}
                break
        scheduler = _read_json(source, "scheduler/scheduler_config.json") or {}
    except Exception as err:  # hub errors come in many types (offline, gated, missing)
        raise ValueError(
            f"--pretrained_model_name_or_path {name!r}: cannot read the diffusers pipeline "
            f"configs (model_index.json, unet/, scheduler/): {err}"
        ) from err
    return ModelConfigs(index=index, denoiser=denoiser, scheduler=scheduler)


def has_component(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` lists a real component ``name`` (not ``[null, null]``)."""
    return index.get(name) not in (None, [None, None])


# ---------------------------------------------------------------------------------------------
# Training objectives: the noising of a pair and its target
# ---------------------------------------------------------------------------------------------


class Objective:
    """How training noises clean latents and what the denoiser must predict.

    Every pair shares ONE noise tensor and ONE timestep (drawn from the pair's keyed generator,
    so they do not depend on how pairs are split over processes); the loser reuses the winner's.
    """

    name: ClassVar[str]

    def draw(self, generators: list, latent_shape, device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(noise [P, ...], timesteps [P])``: one noise and one timestep per pair, each from
        its pair's generator (noise first, then the timestep)."""
        raise NotImplementedError

    def noisy_and_target(self, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """``(denoiser input, training target)`` of clean ``latents``."""
        raise NotImplementedError

    def draw_timesteps(self, generator, n: int, device) -> torch.Tensor:
        """``n`` training timesteps from one generator (fixed evaluation draws, the toy)."""
        raise NotImplementedError


class EpsilonObjective(Objective):
    """DDPM ε-prediction (SD1.5, SDXL): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, target ε, t uniform on
    {0, …, T−1} (Diffusion-DPO, Wallace et al. 2023, Eq. 14)."""

    name = "epsilon"

    def __init__(self, scheduler, timestep_map=None):
        self.scheduler = scheduler
        # A map applied to the uniform draw: models trained on part of the schedule only
        # (the SDXL refiner, SDXL-Turbo) are trained there, as the official code does.
        self.timestep_map = timestep_map

    def _mapped(self, timesteps):
        return timesteps if self.timestep_map is None else self.timestep_map(timesteps)

    def draw(self, generators, latent_shape, device):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(
            (len(generators), *latent_shape[1:]), generator=generators, device=device
        )
        steps = self.scheduler.config.num_train_timesteps
        timesteps = torch.cat(
            [torch.randint(0, steps, (1,), generator=g, device=device) for g in generators]
        )
        return noise, self._mapped(timesteps)

    def noisy_and_target(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps), noise

    def draw_timesteps(self, generator, n, device):
        import torch

        steps = self.scheduler.config.num_train_timesteps
        return self._mapped(torch.randint(0, steps, (n,), generator=generator, device=device))


class VPredictionObjective(EpsilonObjective):
    """DDPM v-prediction (SD 2.x 768 models): the same noising as ε-prediction, target
    v = √ᾱ_t·ε − √(1−ᾱ_t)·x0 (Salimans & Ho 2022, Sec. 4), as the scheduler computes it. The
    preference losses only compare prediction and target, so they apply unchanged."""

    name = "v_prediction"

    def noisy_and_target(self, latents, noise, timesteps):
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        return noisy, self.scheduler.get_velocity(latents, noise, timesteps)


# The DDPM objective of each scheduler ``prediction_type`` the preference losses can train.
PREDICTION_OBJECTIVES: dict[str, type[Objective]] = {
    "epsilon": EpsilonObjective,
    "v_prediction": VPredictionObjective,
}


def _require_known_prediction(prediction: str, name: str) -> None:
    """Refuse a scheduler ``prediction_type`` without a training objective here."""
    if prediction not in PREDICTION_OBJECTIVES:
        raise ValueError(
            f"{name!r}: scheduler prediction_type is {prediction!r}; the preference losses "
            f"need one of {sorted(PREDICTION_OBJECTIVES)} (epsilon or v-prediction)"
        )


# ---------------------------------------------------------------------------------------------
# The loaded parts of one base model
# ---------------------------------------------------------------------------------------------


@dataclass
class ModelParts:
    """The frozen encoders, the trainable denoiser and the objective of one base model.

    Attributes:
        family: the :class:`ModelFamily` these parts belong to.
        unet: the denoiser to train (a UNet, or a transformer for flow-matching families;
            starting weights; unwrapped). None when loaded ``with_denoiser=False``.
        vae: AutoencoderKL (frozen).
        text_encoders, tokenizers: the family's text encoders (frozen) and their tokenizers.
        noise_scheduler: the base model's training scheduler.
        objective: the family's :class:`Objective` built on that scheduler.
        resolution: training image size (SDXL's size conditioning uses it).
        vae_dtype_override: dtype the VAE must stay in whatever the mixed precision (SDXL's
            original VAE overflows in fp16), or None to follow the weight dtype.
    """

    family: ModelFamily
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    objective: Objective
    resolution: int
    vae_dtype_override: Any = None

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def latents(self, posterior, generators: list) -> torch.Tensor:
        """Scaled float32 latents sampled from the VAE posterior, one generator per image."""
        return self.family.scale_latents(self.vae, posterior.sample(generator=generators).float())

    def freeze_and_place(self, device, weight_dtype) -> None:
        """Freeze VAE and text encoders (eval, no grad) and move them to ``device`` in
        ``weight_dtype`` (the VAE in ``vae_dtype_override`` when set)."""
        for module in (self.vae, *self.text_encoders):
            module.requires_grad_(False).eval()
        self.vae.to(device, dtype=self.vae_dtype_override or weight_dtype)
        for enc in self.text_encoders:
            enc.to(device, dtype=weight_dtype)

    def make_reference(self):
        """A frozen copy of the starting denoiser (the DPO reference policy)."""
        ref = copy.deepcopy(self.unet)
        ref.requires_grad_(False).eval()
        return ref

    def encode_prompts(self, captions: list[str], device) -> dict:
        """B captions -> the denoiser's conditioning kwargs (float32), see the family."""
        return self.family.encode_prompts(self, captions, device)


# ---------------------------------------------------------------------------------------------
# The family interface
# ---------------------------------------------------------------------------------------------


class ModelFamily:
    """One model family. Subclasses set the class attributes and override what differs."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_base: ClassVar[str]  # hub id of the base model the recipes and evaluation default to
    default_resolution: ClassVar[int]
    # The official flag that says "this family" (``--sdxl``); None when detection alone decides.
    flag: ClassVar[str | None] = None
    denoiser_subfolder: ClassVar[str] = "unet"
    denoiser_class_name: ClassVar[str] = "UNet2DConditionModel"
    pipeline_class_name: ClassVar[str]
    # (tokenizer subfolder, text-encoder subfolder, transformers class), in the order the
    # family's conditioning uses them.
    text_encoder_specs: ClassVar[tuple[tuple[str, str, str], ...]] = ()
    # Whether eval.generate can make images from a prompt alone (the SDXL refiner cannot).
    text_to_image: ClassVar[bool] = True
    # Evaluation: the scheduler the paper samples with and the VAE used by default (None: base).
    eval_scheduler_class_name: ClassVar[str] = "EulerDiscreteScheduler"
    eval_vae: ClassVar[str | None] = None
    # Evaluation defaults: sampling steps and ``--cfg`` (= diffusers' guidance_scale − 1; the
    # paper: 50 steps, cfg 7.5).
    eval_steps: ClassVar[int] = 50
    eval_cfg: ClassVar[float] = 7.5
    # Extra keyword arguments of the losses for this family (DSPO has an SDXL form).
    loss_kwargs: ClassVar[dict] = {}
    # The keyword of the pipeline's ``save_lora_weights`` that takes the denoiser's adapters
    # (``unet_lora_layers``; SD3 / FLUX pipelines: ``transformer_lora_layers``) and its metadata.
    lora_layers_prefix: ClassVar[str] = "unet"
    # ``--lora_rank`` when not given: 0 (full fine-tuning, the reference) for the UNet families;
    # the flow transformers default to LoRA (a second full FLUX transformer is 24 GB).
    default_lora_rank: ClassVar[int] = 0

    def __repr__(self) -> str:
        return f"<model family {self.name}>"

    # --- detection -----------------------------------------------------------------------------
    def matches(self, configs: ModelConfigs) -> bool:
        raise NotImplementedError

    def describe(self, configs: ModelConfigs) -> str:
        """What in the configs made (or would make) this family match, for error messages."""
        return self.description

    # --- loading -------------------------------------------------------------------------------
    def objective(self, scheduler, name: str, density=None) -> Objective:
        """The training objective of ``scheduler`` (``name``: the model, for errors): the DDPM
        objective of its ``prediction_type`` (ε or v). ``density``: the timestep density of
        flow-matching families (:class:`sdpo.families.flow.TimestepDensity`); DDPM families draw
        t uniformly, as Diffusion-DPO, and ignore it."""
        prediction = scheduler.config.get("prediction_type", "epsilon")
        _require_known_prediction(prediction, name)
        return PREDICTION_OBJECTIVES[prediction](scheduler)

    def check_configs(self, configs: ModelConfigs, name: str) -> None:
        """Refuse, from the configs alone, a model this family cannot train."""
        _require_known_prediction(configs.scheduler.get("prediction_type", "epsilon"), name)

    def denoiser_class(self):
        import diffusers

        return getattr(diffusers, self.denoiser_class_name)

    def pipeline_class(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def load_denoiser(self, source: ModelSource):
        """The denoiser to train: the base model's, or ``source.denoiser_init`` (a diffusers
        folder, a hub id, or a state dict loaded strictly)."""
        from sdpo.families.weights import load_state_dict_file, load_strict

        cls = self.denoiser_class()
        init = source.denoiser_init
        if init and not init.endswith(STATE_DICT_SUFFIXES):
            sub = (
                self.denoiser_subfolder
                if os.path.isdir(os.path.join(init, self.denoiser_subfolder))
                else None
            )
            if not os.path.isdir(init):
                sub = self.denoiser_subfolder  # a hub id of a full pipeline
            model = cls.from_pretrained(init, subfolder=sub, cache_dir=source.cache_dir)
            logger.info("%s initialised from %s", self.denoiser_subfolder, init)
            return model
        model = cls.from_pretrained(
            source.name_or_path,
            subfolder=self.denoiser_subfolder,
            revision=source.revision,
            cache_dir=source.cache_dir,
        )
        if init:
            load_strict(model, load_state_dict_file(init), init, flag="--unet_init")
            logger.info("%s weights loaded from %s", self.denoiser_subfolder, init)
        return model

    def load_vae(self, source: ModelSource):
        from diffusers import AutoencoderKL

        if source.vae:
            sub = "vae" if os.path.isdir(os.path.join(source.vae, "vae")) else None
            return AutoencoderKL.from_pretrained(
                source.vae, subfolder=sub, cache_dir=source.cache_dir
            )
        return AutoencoderKL.from_pretrained(
            source.name_or_path,
            subfolder="vae",
            revision=source.revision,
            cache_dir=source.cache_dir,
        )

    def load_text_encoders(self, source: ModelSource) -> tuple[list, list]:
        """``(tokenizers, text_encoders)`` as :attr:`text_encoder_specs` lists them."""
        import transformers

        kw = dict(revision=source.revision, cache_dir=source.cache_dir)
        tokenizers, encoders = [], []
        for tokenizer_sub, encoder_sub, cls_name in self.text_encoder_specs:
            tokenizers.append(
                transformers.AutoTokenizer.from_pretrained(
                    source.name_or_path, subfolder=tokenizer_sub, **kw
                )
            )
            encoder_cls = getattr(transformers, cls_name)
            encoders.append(
                encoder_cls.from_pretrained(source.name_or_path, subfolder=encoder_sub, **kw)
            )
        return tokenizers, encoders

    def load_scheduler(self, source: ModelSource):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(
            source.name_or_path,
            subfolder="scheduler",
            revision=source.revision,
            cache_dir=source.cache_dir,
        )

    def vae_dtype_override(self, source: ModelSource):
        return None

    def load_parts(
        self,
        source: ModelSource,
        *,
        resolution: int,
        with_denoiser: bool = True,
        density=None,
    ) -> ModelParts:
        """Tokenizers, text encoders, VAE, scheduler and (unless ``with_denoiser=False``, as the
        latent/text cache needs) the denoiser. ``density``: see :meth:`objective`."""
        scheduler = self.load_scheduler(source)
        tokenizers, text_encoders = self.load_text_encoders(source)
        return ModelParts(
            family=self,
            unet=self.load_denoiser(source) if with_denoiser else None,
            vae=self.load_vae(source),
            text_encoders=text_encoders,
            tokenizers=tokenizers,
            noise_scheduler=scheduler,
            objective=self.objective(scheduler, source.name_or_path, density=density),
            resolution=resolution,
            vae_dtype_override=self.vae_dtype_override(source),
        )

    def parts_from_modules(
        self, *, unet, vae, text_encoders, tokenizers, scheduler, resolution: int, density=None
    ) -> ModelParts:
        """:class:`ModelParts` from modules built in memory (tests, the bench)."""
        return ModelParts(
            family=self,
            unet=unet,
            vae=vae,
            text_encoders=list(text_encoders),
            tokenizers=list(tokenizers),
            noise_scheduler=scheduler,
            objective=self.objective(scheduler, self.name, density=density),
            resolution=resolution,
        )

    # --- conditioning and the denoiser call ----------------------------------------------------
    def encode_prompts(self, parts: ModelParts, captions: list[str], device) -> dict:
        raise NotImplementedError

    @staticmethod
    def tokenize(tokenizer, captions: list[str], device):
        from sdpo.text import clean_caption  # the official slow CLIP tokenizer's cleaning

        return tokenizer(
            [clean_caption(c) for c in captions],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

    def scale_latents(self, vae, latents):
        """VAE latents -> the denoiser's latent space."""
        return latents * float(vae.config.scaling_factor)

    def predict(self, denoiser, noisy, timesteps, cond: dict):
        """The denoiser's prediction for ``noisy`` at ``timesteps`` under ``cond``."""
        return denoiser(noisy, timesteps, **cond).sample

    def cond_to_cache(self, cond: dict) -> dict:
        """The per-caption tensors of ``cond`` a cache stores (derived ones are rebuilt)."""
        raise NotImplementedError

    def cond_from_cache(self, tensors: dict, resolution: int) -> dict:
        """Batched cached tensors (``[B, ...]`` each, float32) -> conditioning kwargs."""
        raise NotImplementedError

    def dummy_cond(
        self, denoiser_config: dict, batch: int, device, dtype=None, tokens: int = 77
    ) -> dict:
        """Random conditioning of the right shapes (FLOP counting, benchmarks)."""
        raise NotImplementedError

    # --- generation ----------------------------------------------------------------------------
    def initial_noise(self, denoiser_config, vae_scale_factor: int, height: int, width: int,
                      generator, device, dtype):  # fmt: skip
        """One initial noise ``[1, ...]`` in the layout the pipeline's ``latents=`` takes:
        ``randn(1, C, H/f, W/f)`` (the reference's draw)."""
        import torch

        f = vae_scale_factor
        shape = (1, denoiser_config.in_channels, height // f, width // f)
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)

    def output_latents(self, latents, height: int, width: int, vae_scale_factor: int):
        """The pipeline's ``output_type="latent"`` output -> ``[B, C, h, w]`` VAE latents."""
        return latents

    def pipeline_kwargs(self) -> dict:
        """Extra keyword arguments of the pipeline's ``from_pretrained`` (and constructor)."""
        return {}

    def pipeline_from_parts(self, parts: ModelParts, scheduler=None):
        """The family's diffusers pipeline around in-memory parts (the bench, tests); the
        scheduler defaults to the evaluation scheduler built from the training schedule."""
        import diffusers

        if scheduler is None:
            scheduler_cls = getattr(diffusers, self.eval_scheduler_class_name)
            scheduler = scheduler_cls.from_config(parts.noise_scheduler.config)
        kwargs = {self.denoiser_subfolder: parts.unet, "vae": parts.vae, "scheduler": scheduler}
        for i, (encoder, tokenizer) in enumerate(zip(parts.text_encoders, parts.tokenizers)):
            suffix = "" if i == 0 else f"_{i + 1}"  # diffusers' names: text_encoder, text_encoder_2
            kwargs[f"text_encoder{suffix}"] = encoder
            kwargs[f"tokenizer{suffix}"] = tokenizer
        return self.pipeline_class()(**kwargs, **self.pipeline_kwargs())
