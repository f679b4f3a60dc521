"""The SDPO winner-preserving safeguard (arXiv 2511.03317, Sec. 4, Eq. 15-17, Algorithm 1).

Preference losses push the winner's noise-prediction error down and the loser's up. Because the
two images share a prompt, noise and timestep, the loser's gradient is usually aligned with the
winner's, so "push the loser's error up" also pushes the winner's error up. The safeguard rescales
only the loser branch's gradient by a detached λ ∈ [0, 1] chosen so that, to first order in the
UNet's output, the combined update does not increase the winner's error.

With output-space gradients of the two mean-squared errors, ``g_w = ∇ mse_w`` and
``g_l = ∇ mse_l``, the update on the output is ``-g_w + λ g_l``. Asking it to decrease the winner's
error at least by a fraction μ of plain winner descent,

    (-g_w + λ g_l) · g_w  <=  -μ ‖g_w‖²       (paper Eq. 15)

gives, when ``⟨g_l, g_w⟩ > 0``,

    λ = clamp((1 - μ) ‖g_w‖² / ⟨g_l, g_w⟩, 0, 1)     (Eq. 16-17)

and λ = 1 otherwise (the loser's push already helps or is orthogonal to the winner). μ = 0 is the
loosest guarantee (winner error does not rise), μ → 1 is the most conservative (λ → 0).

Since ``g = 2 r / N`` with the residual ``r = pred - ε`` and N the number of elements averaged,
λ is a function of ``‖r_w‖²`` and ``⟨r_w, r_l⟩`` alone; we compute it in closed form (no autograd
pass) and keep the reference implementation's ``1e-9`` added to the gradient-space denominator,
so the default reproduces it exactly.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The reference adds this to <g_l, g_w> (gradient space, g = 2r/N) before dividing.
REFERENCE_DEN_EPS = 1e-9


def check_mu(mu: float) -> float:
    """Return ``mu`` as a float, or raise ``ValueError`` if it is not in [0, 1]."""
    mu = float(mu)
    if not 0.0 <= mu <= 1.0:  # also rejects NaN
        raise ValueError(
            f"winner_preserving_mu must be in [0, 1] (0 = just keep the winner's error from "
            f"rising, 1 = most conservative); got {mu}"
        )
    return mu


def winner_preserving_scale(
    model_pred: torch.Tensor,
    target: torch.Tensor,
    mu: float,
    *,
    per_pair: bool = False,
    sync: bool = False,
) -> torch.Tensor:
    """The loser-branch gradient scale λ of the SDPO safeguard.

    Args:
        model_pred: ``[2B, C, H, W]`` policy noise predictions, winners in rows ``0..B-1``,
            losers in rows ``B..2B-1`` (only its value is used; no gradient flows).
        target: ``[2B, C, H, W]`` the noise ε each image was noised with.
        mu: conservativeness μ ∈ [0, 1].
        per_pair: ``False`` (the reference rule): one λ from the residuals of the whole
            micro-batch. ``True`` (our extension): the same rule on each pair's own residuals,
            so no single pair's winner error rises to first order.
        sync: ``True`` sums the numerator, denominator and element count over all
            ``torch.distributed`` processes before dividing, so λ follows the global batch
            (collective call: every process must make it). Ignored when not initialised.
            Default ``False``: one λ per process and micro-batch, as the reference.

    Returns:
        Detached λ in [0, 1]: a 0-dim tensor, or ``[B]`` with ``per_pair=True``. Float32
        (float64 for float64 inputs) whatever the input dtype; never NaN or Inf.
    """
    mu = check_mu(mu)
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} differ"
        )
    if model_pred.shape[0] % 2:
        raise ValueError(f"batch of {model_pred.shape[0]} rows is not winner/loser pairs")

    # Reductions of ~1e5-1e6 bf16 elements need float32 accumulation to be exact enough.
    dtype = torch.promote_types(model_pred.dtype, torch.float32)
    with torch.no_grad():
        residual = model_pred.detach().to(dtype) - target.detach().to(dtype)
        r_w, r_l = residual.chunk(2)
        reduce_dims = tuple(range(1, residual.ndim)) if per_pair else tuple(range(residual.ndim))
        num = r_w.square().sum(reduce_dims)  # ‖r_w‖²
        den = (r_w * r_l).sum(reduce_dims)  # ⟨r_w, r_l⟩
        n = torch.full_like(num, r_w[0].numel() if per_pair else r_w.numel())
        if sync and dist.is_available() and dist.is_initialized():
            totals = torch.stack([num, den, n])
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            num, den, n = totals.unbind(0)
        # Gradient space of the reference: g = 2r/N, so ‖g_w‖² and <g_l, g_w> carry (2/N)².
        grad_scale = (2.0 / n).square()
        num_g, den_g = num * grad_scale, den * grad_scale
        capped = ((1.0 - mu) * num_g / (den_g + REFERENCE_DEN_EPS)).clamp(0.0, 1.0)
        lam = torch.where(den_g > 0, capped, torch.ones_like(capped))
        # Inf/NaN residuals (a diverged step) must not poison the update further: fall back to 1.
        lam = torch.where(torch.isfinite(lam), lam, torch.ones_like(lam))
    return lam


def scale_loser(err_l: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
    """Straight-through rescale of the loser errors' gradient (paper Algorithm 1).

    ``sg(err_l) + λ (err_l - sg(err_l))``: the forward value is ``err_l`` exactly, the gradient
    is λ times the plain one.

    Args:
        err_l: ``[B]`` per-pair loser errors (with grad).
        lam: a float, a 0-dim tensor or a ``[B]`` tensor (one λ per pair).
    """
    if isinstance(lam, (int, float)) and lam == 1.0:
        return err_l
    lam = torch.as_tensor(lam, dtype=err_l.dtype, device=err_l.device).detach()
    if lam.ndim not in (0, 1) or (lam.ndim == 1 and lam.shape[0] != err_l.shape[0]):
        raise ValueError(
            f"loser scale of shape {tuple(lam.shape)} does not fit {err_l.shape[0]} pairs"
        )
    frozen = err_l.detach()
    return frozen + lam * (err_l - frozen)
