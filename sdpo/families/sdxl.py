"""Stable Diffusion XL: a UNet conditioned on two CLIP text encoders plus pooled text and size.

Conditioning, as the reference computes it: the penultimate hidden states of both encoders
concatenated ``[B, 77, D1 + D2]``; ``added_cond_kwargs = {"text_embeds": pooled projection of
encoder 2 [B, P], "time_ids": [H, W, 0, 0, H, W] per sample}`` (original size, crop top-left,
target size = the training resolution).
"""

from __future__ import annotations

from sdpo.families.base import ModelConfigs, ModelFamily, ModelSource, has_component


def turbo_timesteps(timesteps):
    """SDXL-Turbo was distilled for 1-4 steps: train it only at t in {249, 499, 749, 999}, one
    of the four picked by the uniform draw (the official train.py's rule)."""
    return 250 * (timesteps % 4) + 249


class SDXL(ModelFamily):
    name = "sdxl"
    description = "Stable Diffusion XL: two text encoders and a UNet with 'text_time' embedding"
    default_base = "stabilityai/stable-diffusion-xl-base-1.0"
    default_resolution = 1024
    flag = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_encoder_specs = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "CLIPTextModelWithProjection"),
    )
    # SDXL's own VAE overflows in fp16; evaluation uses the fp16-fix VAE (as the reference).
    eval_vae = "madebyollin/sdxl-vae-fp16-fix"
    loss_kwargs = {"sdxl": True}  # DSPO's SDXL form (sdpo.losses)

    n_time_ids = 6  # [H, W, top, left, H, W]

    def matches(self, configs: ModelConfigs) -> bool:
        return (
            has_component(configs.index, "unet")
            and has_component(configs.index, "text_encoder")
            and has_component(configs.index, "text_encoder_2")
            and configs.denoiser.get("addition_embed_type") == "text_time"
        )

    def objective(self, scheduler, name: str, density=None):
        """ε-prediction; for SDXL-Turbo (a model whose name says "turbo", the official rule:
        its configs are those of SDXL base) the timesteps it was distilled for."""
        objective = super().objective(scheduler, name, density)
        if "turbo" in str(name).lower():
            objective.timestep_map = turbo_timesteps
        return objective

    def vae_dtype_override(self, source: ModelSource):
        import torch

        # SDXL's own VAE produces NaNs in fp16; the fp16-fix VAE (a separate path) does not.
        return None if source.vae else torch.float32

    @staticmethod
    def time_ids(resolution: int, n: int, device=None):
        """``[n, 6]`` size conditioning ``[H, W, 0, 0, H, W]`` (no crop, square images)."""
        import torch

        size = float(resolution)
        row = torch.tensor([size, size, 0.0, 0.0, size, size], device=device)
        return row.repeat(n, 1)

    def encode_prompts(self, parts, captions, device) -> dict:
        import torch

        hiddens, pooled = [], None
        with torch.no_grad():
            for tok, enc in zip(parts.tokenizers, parts.text_encoders):
                out = enc(self.tokenize(tok, captions, device), output_hidden_states=True)
                hiddens.append(out.hidden_states[-2])
                pooled = out[0]  # CLIPTextModelWithProjection: text_embeds (the last encoder's)
        return {
            "encoder_hidden_states": torch.cat(hiddens, dim=-1).float(),
            "added_cond_kwargs": {
                "text_embeds": pooled.float(),
                "time_ids": self.time_ids(parts.resolution, len(captions), device),
            },
        }

    def cond_to_cache(self, cond: dict) -> dict:
        return {
            "hidden": cond["encoder_hidden_states"],
            "pooled": cond["added_cond_kwargs"]["text_embeds"],
        }

    def cond_from_cache(self, tensors: dict, resolution: int) -> dict:
        pooled = tensors["pooled"].float()
        return {
            "encoder_hidden_states": tensors["hidden"].float(),
            "added_cond_kwargs": {
                "text_embeds": pooled,
                "time_ids": self.time_ids(resolution, pooled.shape[0]),
            },
        }

    def dummy_cond(self, denoiser_config, batch, device, dtype=None, tokens=77) -> dict:
        import torch

        width = denoiser_config["cross_attention_dim"]
        pooled = (
            denoiser_config["projection_class_embeddings_input_dim"]
            - self.n_time_ids * denoiser_config["addition_time_embed_dim"]
        )
        return {
            "encoder_hidden_states": torch.randn(batch, tokens, width, device=device, dtype=dtype),
            "added_cond_kwargs": {
                "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                "time_ids": self.time_ids(1024, batch, device).to(dtype or torch.float32),
            },
        }


FAMILY = SDXL()
