"""The SDXL refiner and SDXL-Turbo as the official train.py handles them: the refiner is its own
family (recognised from its configs: text_encoder_2 only), conditioned on encoder 2 with the
aesthetic-score ids [H, W, 0, 0, 6], trained on t < 200; Turbo trains only at the four timesteps
it was distilled for. Both train through train.py."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from sdpo.families import ModelSource, check_family, detect_family, get_family, read_configs
from sdpo.testing.data import write_synthetic_pickapic
from sdpo.testing.tiny import build_tiny_sdxl, build_tiny_sdxl_refiner
from tests.train_fixtures import train_args


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    sdxl = build_tiny_sdxl(root / "sdxl")
    turbo = root / "tiny-sdxl-turbo"  # the official rule: the model's name says "turbo"
    shutil.copytree(sdxl, turbo)
    data = root / "data"
    write_synthetic_pickapic(data, n_pairs=4)
    return {"sdxl": sdxl, "turbo": turbo, "refiner": build_tiny_sdxl_refiner(root / "refiner"),
            "data": data}  # fmt: skip


def test_refiner_is_recognised_from_its_configs_alone(models):
    assert detect_family(read_configs(ModelSource(str(models["refiner"])))).name == "sdxl_refiner"
    assert detect_family(read_configs(ModelSource(str(models["sdxl"])))).name == "sdxl"
    assert check_family(ModelSource(str(models["refiner"])), flags={"sdxl": True}).name == (
        "sdxl_refiner"
    )
    with pytest.raises(ValueError, match="pass --sdxl"):  # the official flag, as for SDXL
        check_family(ModelSource(str(models["refiner"])))


def test_refiner_conditioning_is_encoder_2_with_aesthetic_ids(models):
    family = get_family("sdxl_refiner")
    parts = family.load_parts(ModelSource(str(models["refiner"])), resolution=32)
    cond = parts.encode_prompts(["a cat", ""], "cpu")
    assert cond["encoder_hidden_states"].shape == (2, 77, 32)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 6.0]] * 2
    (tok,), (enc,) = parts.tokenizers, parts.text_encoders
    ids = tok(["a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    out = enc(ids, output_hidden_states=True)
    torch.testing.assert_close(cond["encoder_hidden_states"][:1], out.hidden_states[-2])
    torch.testing.assert_close(cond["added_cond_kwargs"]["text_embeds"][:1], out.text_embeds)
    cached = family.cond_from_cache(family.cond_to_cache(cond), 32)
    assert cached["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 6.0]] * 2
    pred = family.predict(parts.unet, torch.randn(2, 4, 16, 16), torch.tensor([5, 5]), cond)
    assert pred.shape == (2, 4, 16, 16)


@pytest.mark.parametrize(
    "name, rule",
    [
        ("refiner", lambda u: u % 200),
        ("turbo", lambda u: 250 * (u % 4) + 249),
        ("sdxl", lambda u: u),
    ],
)
def test_timesteps_follow_the_official_rule_on_the_same_draws(models, name, rule):
    """The map is applied to the uniform draw of each pair's generator, so the draw order (ε,
    then t) and the keyed equivalences are unchanged."""
    source = ModelSource(str(models[name]))
    family = check_family(source, flags={"sdxl": True})
    parts = family.load_parts(source, resolution=32, with_denoiser=False)

    def gens():
        return [torch.Generator().manual_seed(s) for s in range(64)]

    noise, t = parts.objective.draw(gens(), (64, 4, 8, 8), "cpu")
    uniform = []
    for g in gens():
        torch.randn((1, 4, 8, 8), generator=g)  # the noise comes first from each generator
        uniform.append(int(torch.randint(0, 1000, (1,), generator=g)))
    assert t.tolist() == [int(rule(torch.tensor(u))) for u in uniform]
    allowed = {"refiner": set(range(200)), "turbo": {249, 499, 749, 999}}.get(name)
    if allowed is not None:
        assert set(t.tolist()) <= allowed
        assert len(set(t.tolist())) > (3 if name == "turbo" else 20)


@pytest.mark.parametrize("name", ["refiner", "turbo"])
def test_train_py_trains_the_variants(models, tmp_path, name):
    """Two DPO steps through train.py: the first loss is log 2 (policy = reference, up to the
    float rounding of the policy's train-mode attention kernels), the second differs."""
    from sdpo.config import parse_args
    from sdpo.training import main

    out = tmp_path / name
    args = train_args(models[name], models["data"], out, "--beta_dpo", "500", sdxl=True)
    main(parse_args(args))
    rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[1]["loss"] != rows[0]["loss"]


def test_generation_refuses_the_refiner_before_loading(models, tmp_path):
    from eval import generate as G

    with pytest.raises(G.GenerationError, match="refines an image"):
        G.make_plan(G.parse_args(["--prompts", "smoke", "--outdir", str(tmp_path),
                                  "--pretrained_model_name_or_path", str(models["refiner"])]))  # fmt: skip
    assert not any(tmp_path.iterdir())
