"""The official flags where this repository now follows (or deliberately fixes) the reference:
``--noise_offset`` and ``--input_perturbation`` drawn per pair (winner and loser share noise,
timestep and perturbation), and no gradient clipping with an explicit ``--use_adafactor``."""

from __future__ import annotations

import contextlib

import pytest
import torch

from sdpo.config import parse_args
from sdpo.losses import LOSSES, LossSpec
from sdpo.step import Preference, training_step
from tests.train_fixtures import load_tiny_parts

B = 2  # pairs


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from sdpo.testing.tiny import build_tiny_sd15

    return load_tiny_parts(build_tiny_sd15(tmp_path_factory.mktemp("m") / "sd15"))


def _batch():
    gen = torch.Generator().manual_seed(3)
    return {
        "pixel_values": torch.rand(2 * B, 3, 32, 32, generator=gen) * 2 - 1,
        "captions": ["a red circle", "a blue square"],
        "epoch": torch.tensor([0, 0]),
        "index": torch.tensor([5, 9]),
    }


def _capture(parts, monkeypatch, **flags):
    """Run one step and return what the denoiser saw and what the loss was asked to match."""
    seen = {}
    family = parts.family

    def latents(posterior, generators):
        seen["x0"] = type(parts).latents(parts, posterior, generators)
        return seen["x0"]

    def predict(denoiser, noisy, timesteps, cond):
        seen.setdefault("noisy", noisy.clone())
        seen.setdefault("t", timesteps.clone())
        return type(family).predict(family, denoiser, noisy, timesteps, cond)

    def loss_fn(model_pred, ref_pred, target, **kwargs):
        seen["target"] = target.clone()
        return LOSSES["diffusion-dpo"].fn(model_pred, ref_pred, target, **kwargs)

    monkeypatch.setattr(parts, "latents", latents)
    monkeypatch.setattr(family, "predict", predict)
    spec = LossSpec(loss_fn, needs_reference=True, paired=True)
    training_step(parts=parts, unet=parts.unet, ref_unet=parts.unet, batch=_batch(), spec=spec,
                  pref=Preference(beta=5000.0, **flags), seed=11, device="cpu",
                  autocast=contextlib.nullcontext)  # fmt: skip
    monkeypatch.undo()
    return seen


def _input_noise(parts, seen):
    """ε that built the denoiser's input: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε."""
    abar = parts.noise_scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    return (seen["noisy"] - abar.sqrt() * seen["x0"]) / (1 - abar).sqrt()


def test_offset_and_perturbation_are_shared_by_winner_and_loser(parts, monkeypatch):
    off = _capture(parts, monkeypatch)
    on = _capture(parts, monkeypatch, noise_offset=0.1, input_perturbation=0.2)
    w, lo = slice(0, B), slice(B, 2 * B)

    # Same timestep and same posterior draws with the flags on or off (drawn after them).
    assert torch.equal(on["t"], off["t"]) and torch.equal(on["t"][w], on["t"][lo])
    assert torch.equal(on["x0"], off["x0"])
    # Without the flags the input is noised with the target itself.
    assert torch.allclose(_input_noise(parts, off), off["target"], atol=1e-4)

    # Offset noise: a per-(pair, channel) constant added to ε, the same for winner and loser.
    shift = on["target"] - off["target"]
    assert torch.equal(on["target"][w], on["target"][lo])
    flat = shift - shift.mean(dim=(-2, -1), keepdim=True)
    assert flat.abs().max() < 1e-6 and shift.abs().min() > 0
    assert torch.equal(shift[w], shift[lo])

    # Input perturbation: only in the input, one draw per pair, of the asked size.
    delta = _input_noise(parts, on) - on["target"]
    assert torch.allclose(delta[w], delta[lo], atol=1e-4)
    assert 0.1 < float(delta[w].std()) < 0.3  # 0.2 · N(0, 1) over 2 x 4 x 4 x 4 values
    # The target does not see the perturbation: it is the offset noise alone.
    assert torch.allclose(on["target"], off["target"] + shift)


@pytest.mark.parametrize("flag", ["--noise_offset", "--input_perturbation"])
def test_noise_flags_are_validated(flag, capsys):
    argv = ["--pretrained_model_name_or_path", "org/m", "--dataset_name", "d/p"]
    argv += ["--mixed_precision", "no", flag, "-0.1"]
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert flag in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, clip",
    [
        ([], 1.0),
        (["--max_grad_norm", "0"], 0.0),
        (["--use_adafactor"], 0.0),  # the reference: an explicit Adafactor is never clipped
        (["--sdxl"], 1.0),  # ... but Adafactor implied by --sdxl is
        (["--sdxl", "--use_adafactor"], 0.0),
    ],
)
def test_gradient_clipping_follows_the_reference(extra, clip):
    argv = ["--pretrained_model_name_or_path", "org/m", "--dataset_name", "d/p"]
    cfg = parse_args([*argv, "--mixed_precision", "no", *extra])
    assert cfg.clip_norm == clip
    assert cfg.optimizer_name == (
        "adafactor" if extra and extra[0] != "--max_grad_norm" else "adamw"
    )


def test_noise_flags_reach_the_step():
    argv = ["--pretrained_model_name_or_path", "org/m", "--dataset_name", "d/p"]
    argv += ["--mixed_precision", "no", "--noise_offset", "0.05", "--input_perturbation", "0.1"]
    pref = Preference.from_flags(parse_args(argv))
    assert (pref.noise_offset, pref.input_perturbation) == (0.05, 0.1)
