"""LoRA mode: only adapters train, the adapter-disabled reference IS the base UNet, every method and
the safeguard run through the real training step, and the merged unet.pth / LoRA file reproduce
the LoRA policy."""

import contextlib
import copy

import pytest
import torch

from sdpo.families import get_family
from sdpo.lora import (
    LORA_WEIGHT_NAME,
    AdapterDisabledReference,
    adapters_disabled,
    add_lora,
    has_lora,
    merged_unet_state_dict,
    save_lora,
)
from sdpo.losses import LOSSES
from sdpo.testing.tiny import build_tiny_sd15
from tests.train_fixtures import load_tiny_parts


@pytest.fixture(scope="module")
def tiny_sd15(tmp_path_factory):
    return build_tiny_sd15(tmp_path_factory.mktemp("lora") / "sd15", seed=0)


@pytest.fixture(scope="module")
def parts(tiny_sd15):
    return load_tiny_parts(tiny_sd15)


def unet_inputs(unet, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cfg = unet.config
    x = torch.randn(n, cfg.in_channels, 16, 16, generator=gen)
    t = torch.randint(0, 1000, (n,), generator=gen)
    h = torch.randn(n, 77, cfg.cross_attention_dim, generator=gen)
    return x, t, h


def train_adapters(unet, params, steps=3, lr=0.05):
    """A few real optimizer steps so that lora_B != 0 (the policy moves away from the base)."""
    opt = torch.optim.AdamW(params, lr=lr)
    x, t, h = unet_inputs(unet, seed=1)
    for _ in range(steps):
        loss = unet(x, t, encoder_hidden_states=h).sample.square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()


def lora_unet(parts, rank=4, alpha=8.0):
    base = copy.deepcopy(parts.unet)
    policy = copy.deepcopy(parts.unet)
    params = add_lora(policy, rank, alpha)
    return base, policy, params


def test_only_adapter_parameters_train(parts):
    base, policy, params = lora_unet(parts)
    assert has_lora(policy) and not has_lora(base)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == len(params)
    # q, k, v and out.0 of every attention layer are wrapped (A and B each).
    n_attn = sum(1 for n, _ in base.named_modules() if n.endswith(".to_q"))
    assert len(trainable) == 2 * 4 * n_attn
    frozen_before = {n: p.clone() for n, p in policy.named_parameters() if not p.requires_grad}
    train_adapters(policy, params)
    for n, p in policy.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n


def test_disabled_adapter_reference_equals_base_unet_exactly(parts):
    base, policy, params = lora_unet(parts)
    x, t, h = unet_inputs(base)
    with torch.no_grad():
        # At initialisation (B = 0) the policy is the base as well.
        assert torch.equal(policy(x, t, encoder_hidden_states=h).sample, base(x, t, h).sample)
    train_adapters(policy, params)
    reference = AdapterDisabledReference(policy)
    with torch.no_grad():
        want = base(x, t, encoder_hidden_states=h).sample
        got = reference(x, t, encoder_hidden_states=h).sample
        trained = policy(x, t, encoder_hidden_states=h).sample
    assert torch.equal(got, want)
    assert (trained - want).abs().max() > 1e-4  # adapters are back on after the reference call
    # Re-enabled even when the forward raises.
    with pytest.raises(RuntimeError), adapters_disabled(policy):
        raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(policy(x, t, encoder_hidden_states=h).sample, trained)


def make_batch(b=2, res=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(2 * b, 3, res, res, generator=gen) * 2 - 1,
        "captions": [f"caption {i}" for i in range(b)],
        "index": torch.arange(b),
        "epoch": torch.zeros(b, dtype=torch.long),
    }


@pytest.mark.parametrize(
    "method, safeguard",
    [("diffusion-dpo", False), ("diffusion-dpo", True), ("dspo", True), ("dmpo", True)],
)
def test_every_method_and_safeguard_train_through_the_step(parts, method, safeguard):
    from sdpo.step import Preference, training_step

    _, policy, params = lora_unet(parts)
    train_adapters(policy, params, steps=1)  # B != 0 so the losses see a policy/reference gap
    pref = Preference(
        beta=5000.0 if method != "dspo" else 0.001, dmpo_alpha=0.01, safeguard=safeguard, mu=0.5
    )
    step_parts = copy.copy(parts)
    step_parts.unet = policy
    loss, stats = training_step(
        parts=step_parts,
        unet=policy,
        ref_unet=AdapterDisabledReference(policy),
        batch=make_batch(),
        spec=LOSSES[method],
        pref=pref,
        seed=0,
        device="cpu",
        autocast=contextlib.nullcontext,
    )
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in params]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for p in policy.parameters() if not p.requires_grad)
    lam = float(stats["loser_scale"])
    assert 0.0 <= lam <= 1.0
    if not safeguard:
        assert lam == 1.0


def test_merged_unet_pth_loads_strictly_and_reproduces_the_lora_policy(parts, tiny_sd15, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    _, policy, params = lora_unet(parts, rank=4, alpha=2.0)
    train_adapters(policy, params)
    paths = save_lora(policy, tmp_path, get_family("sd15"))
    assert paths["unet_pth"].is_file() and (tmp_path / LORA_WEIGHT_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LORA_WEIGHT_NAME, "unet.pth"]

    plain = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
    state = torch.load(paths["unet_pth"], weights_only=True)
    assert set(state) == set(plain.state_dict())
    plain.load_state_dict(state, strict=True)
    x, t, h = unet_inputs(plain, seed=3)
    with torch.no_grad():
        want = policy(x, t, encoder_hidden_states=h).sample
        merged = plain(x, t, encoder_hidden_states=h).sample
    torch.testing.assert_close(merged, want, rtol=1e-4, atol=1e-5)
    # merged_unet_state_dict left the LoRA model untouched.
    assert has_lora(policy) and set(merged_unet_state_dict(policy)) == set(state)

    # The diffusers-format LoRA file loads into a fresh pipeline and gives the same UNet.
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, safety_checker=None)
    pipe.load_lora_weights(tmp_path, weight_name=LORA_WEIGHT_NAME)
    with torch.no_grad():
        loaded = pipe.unet(x, t, encoder_hidden_states=h).sample
    torch.testing.assert_close(loaded, want, rtol=1e-4, atol=1e-5)


def test_bad_lora_settings_are_refused(parts):
    unet = copy.deepcopy(parts.unet)
    with pytest.raises(ValueError, match="lora_rank"):
        add_lora(unet, 0)
    with pytest.raises(ValueError, match="lora_target_modules"):
        add_lora(copy.deepcopy(parts.unet), 4, target_modules="no_such_layer")


def test_train_py_lora_run_saves_adapters_and_a_merged_unet(tiny_sd15, tmp_path):
    from diffusers import UNet2DConditionModel

    import train
    from sdpo.testing.data import write_synthetic_pickapic
    from tests.train_fixtures import train_args

    data = write_synthetic_pickapic(tmp_path / "data", n_pairs=4).parent
    out = tmp_path / "run"
    extra = ["--lora_rank", "4", "--lora_alpha", "4", "--use_winner_preserving"]
    extra += [
        "--winner_preserving_mu",
        "0.5",
        "--learning_rate",
        "1e-2",
        "--checkpointing_steps",
        "1",
    ]
    result = train.main(train.parse_args(train_args(tiny_sd15, data, out, *extra)))
    assert isinstance(result["ref_unet"], AdapterDisabledReference)  # no second UNet
    for folder in (out, out / "checkpoint-2"):
        assert (folder / LORA_WEIGHT_NAME).is_file()
        plain = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet")
        start = {k: v.clone() for k, v in plain.state_dict().items()}
        plain.load_state_dict(torch.load(folder / "unet.pth", weights_only=True), strict=True)
        moved = [k for k, v in plain.state_dict().items() if not torch.equal(v, start[k])]
        assert moved and all(".attn" in k and k.endswith(".weight") for k in moved)
