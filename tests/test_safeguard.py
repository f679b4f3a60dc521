"""The SDPO safeguard: λ against the reference rule, straight-through scaling, the guarantee.

The reference rule (formulas.md, "Safeguard") is recomputed here independently, the way the
reference code does it: gradients of the two mean-squared errors by ``torch.autograd.grad``.
"""

import os
import socket
import zlib

import pytest
import torch
import torch.multiprocessing as mp

from sdpo.losses import preference_loss
from sdpo.safeguard import check_mu, scale_loser, winner_preserving_scale

METHODS = ["diffusion-dpo", "dspo", "dmpo"]
MUS = [0.0, 0.2, 0.6, 0.9, 1.0]


def reference_lambda(model_pred, target, mu):
    """λ as the reference computes it: autograd gradients of mse_w and mse_l (float64)."""
    b = model_pred.shape[0] // 2
    pred_w = model_pred[:b].detach().clone().requires_grad_(True)
    pred_l = model_pred[b:].detach().clone().requires_grad_(True)
    mse_w = ((pred_w - target[:b]) ** 2).mean()
    mse_l = ((pred_l - target[b:]) ** 2).mean()
    (g_w,) = torch.autograd.grad(mse_w, pred_w)
    (g_l,) = torch.autograd.grad(mse_l, pred_l)
    num = g_w.pow(2).sum()
    den = (g_l * g_w).sum()
    if den > 0:
        return torch.clamp((1 - mu) * num / (den + 1e-9), 0.0, 1.0)
    return torch.tensor(1.0, dtype=num.dtype)


def residual_draw(gen, b, shape, kind):
    """Predictions and targets whose winner/loser residuals are aligned, anti-aligned or random."""
    target = torch.randn(2 * b, *shape, generator=gen, dtype=torch.float64)
    r_w = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    scale = float(torch.rand((), generator=gen, dtype=torch.float64)) * 3
    r_l = {
        "aligned": scale * r_w + 0.3 * noise,
        "anti": -scale * r_w + 0.3 * noise,
        "random": noise,
    }[kind]
    return torch.cat([r_w, r_l]) + target, target


@pytest.mark.parametrize("kind", ["aligned", "anti", "random"])
def test_lambda_equals_the_autograd_reference_rule(kind):
    gen = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(60):
        b = int(torch.randint(1, 5, (), generator=gen))
        pred, target = residual_draw(gen, b, (4, 6, 6), kind)
        for mu in MUS:
            ours = winner_preserving_scale(pred, target, mu)
            ref = reference_lambda(pred, target, mu)
            assert ours.shape == () and ours.dtype == torch.float64
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-15)
            seen.append(float(ours))
    seen = torch.tensor(seen)
    if kind == "anti":
        assert (seen == 1).float().mean() > 0.9  # anti-aligned residuals: den <= 0 -> λ = 1
    if kind == "aligned":
        assert ((seen > 0) & (seen < 1)).float().mean() > 0.5  # the clamp is really in play


def test_the_reference_eps_is_kept_in_gradient_space():
    # ⟨g_l, g_w⟩ = (2/N)² ⟨r_l, r_w⟩ is tiny for a large batch, so the reference's 1e-9 shifts λ
    # measurably; a formula without it (or with it in residual space) would differ.
    b, shape = 8, (4, 64, 64)
    n = b * 4 * 64 * 64
    r_w = torch.full((b, *shape), 0.01, dtype=torch.float64)
    pred = torch.cat([r_w, 2 * r_w])
    target = torch.zeros_like(pred)
    ours = winner_preserving_scale(pred, target, 0.0)
    torch.testing.assert_close(ours, reference_lambda(pred, target, 0.0), rtol=1e-12, atol=0)
    num_g = (2 / n) ** 2 * n * 1e-4
    assert ours.item() == pytest.approx(num_g / (2 * num_g + 1e-9), rel=1e-12)
    assert abs(ours.item() - 0.5) > 1e-3


def test_degenerate_residuals_give_lambda_one_and_never_nan():
    zeros = torch.zeros(4, 2, 3, 3)
    assert winner_preserving_scale(zeros, zeros, 0.5).item() == 1.0  # zero residuals
    pred = torch.zeros(4, 2, 3, 3)
    pred[:2] = 1.0
    pred[2:] = -1.0  # exactly anti-aligned
    assert winner_preserving_scale(pred, torch.zeros_like(pred), 0.0).item() == 1.0
    pred[2:] = torch.inf  # a diverged loser prediction
    lam = winner_preserving_scale(pred, torch.zeros_like(pred), 0.0)
    assert torch.isfinite(lam) and 0 <= lam.item() <= 1
    pred[2:] = torch.nan
    assert winner_preserving_scale(pred, torch.zeros_like(pred), 0.3).item() == 1.0


@pytest.mark.parametrize("mu", [-0.1, 1.5, float("nan")])
def test_mu_outside_unit_interval_is_a_clear_error(mu):
    x = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match=r"winner_preserving_mu must be in \[0, 1\]"):
        winner_preserving_scale(x, x, mu)
    with pytest.raises(ValueError):
        check_mu(mu)


def test_per_pair_lambda_is_the_rule_on_each_pair():
    gen = torch.Generator().manual_seed(1)
    pred, target = residual_draw(gen, 5, (3, 4, 4), "aligned")
    lam = winner_preserving_scale(pred, target, 0.3, per_pair=True)
    assert lam.shape == (5,)
    for i in range(5):
        one = torch.stack([pred[i], pred[5 + i]])
        one_target = torch.stack([target[i], target[5 + i]])
        torch.testing.assert_close(
            lam[i], reference_lambda(one, one_target, 0.3), rtol=1e-12, atol=0
        )


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_low_precision_inputs_give_finite_lambda_close_to_float64(dtype, tol):
    gen = torch.Generator().manual_seed(2)
    for kind in ("aligned", "anti", "random"):
        for _ in range(10):
            pred, target = residual_draw(gen, 4, (4, 16, 16), kind)
            for mu in (0.0, 0.6):
                exact = winner_preserving_scale(pred, target, mu)
                low = winner_preserving_scale(pred.to(dtype), target.to(dtype), mu)
                assert low.dtype == torch.float32 and torch.isfinite(low)
                assert 0.0 <= low.item() <= 1.0
                # λ is a ratio of sums of ~1e3 products: relative error ~ the dtype's epsilon.
                assert low.item() == pytest.approx(exact.item(), abs=tol)
    # Residuals whose squares overflow fp16 if accumulated in fp16 still give a finite λ.
    big = torch.full((2, 4, 32, 32), 200.0, dtype=torch.float16)
    big[1] = 100.0
    lam = winner_preserving_scale(big, torch.zeros_like(big), 0.0)
    assert lam.item() == pytest.approx(1.0)


def test_scale_loser_keeps_value_and_scales_gradient():
    gen = torch.Generator().manual_seed(3)
    err = torch.rand(6, generator=gen, dtype=torch.float64).requires_grad_(True)
    weights = torch.randn(6, generator=gen, dtype=torch.float64)
    for lam in (torch.tensor(0.37, dtype=torch.float64), torch.rand(6, dtype=torch.float64)):
        scaled = scale_loser(err, lam)
        assert torch.equal(scaled, err)
        (grad,) = torch.autograd.grad((weights * scaled).sum(), err)
        torch.testing.assert_close(grad, lam * weights, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="does not fit 6 pairs"):
        scale_loser(err, torch.ones(3))


def predictions(seed, b=3, shape=(4, 5, 5)):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(2 * b, *shape, generator=gen, dtype=torch.float64)
    ref = target + 0.5 * torch.randn(2 * b, *shape, generator=gen, dtype=torch.float64)
    model = ref + 0.05 * torch.randn(2 * b, *shape, generator=gen, dtype=torch.float64)
    return model, ref, target


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sdxl", [False, True])
def test_safeguarded_loss_keeps_value_and_scales_only_the_loser_gradient(method, sdxl):
    model, ref, target = predictions(4)
    b = model.shape[0] // 2
    kwargs = dict(beta=40.0, dmpo_alpha=0.01, sdxl=sdxl)
    for lam in (torch.tensor(0.25, dtype=torch.float64), torch.tensor([0.1, 0.5, 0.9])):
        plain_pred = model.clone().requires_grad_(True)
        plain, _ = preference_loss(method, plain_pred, ref, target, **kwargs)
        (g_plain,) = torch.autograd.grad(plain, plain_pred)
        safe_pred = model.clone().requires_grad_(True)
        safe, stats = preference_loss(method, safe_pred, ref, target, loser_scale=lam, **kwargs)
        (g_safe,) = torch.autograd.grad(safe, safe_pred)
        assert safe.item() == plain.item()
        torch.testing.assert_close(g_safe[:b], g_plain[:b], rtol=1e-12, atol=1e-18)
        per_pair = lam.to(torch.float64).expand(b).view(b, 1, 1, 1)
        torch.testing.assert_close(g_safe[b:], per_pair * g_plain[b:], rtol=1e-12, atol=1e-18)
        assert stats["loser_scale"].item() == pytest.approx(lam.float().mean().item())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sdxl", [False, True])
def test_lambda_one_is_identical_to_plain_training(method, sdxl):
    model, ref, target = predictions(5)
    kwargs = dict(beta=40.0, dmpo_alpha=0.01, sdxl=sdxl)
    plain_pred = model.clone().requires_grad_(True)
    plain, _ = preference_loss(method, plain_pred, ref, target, **kwargs)
    (g_plain,) = torch.autograd.grad(plain, plain_pred)
    for one in (1.0, torch.tensor(1.0), torch.ones(3)):
        pred = model.clone().requires_grad_(True)
        loss, _ = preference_loss(method, pred, ref, target, loser_scale=one, **kwargs)
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.equal(loss, plain) and torch.equal(grad, g_plain)


# --- The guarantee -------------------------------------------------------------------------
#
# A model whose prediction does not depend on its input: one parameter tensor θ ([B, C, H, W])
# is the prediction for the winner AND the loser of each pair, so output space = parameter space
# and the output-space proxy of the safeguard is exact. Winner and loser have different targets,
# as the real UNet sees different noisy inputs. mse_w is exactly quadratic in θ:
#     mse_w(θ + Δ) - mse_w(θ) = <∇mse_w, Δ> + ‖Δ‖² / N,
# so the second-order term is known exactly and the test bounds it by that: a safeguarded step
# must satisfy  Δmse_w <= ‖Δ‖² / N  (the first-order term is <= 0).
#
# Where the guarantee applies: the three losses move the winner and loser errors through the
# margin u with equal and opposite weights c·(g_w - λ g_l), c >= 0 (DPO always; DMPO while
# u < logit(1 - α), i.e. while it still pushes the margin up -- past its target it pulls the
# margin back down ON PURPOSE; DSPO-SDXL's w² branch). DSPO's score-matching term adds a direct
# pull towards ε_w and the reference, which the safeguard does not touch; in the regime of real
# training (the policy within a small δ of the reference) that term itself decreases the winner
# error, so the draws below keep the policy near the reference as fine-tuning does.


def guarantee_draw(gen, b, shape, delta):
    """θ, the [2B] reference prediction and targets with aligned residuals (the hard case)."""
    eps_w = torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    theta = eps_w + torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    # Loser target behind the winner's: r_l = s·r_w + noise, s up to 3 (the loser is worse).
    s = 0.5 + 2.5 * float(torch.rand((), generator=gen, dtype=torch.float64))
    r_l = s * (theta - eps_w) + 0.5 * torch.randn(b, *shape, generator=gen, dtype=torch.float64)
    eps_l = theta - r_l
    ref = torch.cat([theta, theta]) + delta * torch.randn(
        2 * b, *shape, generator=gen, dtype=torch.float64
    )
    return theta, ref, torch.cat([eps_w, eps_l])


def sgd_step(method, theta, ref, target, *, beta, lr, mu, per_pair, safeguard=True, **kwargs):
    """One SGD step on θ; returns Δθ."""
    theta = theta.clone().requires_grad_(True)
    pred = torch.cat([theta, theta])
    lam = winner_preserving_scale(pred, target, mu, per_pair=per_pair) if safeguard else 1.0
    loss, stats = preference_loss(method, pred, ref, target, beta=beta, loser_scale=lam, **kwargs)
    (grad,) = torch.autograd.grad(loss, theta)
    return -lr * grad, stats


def winner_mse(theta, eps_w):
    return ((theta - eps_w) ** 2).mean(dim=tuple(range(1, theta.ndim)))  # [B]


# (method, sdxl form, β, dmpo α) in the regime where the argument above applies.
GUARANTEE_CASES = [
    ("diffusion-dpo", False, 50.0, 0.0),
    ("dmpo", False, 50.0, 0.0),
    ("dmpo", False, 5.0, 0.01),
    ("dspo", False, 0.001, 0.0),  # the SD1.5 recipe's β
    ("dspo", True, 50.0, 0.0),  # SDXL form, w² branch (policy within δ² < 0.1 of the reference)
]


@pytest.mark.parametrize("method,sdxl,beta,alpha", GUARANTEE_CASES)
@pytest.mark.parametrize("per_pair", [False, True])
def test_safeguarded_step_never_increases_the_winner_error(method, sdxl, beta, alpha, per_pair):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{method}{sdxl}{per_pair}".encode()))
    shape = (2, 4, 4)
    # The batch rule bounds the sum over the micro-batch, which is the winner error only if
    # every pair weighs the same; with B = 1 it always does. The per-pair rule bounds each pair.
    b = 3 if per_pair else 1
    kwargs = dict(beta=beta, lr=1e-2, per_pair=per_pair, dmpo_alpha=alpha, sdxl=sdxl)
    plain_rises = 0
    for draw in range(200):
        mu = [0.0, 0.3, 0.9][draw % 3]
        theta, ref, target = guarantee_draw(gen, b, shape, delta=0.05)
        eps_w = target[:b]
        step, stats = sgd_step(method, theta, ref, target, mu=mu, **kwargs)
        if method == "dmpo":
            assert stats["margin"].max().item() < torch.logit(torch.tensor(1 - max(alpha, 1e-6)))
        rise = winner_mse(theta + step, eps_w) - winner_mse(theta, eps_w)  # [B]
        second_order = step.pow(2).mean(dim=(1, 2, 3))  # ‖Δ_i‖² / N, exact for an MSE
        assert (rise <= second_order + 1e-15).all(), (draw, rise, second_order)
        plain, _ = sgd_step(method, theta, ref, target, mu=mu, safeguard=False, **kwargs)
        plain_rise = winner_mse(theta + plain, eps_w) - winner_mse(theta, eps_w)
        plain_rises += bool((plain_rise > plain.pow(2).mean(dim=(1, 2, 3)) + 1e-15).any())
    if (method, sdxl) == ("dspo", False):
        # At the SD1.5 recipe's β = 0.001 DSPO's preference term is ~β² small: the score-matching
        # pull dominates and the winner error falls with or without the safeguard.
        assert plain_rises == 0
    else:
        assert plain_rises > 50  # without the safeguard these draws do raise the winner error


def test_plain_dpo_does_increase_the_winner_error_on_a_concrete_draw():
    # One pair; the loser's residual is 3x the winner's and aligned with it: pushing the loser's
    # error up drags θ away from ε_w too. With λ = 1 the winner error rises at first order.
    shape = (1, 2, 2)
    eps_w = torch.zeros(1, *shape, dtype=torch.float64)
    theta = torch.full((1, *shape), 0.5, dtype=torch.float64)  # r_w = 0.5
    eps_l = theta - 1.5  # r_l = 1.5 = 3 r_w
    target = torch.cat([eps_w, eps_l])
    ref = torch.cat([theta, theta])
    plain, _ = sgd_step(
        "diffusion-dpo",
        theta,
        ref,
        target,
        beta=50.0,
        lr=1e-2,
        mu=0.0,
        per_pair=False,
        safeguard=False,
    )
    rise_plain = (winner_mse(theta + plain, eps_w) - winner_mse(theta, eps_w)).item()
    second_order = plain.pow(2).mean().item()
    assert rise_plain > 10 * second_order > 0  # a first-order increase, not curvature
    safe, stats = sgd_step(
        "diffusion-dpo", theta, ref, target, beta=50.0, lr=1e-2, mu=0.0, per_pair=False
    )
    assert stats["loser_scale"].item() == pytest.approx(1 / 3, rel=1e-6)
    rise_safe = (winner_mse(theta + safe, eps_w) - winner_mse(theta, eps_w)).item()
    assert rise_safe <= safe.pow(2).mean().item() + 1e-15
    # μ > 0 turns "does not rise" into "falls": here by at least μ times plain winner descent.
    safe_mu, _ = sgd_step(
        "diffusion-dpo", theta, ref, target, beta=50.0, lr=1e-2, mu=0.5, per_pair=False
    )
    assert (winner_mse(theta + safe_mu, eps_w) - winner_mse(theta, eps_w)).item() < 0


def test_per_pair_rule_protects_every_pair_where_the_batch_rule_does_not():
    # Two pairs with very different residual geometry; the batch λ is dominated by the pair with
    # large residuals and leaves the other pair's winner exposed. The per-pair λ protects both.
    shape = (1, 2, 2)
    theta = torch.cat([torch.full((1, *shape), 0.1), torch.full((1, *shape), 2.0)]).double()
    eps_w = torch.zeros_like(theta)
    eps_l = theta - torch.cat([3 * (theta[:1] - 0), -0.5 * theta[1:]])  # aligned / anti-aligned
    target = torch.cat([eps_w, eps_l])
    ref = torch.cat([theta, theta])
    kw = dict(beta=50.0, lr=1e-2, mu=0.0)
    batch, _ = sgd_step("diffusion-dpo", theta, ref, target, per_pair=False, **kw)
    pairs, _ = sgd_step("diffusion-dpo", theta, ref, target, per_pair=True, **kw)
    rise_batch = winner_mse(theta + batch, eps_w) - winner_mse(theta, eps_w)
    rise_pairs = winner_mse(theta + pairs, eps_w) - winner_mse(theta, eps_w)
    assert rise_batch[0] > 10 * batch[0].pow(2).mean()  # pair 0's winner error rises
    assert (rise_pairs <= pairs.pow(2).mean(dim=(1, 2, 3)) + 1e-15).all()
    # ...while the batch rule still keeps the batch total from rising (equal pair weights, u = 0).
    assert rise_batch.sum() <= batch.pow(2).mean(dim=(1, 2, 3)).sum() + 1e-15


def _sync_worker(rank, world, port, pred, target, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    b = pred.shape[0] // 2
    half = b // world
    local = torch.cat(
        [pred[rank * half : (rank + 1) * half], pred[b + rank * half : b + (rank + 1) * half]]
    )
    local_t = torch.cat(
        [target[rank * half : (rank + 1) * half], target[b + rank * half : b + (rank + 1) * half]]
    )
    out[rank, 0] = winner_preserving_scale(local, local_t, 0.2, sync=True)
    out[rank, 1] = winner_preserving_scale(local, local_t, 0.2, sync=False)
    torch.distributed.destroy_process_group()


def test_synced_lambda_equals_lambda_of_the_global_batch():
    gen = torch.Generator().manual_seed(6)
    r_w = torch.randn(4, 2, 4, 4, generator=gen, dtype=torch.float64)
    # Process 0 gets pairs whose loser residual is 3x the winner's, process 1 gets 1.5x.
    r_l = r_w * torch.tensor([3.0, 3.0, 1.5, 1.5], dtype=torch.float64).view(4, 1, 1, 1)
    target = torch.randn(8, 2, 4, 4, generator=gen, dtype=torch.float64)
    pred = torch.cat([r_w, r_l]) + target
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = torch.zeros(2, 2, dtype=torch.float64).share_memory_()
    mp.spawn(_sync_worker, args=(2, port, pred, target, out), nprocs=2, join=True)
    global_lam = winner_preserving_scale(pred, target, 0.2)
    torch.testing.assert_close(out[:, 0], global_lam.expand(2), rtol=1e-12, atol=0)
    # Unsynced, each process has its own λ: (1 - μ) / 3 and (1 - μ) / 1.5 here.
    torch.testing.assert_close(out[:, 1], torch.tensor([0.8 / 3, 0.8 / 1.5], dtype=torch.float64))
