"""The three preference losses and SFT against hand-computed values (formulas.md, "Losses")."""

import math

import pytest
import torch

from sdpo.losses import LOSSES, preference_loss, sft_loss

METHODS = ["diffusion-dpo", "dspo", "dmpo"]


def pairs_with_errors(model_w, ref_w, model_l, ref_l, shape=(1, 1, 1)):
    """Predictions whose per-image errors are exactly the given values (target ε = 0).

    Each image is a constant tensor sqrt(err), so mean((pred - 0)²) = err. Returns the
    ``[2B, *shape]`` model prediction, reference prediction and target.
    """
    model = torch.tensor(list(model_w) + list(model_l), dtype=torch.float64).sqrt()
    ref = torch.tensor(list(ref_w) + list(ref_l), dtype=torch.float64).sqrt()
    view = (-1,) + (1,) * len(shape)
    model = model.view(view).expand(-1, *shape).clone()
    ref = ref.view(view).expand(-1, *shape).clone()
    return model, ref, torch.zeros_like(model)


def margin(model_w, ref_w, model_l, ref_l, beta):
    """u = -β/2 [(model_w - ref_w) - (model_l - ref_l)], by hand (python floats)."""
    return -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))


def test_registry_has_the_four_methods_with_their_needs():
    assert set(LOSSES) == {"diffusion-dpo", "dspo", "dmpo", "sft"}
    assert all(LOSSES[m].paired and LOSSES[m].needs_reference for m in METHODS)
    assert not LOSSES["sft"].paired and not LOSSES["sft"].needs_reference


def test_unknown_method_is_a_clear_error():
    x = torch.zeros(2, 1, 1, 1)
    with pytest.raises(ValueError, match="unknown train_method 'ppo'"):
        preference_loss("ppo", x, x, x, beta=1.0)


def test_odd_batch_and_shape_mismatch_are_clear_errors():
    x = torch.zeros(3, 1, 2, 2)
    with pytest.raises(ValueError, match="not winner/loser pairs"):
        preference_loss("diffusion-dpo", x, x, x, beta=1.0)
    with pytest.raises(ValueError, match="same shape"):
        preference_loss(
            "diffusion-dpo",
            torch.zeros(2, 1, 2, 2),
            torch.zeros(2, 1, 2, 3),
            torch.zeros(2, 1, 2, 2),
            beta=1.0,
        )


def test_dpo_is_log2_when_policy_equals_reference():
    torch.manual_seed(0)
    pred = torch.randn(8, 4, 3, 3)
    target = torch.randn(8, 4, 3, 3)
    loss, stats = preference_loss("diffusion-dpo", pred, pred.clone(), target, beta=5000.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert stats["implicit_acc"].item() == 0.0  # u == 0 is not counted as a win
    assert stats["winner_diff"].item() == 0.0 and stats["loser_diff"].item() == 0.0


def test_dpo_hand_values_and_stats():
    errs = dict(model_w=[0.30, 0.10], ref_w=[0.20, 0.25], model_l=[0.40, 0.05], ref_l=[0.35, 0.15])
    beta = 10.0
    model, ref, target = pairs_with_errors(**errs)
    loss, stats = preference_loss("diffusion-dpo", model, ref, target, beta=beta)
    us = [
        margin(*(errs[k][i] for k in ("model_w", "ref_w", "model_l", "ref_l")), beta)
        for i in range(2)
    ]
    # u_0 = -5 * (0.10 - 0.05) = -0.25, u_1 = -5 * (-0.15 + 0.10) = 0.25
    assert us == pytest.approx([-0.25, 0.25])
    expected = sum(math.log1p(math.exp(-u)) for u in us) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["implicit_acc"].item() == 0.5
    assert stats["winner_diff"].item() == pytest.approx(((0.30 - 0.20) + (0.10 - 0.25)) / 2)
    assert stats["loser_diff"].item() == pytest.approx(((0.40 - 0.35) + (0.05 - 0.15)) / 2)
    assert stats["model_mse"].item() == pytest.approx((0.30 + 0.10 + 0.40 + 0.05) / 4)
    assert stats["ref_mse"].item() == pytest.approx((0.20 + 0.25 + 0.35 + 0.15) / 4)
    assert stats["loser_scale"].item() == 1.0


def test_dpo_errors_are_means_over_channels_and_pixels():
    # One pair, target 0, pixel values chosen so each error is a mean over 2x2x2 elements.
    model = torch.zeros(2, 2, 2, 2, dtype=torch.float64)
    model[0, 0, 0, 0] = 2.0  # winner error = 4 / 8 = 0.5
    model[1, 1, 1, 1] = 1.0  # loser error = 1 / 8
    ref = torch.zeros_like(model)
    loss, _ = preference_loss("diffusion-dpo", model, ref, torch.zeros_like(model), beta=2.0)
    u = -0.5 * 2.0 * (0.5 - 0.125)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-u)), rel=1e-12)


def dmpo_by_hand(u, alpha):
    p = 1 / (1 + math.exp(-u))
    q = min(max(1 - alpha, 1e-6), 1 - 1e-6)
    return p * (math.log(p) - math.log(q)) + (1 - p) * (math.log(1 - p) - math.log(1 - q))


@pytest.mark.parametrize("alpha", [0.0, 0.01, 0.3])
def test_dmpo_hand_values(alpha):
    errs = dict(model_w=[0.30, 0.10], ref_w=[0.20, 0.25], model_l=[0.40, 0.05], ref_l=[0.35, 0.15])
    model, ref, target = pairs_with_errors(**errs)
    loss, _ = preference_loss("dmpo", model, ref, target, beta=10.0, dmpo_alpha=alpha)
    expected = (dmpo_by_hand(-0.25, alpha) + dmpo_by_hand(0.25, alpha)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("alpha", [0.01, 0.2, 0.5])
def test_dmpo_is_minimised_at_logit_one_minus_alpha(alpha):
    # One pair with ref errors 0 and model winner error 0: u = β/2 * model_err_l.
    beta = 2.0
    us = torch.linspace(-6, 8, 1401, dtype=torch.float64)  # step 0.01
    losses = []
    for u in us.tolist():
        model, ref, target = pairs_with_errors([0.0], [0.0], [max(u, 0.0)], [max(-u, 0.0)])
        # model_l - ref_l = u (split so both errors stay >= 0), so the margin is β/2 * u = u.
        loss, stats = preference_loss("dmpo", model, ref, target, beta=beta, dmpo_alpha=alpha)
        assert stats["margin"].item() == pytest.approx(u, abs=1e-9)
        losses.append(loss.item())
    best = us[int(torch.tensor(losses).argmin())].item()
    assert best == pytest.approx(math.log((1 - alpha) / alpha), abs=0.006)
    assert min(losses) == pytest.approx(0.0, abs=1e-4)  # KL(q || q) = 0


def test_dspo_sd15_hand_value():
    torch.manual_seed(1)
    b, shape = 3, (2, 2, 2)
    model = torch.randn(2 * b, *shape, dtype=torch.float64)
    ref = torch.randn(2 * b, *shape, dtype=torch.float64)
    target = torch.randn(2 * b, *shape, dtype=torch.float64)
    beta = 0.7
    loss, _ = preference_loss("dspo", model, ref, target, beta=beta)
    total = 0.0
    for i in range(b):
        err = lambda p, j: ((p[j] - target[j]) ** 2).mean().item()  # noqa: E731
        u = margin(err(model, i), err(ref, i), err(model, b + i), err(ref, b + i), beta)
        w = 1 - 1 / (1 + math.exp(-u))
        total += (((model[i] - target[i]) - beta * w * (model[i] - ref[i])) ** 2).mean().item()
    assert loss.item() == pytest.approx(total / b, rel=1e-10)


def test_dspo_sdxl_branches_switch_at_batch_mean_delta_sq_0_1():
    b, shape = 2, (1, 2, 2)
    target = torch.zeros(2 * b, *shape, dtype=torch.float64)
    for mean_delta_sq in (0.0999, 0.1, 0.1001):
        ref = torch.full((2 * b, *shape), 0.5, dtype=torch.float64)
        model = ref.clone()
        model[:b] += math.sqrt(mean_delta_sq)  # every winner element differs by sqrt(δ²)
        loss, stats = preference_loss("dspo", model, ref, target, beta=3.0, sdxl=True)
        u = stats["margin"].item()  # same for both pairs by construction
        w = 1 - 1 / (1 + math.exp(-u))
        if mean_delta_sq >= 0.1:
            expected = w**2 * mean_delta_sq  # mean over pairs, C,H,W of (w δ)²
        else:
            expected = w**2
        assert loss.item() == pytest.approx(expected, rel=1e-9), mean_delta_sq


def test_sft_is_plain_mse():
    torch.manual_seed(2)
    pred, target = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    loss, stats = sft_loss(pred, target)
    assert loss.item() == pytest.approx(((pred - target) ** 2).mean().item(), rel=1e-6)
    entry_loss, _ = preference_loss("sft", pred, None, target, beta=5000.0)
    assert entry_loss.item() == loss.item()
    assert stats["model_mse"].item() == loss.item()


@pytest.mark.parametrize("method", METHODS)
def test_bf16_predictions_give_float32_losses(method):
    torch.manual_seed(3)
    pred = torch.randn(4, 4, 8, 8)
    ref = pred + 0.01 * torch.randn_like(pred)
    target = torch.randn_like(pred)
    exact, _ = preference_loss(method, pred.double(), ref.double(), target.double(), beta=5.0)
    low, _ = preference_loss(method, pred.bfloat16(), ref.bfloat16(), target.bfloat16(), beta=5.0)
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert low.item() == pytest.approx(exact.item(), rel=0.05, abs=0.02)
