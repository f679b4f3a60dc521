"""What the rectified-flow transformer families (SD3 / SD3.5, FLUX) share: the flow-matching
objective, the timestep density, latent scaling with a shift, and the transformer's loading.

Flow matching (Esser et al. 2024, "Scaling Rectified Flow Transformers", Eq. 1-3 with the
rectified-flow path): x_t = (1 − σ)·x0 + σ·ε and the denoiser predicts the velocity ε − x0. σ is
drawn as diffusers' SD3 / FLUX training scripts draw it: u from the density of
``compute_density_for_timestep_sampling`` (logit-normal by default, Esser et al. Sec. 3.1), then
index ``u·T`` into the sigmas of a never-``set_timesteps`` copy of the training scheduler, so the
scheduler's shift (SD3: 3.0) is applied exactly as there. The Diffusion-DPO losses, DMPO, SFT and
the SDPO safeguard only compare the prediction with its target, so they apply unchanged; the
pair's winner and loser share ε and σ, drawn from the pair's keyed generator (noise first, then u),
so process / accumulation splits see the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from sdpo.families.base import ModelConfigs, ModelFamily, ModelSource, Objective

WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform")


@dataclass(frozen=True)
class TimestepDensity:
    """The density u ∈ (0, 1) is drawn from (``--weighting_scheme``, ``--logit_mean``,
    ``--logit_std``, ``--mode_scale``). Defaults: diffusers' SD3 / FLUX training scripts
    (logit-normal with mean 0 and std 1, Esser et al. 2024 Sec. 3.1; mode scale 1.29)."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(
                f"--weighting_scheme must be one of {list(WEIGHTING_SCHEMES)}, "
                f"got {self.weighting_scheme!r}"
            )
        if not self.logit_std > 0:
            raise ValueError(f"--logit_std must be > 0, got {self.logit_std}")

    @classmethod
    def from_flags(cls, cfg) -> TimestepDensity:
        """From an object with the flags' names (missing ones keep the defaults)."""
        defaults = cls()
        return cls(
            **{
                k: getattr(cfg, k, getattr(defaults, k))
                for k in ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
            }
        )


class FlowMatchObjective(Objective):
    """Rectified flow: x_t = (1 − σ)·x0 + σ·ε, target ε − x0 (see the module docstring).

    The timesteps handed to the denoiser are the scheduler's (σ·T, T = 1000); each family
    rescales them for its transformer (FLUX takes σ)."""

    name = "flow_matching"

    def __init__(self, scheduler, density: TimestepDensity | None = None):
        # A fresh copy: a scheduler that was ``set_timesteps`` holds the sampling schedule.
        fresh = type(scheduler).from_config(scheduler.config)
        self.num_train_timesteps = int(fresh.config.num_train_timesteps)
        self.sigmas = fresh.sigmas.float().cpu()
        self.timesteps = fresh.timesteps.float().cpu()
        self.density = density or TimestepDensity()

    def draw(self, generators, latent_shape, device):
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        noise = randn_tensor(
            (len(generators), *latent_shape[1:]), generator=generators, device=device
        )
        return noise, torch.cat([self.draw_timesteps(g, 1, device) for g in generators])

    def draw_timesteps(self, generator, n, device):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        d = self.density
        u = compute_density_for_timestep_sampling(
            weighting_scheme=d.weighting_scheme,
            batch_size=n,
            logit_mean=d.logit_mean,
            logit_std=d.logit_std,
            mode_scale=d.mode_scale,
            device=device,
            generator=generator,
        )
        # As the training scripts index (u·T).long(); clamped for the float32 sigmoid's 1.0.
        index = (u.cpu() * self.num_train_timesteps).long().clamp(0, len(self.timesteps) - 1)
        return self.timesteps[index].to(device)

    def sigma(self, timesteps):
        """σ of scheduler timesteps (the scheduler sets t = σ·T)."""
        return timesteps.float() / self.num_train_timesteps

    def noisy_and_target(self, latents, noise, timesteps):
        sigma = self.sigma(timesteps).to(latents.device).view(-1, *([1] * (latents.ndim - 1)))
        return (1.0 - sigma) * latents + sigma * noise, noise - latents


def unwrapped_config(denoiser) -> dict:
    """The config of a denoiser behind DDP (``.module``), ``torch.compile`` (``._orig_mod``) or
    the LoRA reference (``.unet``)."""
    seen = denoiser
    for _ in range(8):
        config = getattr(seen, "config", None)
        if config is not None:
            return config
        seen = next(
            (
                inner
                for name in ("module", "_orig_mod", "unet")
                if (inner := getattr(seen, name, None))
            ),
            None,
        )
        if seen is None:
            break
    raise TypeError(f"cannot find the config of {type(denoiser).__name__}")


class FlowFamily(ModelFamily):
    """A rectified-flow transformer family (SD3, FLUX)."""

    denoiser_subfolder = "transformer"
    eval_scheduler_class_name = "FlowMatchEulerDiscreteScheduler"
    lora_layers_prefix = "transformer"
    # Rank 32, as Flow-GRPO's SD3.5 DPO baseline (Liu et al. 2025, arXiv 2505.05470; r 32,
    # alpha 64); --lora_rank 0 trains the full transformer.
    default_lora_rank = 32
    # Longest T5 prompt (tokens) the family encodes; the pipelines' defaults.
    max_sequence_length: ClassVar[int] = 256

    def check_configs(self, configs: ModelConfigs, name: str) -> None:
        if configs.scheduler.get("_class_name") != "FlowMatchEulerDiscreteScheduler":
            raise ValueError(
                f"{name!r}: a {self.name} model needs a FlowMatchEulerDiscreteScheduler, the "
                f"folder has {configs.scheduler.get('_class_name')}"
            )

    def objective(self, scheduler, name: str, density=None) -> Objective:
        return FlowMatchObjective(scheduler, density)

    def load_scheduler(self, source: ModelSource):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(
            source.name_or_path,
            subfolder="scheduler",
            revision=source.revision,
            cache_dir=source.cache_dir,
        )

    def scale_latents(self, vae, latents):
        # SD3 / FLUX VAEs: z = (x − shift)·scale, undone by the pipelines before decoding.
        shift = vae.config.get("shift_factor") or 0.0
        return (latents - float(shift)) * float(vae.config.scaling_factor)

    def text_pipeline(self, parts):
        """The family's pipeline holding only the text encoders, to encode prompts exactly as
        generation does (``encode_prompt``)."""
        kwargs = {self.denoiser_subfolder: None, "vae": None, "scheduler": None}
        for i, (encoder, tokenizer) in enumerate(zip(parts.text_encoders, parts.tokenizers)):
            suffix = "" if i == 0 else f"_{i + 1}"
            kwargs[f"text_encoder{suffix}"] = encoder
            kwargs[f"tokenizer{suffix}"] = tokenizer
        return self.pipeline_class()(**kwargs)

    def cond_to_cache(self, cond: dict) -> dict:
        return {"hidden": cond["encoder_hidden_states"], "pooled": cond["pooled_projections"]}

    def cond_from_cache(self, tensors: dict, resolution: int) -> dict:
        return {
            "encoder_hidden_states": tensors["hidden"].float(),
            "pooled_projections": tensors["pooled"].float(),
        }

    def dummy_cond(self, denoiser_config, batch, device, dtype=None, tokens=None) -> dict:
        import torch

        tokens = tokens or self.max_sequence_length
        return {
            "encoder_hidden_states": torch.randn(
                batch, tokens, denoiser_config["joint_attention_dim"], device=device, dtype=dtype
            ),
            "pooled_projections": torch.randn(
                batch, denoiser_config["pooled_projection_dim"], device=device, dtype=dtype
            ),
        }

    def pipeline_from_parts(self, parts, scheduler=None):
        if scheduler is None:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler.from_config(parts.noise_scheduler.config)
        pipe = self.text_pipeline(parts)
        pipe.register_modules(
            **{self.denoiser_subfolder: parts.unet}, vae=parts.vae, scheduler=scheduler
        )
        return self.pipeline_class()(**pipe.components)
