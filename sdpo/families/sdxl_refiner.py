"""The SDXL refiner: SDXL's UNet conditioned on its second text encoder only, with an aesthetic
score in place of the target size, trained on the low-noise end of the schedule.

As the official Diffusion-DPO ``train.py`` handles it:

* conditioning: the penultimate hidden states of ``text_encoder_2`` ``[B, 77, 1280]`` and its
  pooled projection; ``time_ids = [H, W, 0, 0, 6.0]`` (original size, crop top-left, aesthetic
  score 6, the value diffusers' refiner pipeline uses for a positive prompt);
* timesteps: the uniform draw taken modulo 200, i.e. the first 20% of the schedule, the part the
  refiner denoises.

It is recognised from its configs: a UNet with ``text_time`` embedding and ``text_encoder_2``
but no first text encoder. Evaluation cannot run it from a prompt alone (it refines an image).
"""

from __future__ import annotations

from sdpo.families.base import ModelConfigs, has_component
from sdpo.families.sdxl import SDXL

AESTHETIC_SCORE = 6.0
REFINER_TIMESTEPS = 200  # of 1000: the low-noise fifth of the schedule


def refiner_timesteps(timesteps):
    return timesteps % REFINER_TIMESTEPS


class SDXLRefiner(SDXL):
    name = "sdxl_refiner"
    description = "SDXL refiner: a 'text_time' UNet on text_encoder_2 only, aesthetic-score ids"
    default_base = "stabilityai/stable-diffusion-xl-refiner-1.0"
    pipeline_class_name = "StableDiffusionXLImg2ImgPipeline"
    text_encoder_specs = (("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),)
    text_to_image = False
    n_time_ids = 5  # [H, W, top, left, aesthetic score]

    def matches(self, configs: ModelConfigs) -> bool:
        return (
            has_component(configs.index, "unet")
            and has_component(configs.index, "text_encoder_2")
            and not has_component(configs.index, "text_encoder")
            and configs.denoiser.get("addition_embed_type") == "text_time"
        )

    def objective(self, scheduler, name: str, density=None):
        objective = super().objective(scheduler, name, density)
        objective.timestep_map = refiner_timesteps
        return objective

    @staticmethod
    def time_ids(resolution: int, n: int, device=None):
        """``[n, 5]``: ``[H, W, 0, 0, aesthetic score]``."""
        import torch

        size = float(resolution)
        row = torch.tensor([size, size, 0.0, 0.0, AESTHETIC_SCORE], device=device)
        return row.repeat(n, 1)

    def pipeline_from_parts(self, parts, scheduler=None):
        import diffusers

        if scheduler is None:
            scheduler_cls = getattr(diffusers, self.eval_scheduler_class_name)
            scheduler = scheduler_cls.from_config(parts.noise_scheduler.config)
        return self.pipeline_class()(
            unet=parts.unet,
            vae=parts.vae,
            scheduler=scheduler,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=parts.text_encoders[0],
            tokenizer_2=parts.tokenizers[0],
            requires_aesthetics_score=True,
        )


FAMILY = SDXLRefiner()
