"""One micro-step of preference training (Diffusion-DPO, Wallace et al. 2023, Eq. 14; DSPO;
DMPO; SFT), with the SDPO safeguard (arXiv 2511.03317, Sec. 3) on the loser branch.

Batch layout: ``pixel_values`` is ``[n·B, 3, R, R]``, the B winners then the B losers (n = 2), or
the B preferred images (n = 1, unpaired objectives such as SFT), with ``captions``; or, from a
cache (:mod:`sdpo.data.cached`), ``latent_moments`` ``[n·B, 2C, h, w]`` (the VAE posterior) and ``cond``
(the denoiser conditioning of the B captions). Each pair shares ONE noise tensor ε and ONE timestep t,
drawn for the winner and repeated for the loser.

The VAE posterior sample, ε and t of a pair come from a generator keyed by
``(seed, epoch, row index)`` (:func:`sdpo.data.keyed_generator`), so they do not depend on how
pairs are split over processes or accumulation micro-steps: 1 process x 4 pairs, 4 micro-steps x 1
pair and 2 processes x 2 pairs see the same noise for the same pair.

The objective comes only from :data:`sdpo.losses.LOSSES` and its ``needs_reference`` /
``paired`` flags; the step never branches on a method name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdpo.data import PURPOSE_NOISE, keyed_generator


def pair_generators(batch: dict, seed: int, device) -> list[torch.Generator]:
    """One generator per pair of the batch, keyed by ``(seed, epoch, row index)``."""
    return [
        keyed_generator(seed, PURPOSE_NOISE, int(e), int(i), device=device)
        for e, i in zip(batch["epoch"].tolist(), batch["index"].tolist())
    ]


@dataclass(frozen=True)
class Preference:
    """The objective's parameters: β, DMPO's α and the safeguard's settings (μ, per-pair λ,
    λ from residuals summed over processes)."""

    beta: float
    dmpo_alpha: float = 0.0
    safeguard: bool = False
    mu: float = 0.0
    per_pair: bool = False
    sync: bool = False
    noise_offset: float = 0.0
    input_perturbation: float = 0.0

    @classmethod
    def from_flags(cls, cfg) -> Preference:
        """From the training flags (``--beta_dpo``, ``--dmpo_alpha``, ``--use_winner_preserving``,
        ``--winner_preserving_mu`` / ``_per_pair`` / ``_sync``)."""
        return cls(
            beta=cfg.beta_dpo,
            dmpo_alpha=cfg.dmpo_alpha,
            safeguard=cfg.use_winner_preserving,
            mu=cfg.winner_preserving_mu,
            per_pair=cfg.winner_preserving_per_pair,
            sync=cfg.winner_preserving_sync,
            noise_offset=getattr(cfg, "noise_offset", 0.0),
            input_perturbation=getattr(cfg, "input_perturbation", 0.0),
        )


def perturb_pair_noise(
    noise: torch.Tensor, generators: list, *, offset: float, perturbation: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(noise, input_noise)`` with the official ``--noise_offset`` and ``--input_perturbation``
    applied per PAIR: one draw per pair (``noise`` is ``[P, C, ...]``), from the pair's generator
    after its noise and timestep, so winner and loser keep sharing them.

    * Offset noise (a per-channel constant, ``offset · N(0, 1)`` of shape ``[C, 1, 1]``) becomes
      part of ε: it is both in the denoiser's input and in the target.
    * Input perturbation (``perturbation · N(0, 1)`` of ε's shape) enters only the denoiser's
      input; the target stays ε (Ning et al. 2023, "Input perturbation reduces exposure bias").

    The official script draws the perturbation per image *before* it makes a pair share the
    winner's noise, so there the loser's input is noised with its own ε while its target is the
    winner's: here the loser reuses the winner's draws, input and target match. Nothing is drawn
    when both are 0, so runs without them keep their noise.
    """
    from diffusers.utils.torch_utils import randn_tensor

    device = noise.device
    if offset:
        shape = (noise.shape[0], noise.shape[1], *([1] * (noise.ndim - 2)))
        noise = noise + offset * randn_tensor(shape, generator=generators, device=device)
    input_noise = noise
    if perturbation:
        draws = randn_tensor(noise.shape, generator=generators, device=device)
        input_noise = noise + perturbation * draws
    return noise, input_noise


def training_step(
    *,
    parts,
    unet,
    ref_unet,
    batch: dict,
    spec,
    pref: Preference,
    seed: int,
    device,
    autocast,
) -> tuple[torch.Tensor, dict]:
    """Loss and detached stats of one micro-batch.

    Args:
        parts: :class:`sdpo.families.ModelParts` (family, frozen VAE / text encoders, objective).
        unet: the (accelerate-wrapped) policy denoiser. ref_unet: frozen reference or None.
        spec: the :class:`sdpo.losses.LossSpec` of the method. pref: its :class:`Preference`.
        autocast: a context-manager factory (``accelerator.autocast``) for the reference.

    Returns: ``(loss, stats)``; stats always include ``loser_scale`` / ``loser_scale_min`` (λ).
    """
    family = parts.family
    gens = pair_generators(batch, seed, device)
    with torch.no_grad():
        if "latent_moments" in batch:  # cached (sdpo.data.cached): posterior moments + conditioning
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            posterior = DiagonalGaussianDistribution(batch["latent_moments"].to(device))
            cond = _to_device(batch["cond"], device)
        else:
            vae = parts.vae
            pixels = batch["pixel_values"].to(device)
            posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
            cond = parts.encode_prompts(batch["captions"], device)
        n_images = posterior.mean.shape[0] // len(gens)  # 2 for pairs, 1 for unpaired
        # One generator list entry per image: a pair's generator draws its winner's then its
        # loser's posterior sample, then (the objective) ε, then t.
        latents = parts.latents(posterior, gens * n_images)
        noise, timesteps = parts.objective.draw(gens, latents.shape, device)
        noise, input_noise = perturb_pair_noise(
            noise, gens, offset=pref.noise_offset, perturbation=pref.input_perturbation
        )
        repeat = (n_images, *([1] * (noise.ndim - 1)))
        noise, timesteps = noise.repeat(*repeat), timesteps.repeat(n_images)
        noisy, target = parts.objective.noisy_and_target(latents, noise, timesteps)
        if input_noise is not noise:  # input perturbation: the input moves, the target does not
            noisy, _ = parts.objective.noisy_and_target(
                latents, input_noise.repeat(*repeat), timesteps
            )
        cond = _repeat_cond(cond, n_images)

    model_pred = family.predict(unet, noisy, timesteps, cond)
    ref_pred = None
    if spec.needs_reference:
        with torch.no_grad(), autocast():
            ref_pred = family.predict(ref_unet, noisy, timesteps, cond).float()

    lam = torch.ones((), device=device)
    if pref.safeguard and spec.paired:
        from sdpo.safeguard import winner_preserving_scale

        lam = winner_preserving_scale(
            model_pred.detach(), target, pref.mu, per_pair=pref.per_pair, sync=pref.sync
        )
    loss, stats = spec.fn(
        model_pred,
        ref_pred,
        target,
        beta=pref.beta,
        loser_scale=lam,
        dmpo_alpha=pref.dmpo_alpha,
        **family.loss_kwargs,
    )
    stats = dict(stats)
    stats.setdefault("loser_scale", lam.float().mean())
    stats.setdefault("loser_scale_min", lam.float().min())
    return loss, stats


def _to_device(cond: dict, device) -> dict:
    return {
        k: _to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in cond.items()
    }


def _repeat_cond(cond: dict, n: int) -> dict:
    """Repeat every conditioning tensor n times along the batch (winners' copy, then losers')."""
    return {
        key: _repeat_cond(value, n)
        if isinstance(value, dict)
        else value.repeat(n, *([1] * (value.ndim - 1)))
        for key, value in cond.items()
    }


def build_optimizer(
    params,
    *,
    name: str,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
    fused: bool = False,
):
    """``name``: 'adamw' (``fused``: the fused CUDA kernel), 'adafactor' with the reference's
    settings, or 'adamw8bit' (bitsandbytes)."""
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=lr,
            weight_decay=weight_decay,
            clip_threshold=1.0,
            scale_parameter=False,
            relative_step=False,
        )
    adam = dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError(
                "--use_8bit_adam needs bitsandbytes: pip install bitsandbytes"
            ) from err
        return bnb.optim.AdamW8bit(params, **adam)
    # Default: torch's standard (foreach) implementation, as the reference.
    return torch.optim.AdamW(params, fused=fused, **adam)


class StepStats:
    """Stats of the micro-steps of one optimizer step, reduced over micro-steps and processes.

    Keys ending in ``_min`` take the minimum, every other key the mean; ``corrupt`` counts are
    summed (and kept as a running total).
    """

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.mins: dict[str, float] = {}
        self.micro_steps = 0
        self.corrupt_total = 0
        self._corrupt_new = 0

    def add(self, stats: dict, corrupt: int = 0) -> None:
        for key, value in stats.items():
            value = float(value)
            if key.endswith("_min"):
                self.mins[key] = min(self.mins.get(key, value), value)
            else:
                self.sums[key] = self.sums.get(key, 0.0) + value
        self.micro_steps += 1
        self._corrupt_new += int(corrupt)

    def reduce(self, accelerator) -> dict[str, float]:
        """Average (min) over micro-steps and processes; resets for the next optimizer step."""
        keys_mean, keys_min = sorted(self.sums), sorted(self.mins)
        local = [self.sums[k] / max(self.micro_steps, 1) for k in keys_mean]
        local += [self.mins[k] for k in keys_min] + [float(self._corrupt_new)]
        gathered = accelerator.gather(torch.tensor([local], device=accelerator.device)).cpu()
        out = {k: float(gathered[:, i].mean()) for i, k in enumerate(keys_mean)}
        offset = len(keys_mean)
        out.update({k: float(gathered[:, offset + i].min()) for i, k in enumerate(keys_min)})
        self.corrupt_total += int(gathered[:, -1].sum())
        out["corrupt_skipped"] = self.corrupt_total
        self.sums, self.mins, self.micro_steps, self._corrupt_new = {}, {}, 0, 0
        return out
