"""Stable Diffusion 3 / 3.5 (Medium, Large): an MM-DiT (``SD3Transformer2DModel``) conditioned on
CLIP-L + CLIP-G + T5-XXL, trained by rectified flow (:mod:`sdpo.families.flow`).

Conditioning, as ``StableDiffusion3Pipeline.encode_prompt`` computes it (we call it, so training
sees what generation sees): the penultimate hidden states of both CLIP encoders concatenated,
zero-padded to the T5 width and stacked with the T5 states along the sequence, ``[B, 77 + 256,
4096]``; ``pooled_projections`` = both CLIP text projections concatenated ``[B, 2048]``. The
transformer takes the scheduler's timesteps t = σ·1000 as they are.
"""

from __future__ import annotations

from sdpo.families.base import ModelConfigs, has_component
from sdpo.families.flow import FlowFamily


class SD3(FlowFamily):
    name = "sd3"
    description = (
        "Stable Diffusion 3 / 3.5: an SD3Transformer2DModel with CLIP-L, CLIP-G and T5 encoders"
    )
    default_base = "stabilityai/stable-diffusion-3.5-medium"
    default_resolution = 1024
    denoiser_class_name = "SD3Transformer2DModel"
    pipeline_class_name = "StableDiffusion3Pipeline"
    text_encoder_specs = (
        ("tokenizer", "text_encoder", "CLIPTextModelWithProjection"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
        ("tokenizer_3", "text_encoder_3", "T5EncoderModel"),
    )
    max_sequence_length = 256  # the pipeline's default
    eval_steps = 40  # SD3.5 Medium's model card: 40 steps, guidance_scale 4.5 (--cfg 3.5)
    eval_cfg = 3.5

    def matches(self, configs: ModelConfigs) -> bool:
        return (
            has_component(configs.index, "transformer")
            and configs.denoiser.get("_class_name") == "SD3Transformer2DModel"
        )

    def check_configs(self, configs: ModelConfigs, name: str) -> None:
        super().check_configs(configs, name)
        if not has_component(configs.index, "text_encoder_3"):
            # Pipelines saved without T5 zero its states; training on them would not match the
            # model the user evaluates with T5, so refuse rather than guess.
            raise ValueError(
                f"{name!r}: this SD3 pipeline has no T5 encoder (text_encoder_3); training needs it"
            )

    def encode_prompts(self, parts, captions, device) -> dict:
        import torch

        pipe = self.text_pipeline(parts)
        captions = list(captions)
        with torch.no_grad():
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                prompt_2=captions,
                prompt_3=captions,
                device=device,
                do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": hidden.float(), "pooled_projections": pooled.float()}

    def predict(self, denoiser, noisy, timesteps, cond: dict):
        return denoiser(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]

    def dummy_cond(self, denoiser_config, batch, device, dtype=None, tokens=None) -> dict:
        return super().dummy_cond(
            denoiser_config, batch, device, dtype, tokens or 77 + self.max_sequence_length
        )


FAMILY = SD3()
