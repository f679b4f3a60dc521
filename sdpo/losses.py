"""Preference losses on noise predictions: Diffusion-DPO, DSPO, DMPO, plus plain SFT.

All functions are pure: tensors in, ``(loss, stats)`` out. Batch layout (shared by every loss):
``model_pred``, ``ref_pred``, ``target`` are ``[2B, C, H, W]`` with the B winners in rows
``0..B-1`` and their losers in rows ``B..2B-1``; pair i is (row i, row B+i) and shares one noise
tensor and timestep. ``target`` is that noise ε (epsilon prediction).

Shared quantities (computed in float32 whatever the prediction dtype):

    err_i      = mean_{C,H,W} (pred_i - ε_i)²                 per image, policy and reference
    u          = -β/2 · [(err_w - ref_err_w) - (λ⊙err_l - ref_err_l)]     one value per pair

where ``λ⊙err_l`` is the loser error whose *gradient* is scaled by the SDPO safeguard's λ
(:func:`sdpo.safeguard.scale_loser`; value unchanged). u is the implicit reward margin of
Diffusion-DPO (Wallace et al. 2023, Eq. 14 with the per-timestep ELBO weight folded into β).

Register new losses in :data:`LOSSES`; ``train.py`` builds ``--train_method`` choices from it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sdpo.safeguard import scale_loser

Stats = dict[str, torch.Tensor]

# DSPO's SDXL form switches branch on the batch mean of mean(δ_w²) (reference code).
DSPO_SDXL_SWITCH = 0.1
# DMPO clamps the target probability q = 1 - α away from 0 and 1 (reference code).
DMPO_Q_EPS = 1e-6


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32 (the reference's ``.float()``); float64 stays float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def per_image_error(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N, C, H, W]`` x2 -> ``[N]``: mean squared error of each image, float32 or better."""
    return (_upcast(pred) - _upcast(target)).square().mean(dim=tuple(range(1, pred.ndim)))


@dataclass
class PreferenceTerms:
    """What every paired loss is built from (``[B]`` tensors unless noted)."""

    u: torch.Tensor  # the margin, with the loser's gradient scaled by λ
    model_err: torch.Tensor  # [2B] policy errors (with grad)
    ref_err: torch.Tensor  # [2B] reference errors (no grad)
    loser_scale: torch.Tensor  # 0-dim or [B], detached


def preference_terms(
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float,
    loser_scale: torch.Tensor | float = 1.0,
) -> PreferenceTerms:
    """The shared preference margin u of all three paired losses (see module docstring)."""
    if not (model_pred.shape == ref_pred.shape == target.shape):
        raise ValueError(
            f"model_pred {tuple(model_pred.shape)}, ref_pred {tuple(ref_pred.shape)} and target "
            f"{tuple(target.shape)} must have the same shape [2B, C, H, W]"
        )
    if model_pred.shape[0] % 2:
        raise ValueError(f"a batch of {model_pred.shape[0]} rows is not winner/loser pairs")
    model_err = per_image_error(model_pred, target)
    ref_err = per_image_error(ref_pred.detach(), target)
    model_err_w, model_err_l = model_err.chunk(2)
    ref_err_w, ref_err_l = ref_err.chunk(2)
    model_err_l = scale_loser(model_err_l, loser_scale)
    u = -0.5 * beta * ((model_err_w - ref_err_w) - (model_err_l - ref_err_l))
    lam = torch.as_tensor(loser_scale, dtype=torch.float32, device=u.device).detach()
    return PreferenceTerms(u=u, model_err=model_err, ref_err=ref_err, loser_scale=lam)


def preference_stats(terms: PreferenceTerms, loss: torch.Tensor) -> Stats:
    """Detached scalars to log for a paired loss."""
    model_err_w, model_err_l = terms.model_err.detach().chunk(2)
    ref_err_w, ref_err_l = terms.ref_err.chunk(2)
    return {
        "loss": loss.detach(),
        # Fraction of pairs the policy already ranks right (margin u > 0), as the reference logs it.
        "implicit_acc": (terms.u.detach() > 0).float().mean(),
        "margin": terms.u.detach().mean(),
        "model_mse": terms.model_err.detach().mean(),
        "ref_mse": terms.ref_err.mean(),
        "winner_diff": (model_err_w - ref_err_w).mean(),
        "loser_diff": (model_err_l - ref_err_l).mean(),
        "loser_scale": terms.loser_scale.float().mean(),
        "loser_scale_min": terms.loser_scale.float().min(),
    }


def diffusion_dpo_loss(model_pred, ref_pred, target, *, beta, loser_scale=1.0, **_) -> tuple:
    """Diffusion-DPO (Wallace et al. 2023, Eq. 14): ``L = mean_pairs -log σ(u)``.

    Shapes: ``[2B, C, H, W]`` inputs, winners first; returns ``(0-dim loss, stats)``.
    """
    terms = preference_terms(model_pred, ref_pred, target, beta=beta, loser_scale=loser_scale)
    loss = -F.logsigmoid(terms.u).mean()
    return loss, preference_stats(terms, loss)


def dmpo_loss(model_pred, ref_pred, target, *, beta, loser_scale=1.0, dmpo_alpha=0.0, **_):
    """DMPO: ``KL(Bernoulli(σ(u)) ‖ Bernoulli(q))`` with ``q = clamp(1 - α, 1e-6, 1 - 1e-6)``.

    ``L = mean_pairs p (log p - log q) + (1 - p)(log(1 - p) - log(1 - q))``, ``p = σ(u)``, with
    ``log p = -softplus(-u)`` and ``log(1 - p) = -softplus(u)`` for stability. Minimised at
    ``u = logit(q)``: α > 0 stops pushing the margin once the winner is preferred with
    probability 1 - α. Shapes: ``[2B, C, H, W]`` inputs, winners first.
    """
    terms = preference_terms(model_pred, ref_pred, target, beta=beta, loser_scale=loser_scale)
    u = terms.u
    q = min(max(1.0 - float(dmpo_alpha), DMPO_Q_EPS), 1.0 - DMPO_Q_EPS)
    p = torch.sigmoid(u)
    log_p, log_1mp = -F.softplus(-u), -F.softplus(u)
    kl = p * (log_p - math.log(q)) + (1.0 - p) * (log_1mp - math.log1p(-q))
    loss = kl.mean()
    return loss, preference_stats(terms, loss)


def dspo_loss(model_pred, ref_pred, target, *, beta, loser_scale=1.0, sdxl=False, **_):
    """DSPO (score-matching form of the preference objective), as the reference computes it.

    With ``δ_w = pred_w - ref_pred_w`` and ``w = 1 - σ(u)`` (one weight per pair):

    - SD1.5 form: ``L = mean_pairs mean_{C,H,W} ((pred_w - ε_w) - β w δ_w)²``; nothing detached.
    - SDXL form (``sdxl=True``): if ``mean_pairs mean_{C,H,W} δ_w² >= 0.1``,
      ``L = mean_pairs mean_{C,H,W} (w δ_w)²``, else ``L = mean_pairs w²``.

    Shapes: ``[2B, C, H, W]`` inputs, winners first; returns ``(0-dim loss, stats)``.
    """
    terms = preference_terms(model_pred, ref_pred, target, beta=beta, loser_scale=loser_scale)
    weight = 1.0 - torch.sigmoid(terms.u)  # [B]
    pred_w = _upcast(model_pred).chunk(2)[0]
    delta_w = pred_w - _upcast(ref_pred.detach()).chunk(2)[0]
    w = weight.view(-1, *([1] * (delta_w.ndim - 1)))
    dims = tuple(range(1, delta_w.ndim))
    if not sdxl:
        eps_w = _upcast(target).chunk(2)[0]
        loss = ((pred_w - eps_w) - beta * w * delta_w).square().mean(dims).mean()
    elif delta_w.detach().square().mean(dims).mean() >= DSPO_SDXL_SWITCH:
        loss = (w * delta_w).square().mean(dims).mean()
    else:
        loss = weight.square().mean()
    return loss, preference_stats(terms, loss)


def sft_loss(model_pred: torch.Tensor, target: torch.Tensor, *_, **__) -> tuple:
    """Supervised fine-tuning: ``mse(pred, ε)`` over every element of ``[N, C, H, W]``."""
    loss = F.mse_loss(_upcast(model_pred), _upcast(target))
    return loss, {"loss": loss.detach(), "model_mse": loss.detach()}


def _sft_entry(model_pred, ref_pred, target, **_):
    return sft_loss(model_pred, target)


@dataclass(frozen=True)
class LossSpec:
    """A registered training objective and what the training step must feed it."""

    fn: Callable[..., tuple[torch.Tensor, Stats]]
    needs_reference: bool  # run the frozen reference UNet
    paired: bool  # batches are winner/loser pairs (else: preferred images only)


LOSSES: dict[str, LossSpec] = {
    "diffusion-dpo": LossSpec(diffusion_dpo_loss, needs_reference=True, paired=True),
    "dspo": LossSpec(dspo_loss, needs_reference=True, paired=True),
    "dmpo": LossSpec(dmpo_loss, needs_reference=True, paired=True),
    "sft": LossSpec(_sft_entry, needs_reference=False, paired=False),
}


def preference_loss(
    method: str,
    model_pred: torch.Tensor,
    ref_pred: torch.Tensor | None,
    target: torch.Tensor,
    *,
    beta: float,
    loser_scale: torch.Tensor | float = 1.0,
    dmpo_alpha: float = 0.0,
    sdxl: bool = False,
) -> tuple[torch.Tensor, Stats]:
    """Look ``method`` up in :data:`LOSSES` and apply it (see each loss for its formula)."""
    if method not in LOSSES:
        raise ValueError(f"unknown train_method {method!r}; choose one of {sorted(LOSSES)}")
    return LOSSES[method].fn(
        model_pred,
        ref_pred,
        target,
        beta=beta,
        loser_scale=loser_scale,
        dmpo_alpha=dmpo_alpha,
        sdxl=sdxl,
    )
