"""Stable Diffusion 1.x / 2.x-style ε-prediction UNets with one CLIP text encoder.

Conditioning, as the Diffusion-DPO reference computes it: ``encoder_hidden_states`` = the last
hidden state of the CLIP text encoder, ``[B, 77, D]``.
"""

from __future__ import annotations

from sdpo.families.base import ModelConfigs, ModelFamily, has_component


class SD15(ModelFamily):
    name = "sd15"
    description = "Stable Diffusion 1.5-style: a UNet conditioned on one CLIP text encoder"
    default_base = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    default_resolution = 512
    pipeline_class_name = "StableDiffusionPipeline"
    text_encoder_specs = (("tokenizer", "text_encoder", "CLIPTextModel"),)

    def matches(self, configs: ModelConfigs) -> bool:
        return (
            has_component(configs.index, "unet")
            and has_component(configs.index, "text_encoder")
            and not has_component(configs.index, "text_encoder_2")
            and configs.denoiser.get("addition_embed_type") != "text_time"
        )

    def encode_prompts(self, parts, captions, device) -> dict:
        import torch

        with torch.no_grad():
            ids = self.tokenize(parts.tokenizers[0], captions, device)
            hidden = parts.text_encoders[0](ids, return_dict=False)[0]
        return {"encoder_hidden_states": hidden.float()}

    def cond_to_cache(self, cond: dict) -> dict:
        return {"hidden": cond["encoder_hidden_states"]}

    def cond_from_cache(self, tensors: dict, resolution: int) -> dict:
        return {"encoder_hidden_states": tensors["hidden"].float()}

    def dummy_cond(self, denoiser_config, batch, device, dtype=None, tokens=77) -> dict:
        import torch

        width = denoiser_config["cross_attention_dim"]
        return {
            "encoder_hidden_states": torch.randn(batch, tokens, width, device=device, dtype=dtype)
        }

    def pipeline_kwargs(self) -> dict:
        # The evaluation never filters images (as the reference): no safety checker to load.
        return dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False)


FAMILY = SD15()
