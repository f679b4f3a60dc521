"""Real-size architectures (sdpo.testing): parameter counts against the published models, fast
random init."""

import pytest
import torch

from sdpo.testing import configs, realsize


@pytest.mark.parametrize(
    "name, build",
    [
        ("sd15_unet", lambda: realsize.build_unet("sd15")),
        ("sd15_vae", lambda: realsize.build_vae("sd15")),
        ("clip_l_text", lambda: realsize.build_text_encoders("sd15")[0]),
        ("sdxl_unet", lambda: realsize.build_unet("sdxl")),
        ("sdxl_vae", lambda: realsize.build_vae("sdxl")),
        ("openclip_bigg_text", lambda: realsize.build_text_encoders("sdxl")[1]),
        ("sd35m_transformer", lambda: realsize.build_unet("sd3")),
        ("flux_dev_transformer", lambda: realsize.build_unet("flux")),
    ],
)
def test_parameter_counts_match_the_published_models(name, build):
    model = build()  # meta device: shapes only, no memory
    assert next(model.parameters()).device.type == "meta"
    expected = {**configs.EXPECTED_PARAMS, **configs.FLOW_EXPECTED_PARAMS}
    assert realsize.count_params(model) == expected[name]


def test_published_sizes_in_millions():
    # The numbers the issue states: SD1.5 UNet 859.5 M, VAE 83.7 M, CLIP-L 123.1 M, SDXL ~2.6 B.
    p = {k: v / 1e6 for k, v in configs.EXPECTED_PARAMS.items()}
    assert round(p["sd15_unet"], 1) == 859.5
    assert round(p["sd15_vae"], 1) == 83.7
    assert round(p["clip_l_text"], 1) == 123.1
    assert round(p["sdxl_unet"] / 1e3, 1) == 2.6


def test_random_init_is_deterministic_bounded_and_fills_buffers():
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(**{**configs.CLIP_L_TEXT, "num_hidden_layers": 1})
    with torch.device("meta"):
        a, b = CLIPTextModel(config), CLIPTextModel(config)
    a = realsize.random_init_(a.to_empty(device="cpu"), seed=3)
    b = realsize.random_init_(b.to_empty(device="cpu"), seed=3)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
        assert torch.isfinite(pa).all()
        if pa.ndim == 2 and "embedding" not in name:
            assert pa.abs().max() <= 1 / pa.shape[1] ** 0.5 + 1e-7
            assert pa.std() > 0.2 / pa.shape[1] ** 0.5  # really random, not zeros
    (ids,) = [buf for name, buf in a.named_buffers() if name.endswith("position_ids")]
    assert torch.equal(ids[0], torch.arange(77))
    c = realsize.random_init_(CLIPTextModel(config), seed=4)
    fc1 = [n for n, _ in a.named_parameters() if n.endswith("fc1.weight")][0]
    assert not torch.equal(c.get_parameter(fc1), a.get_parameter(fc1))
    out = a(torch.tensor([[512, 40, 41, 513]])).last_hidden_state
    assert torch.isfinite(out).all()


def test_unknown_family_is_refused():
    with pytest.raises(ValueError, match="family"):
        realsize.build_unet("sd2")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_flow_parts_build_with_their_encoders_and_objective(family, tmp_path):
    """The bench's real-size SD3.5-M / FLUX parts: T5-XXL (4.76 B) among the encoders and the
    family's flow-matching objective on the flow scheduler."""
    parts = realsize.build_model_parts(family, tmp_path, device="meta")
    sizes = [realsize.count_params(e) for e in parts.text_encoders]
    assert sizes[-1] == 4_762_310_656 and len(sizes) == (3 if family == "sd3" else 2)
    assert type(parts.objective).__name__ == "FlowMatchObjective"
    assert parts.resolution == 1024 and parts.family.name == family
