"""FLUX.1 (dev, schnell): a ``FluxTransformer2DModel`` conditioned on CLIP-L (pooled) and T5-XXL,
trained by rectified flow (:mod:`sdpo.families.flow`) on 2×2-packed latents.

Conditioning, as ``FluxPipeline.encode_prompt`` computes it (we call it): the T5 hidden states
``[B, 512, 4096]`` and the pooled CLIP-L output ``[B, 768]``. Everything else the transformer takes
is rebuilt in :meth:`FLUX.predict`, so ``sdpo.step`` keeps ``[B, C, h, w]`` latents: the latents
are packed into ``[B, h/2·w/2, 4C]`` tokens and the prediction unpacked back; the 2-D position
ids of the image (``[h/2·w/2, 3]``) and of the text (zeros, ``[S, 3]``); the timestep σ = t/1000
(the transformer multiplies by 1000 itself); and, for guidance-distilled models (dev,
``guidance_embeds``), the guidance scale, 3.5 as diffusers' FLUX DreamBooth script trains with.
"""

from __future__ import annotations

from sdpo.families.base import ModelConfigs, ModelSource, has_component
from sdpo.families.flow import FlowFamily, unwrapped_config


def pack_latents(latents):
    """``[B, C, h, w]`` -> ``[B, h/2·w/2, 4C]`` (each 2×2 patch one token, FLUX's layout)."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens, height: int, width: int):
    """The inverse of :func:`pack_latents` for latents of size ``height × width``."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device, dtype):
    """``[h/2·w/2, 3]`` position ids of the packed latent tokens: (0, row, column)."""
    import torch

    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] = torch.arange(height // 2)[:, None]
    ids[..., 2] = torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FLUX(FlowFamily):
    name = "flux"
    description = "FLUX.1: a FluxTransformer2DModel with CLIP-L and T5 encoders"
    default_base = "black-forest-labs/FLUX.1-dev"
    default_resolution = 1024
    denoiser_class_name = "FluxTransformer2DModel"
    pipeline_class_name = "FluxPipeline"
    text_encoder_specs = (
        ("tokenizer", "text_encoder", "CLIPTextModel"),
        ("tokenizer_2", "text_encoder_2", "T5EncoderModel"),
    )
    max_sequence_length = 512  # FLUX.1-dev's (schnell: 256)
    # FluxPipeline's defaults: 28 steps, embedded guidance 3.5 (--cfg 2.5; FLUX.1-dev is
    # guidance-distilled: one forward per step, the negative prompt is unused).
    eval_steps = 28
    eval_cfg = 2.5
    # Guidance fed to the guidance embedding while training (diffusers' FLUX DreamBooth default).
    train_guidance = 3.5

    def matches(self, configs: ModelConfigs) -> bool:
        return (
            has_component(configs.index, "transformer")
            and configs.denoiser.get("_class_name") == "FluxTransformer2DModel"
        )

    def load_parts(self, source: ModelSource, *, resolution: int, **kwargs):
        parts = super().load_parts(source, resolution=resolution, **kwargs)
        # Packing tiles the latent with 2×2 patches: its side must be even.
        side = 2 * 2 ** (len(parts.vae.config.block_out_channels) - 1)
        if resolution % side:
            raise ValueError(
                f"--resolution {resolution}: FLUX needs a multiple of {side} (the VAE's "
                "downsampling × the 2×2 latent packing)"
            )
        return parts

    def encode_prompts(self, parts, captions, device) -> dict:
        import torch

        pipe = self.text_pipeline(parts)
        captions = list(captions)
        with torch.no_grad():
            hidden, pooled, _ = pipe.encode_prompt(
                prompt=captions,
                prompt_2=captions,
                device=device,
                max_sequence_length=self.max_sequence_length,
            )
        return {"encoder_hidden_states": hidden.float(), "pooled_projections": pooled.float()}

    @staticmethod
    def latent_side(pixels: int, vae_scale_factor: int) -> int:
        """FluxPipeline's latent side: even, so that 2×2 packing tiles it."""
        return 2 * (pixels // (vae_scale_factor * 2))

    def initial_noise(self, denoiser_config, vae_scale_factor, height, width, generator, device,
                      dtype):  # fmt: skip
        """``randn(1, C, h, w)`` packed into FluxPipeline's ``[1, h/2·w/2, 4C]`` latents."""
        import torch

        h, w = (self.latent_side(side, vae_scale_factor) for side in (height, width))
        shape = (1, denoiser_config.in_channels // 4, h, w)
        return pack_latents(torch.randn(shape, generator=generator, device=device, dtype=dtype))

    def output_latents(self, latents, height, width, vae_scale_factor):
        h, w = (self.latent_side(side, vae_scale_factor) for side in (height, width))
        return unpack_latents(latents, h, w)

    def predict(self, denoiser, noisy, timesteps, cond: dict):
        import torch

        _, _, height, width = noisy.shape
        hidden = cond["encoder_hidden_states"]
        guidance = None
        if unwrapped_config(denoiser).get("guidance_embeds"):
            guidance = torch.full(
                (noisy.shape[0],), self.train_guidance, device=noisy.device, dtype=noisy.dtype
            )
        out = denoiser(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(noisy.dtype) / 1000.0,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
            img_ids=image_ids(height, width, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, height, width)


FAMILY = FLUX()
