"""Flow-matching families (SD3, SD3.5-style, FLUX) and v-prediction, on tiny random models (CPU):
the objective against hand computation, FLUX packing against diffusers, every method with and
without the safeguard through train.py (LoRA by default; first DPO loss = log 2), the
adapter-disabled reference, the LoRA file in the pipelines, cached = uncached, exact resume,
`accelerate launch`, the safeguard's guarantee on velocity targets, and evaluation."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from sdpo.families import ModelSource, check_family, detect_family, get_family, read_configs
from sdpo.families.flow import FlowMatchObjective, TimestepDensity
from sdpo.lora import LORA_WEIGHT_NAME, AdapterDisabledReference
from sdpo.testing.data import write_synthetic_pickapic
from sdpo.testing.tiny import build_tiny_flux, build_tiny_sd3
from tests.train_fixtures import REPO, max_abs_diff, train_args

FLOWS = ("sd3", "sd35", "flux")
FAMILY_OF = {"sd3": "sd3", "sd35": "sd3", "flux": "flux"}
BETA = {"diffusion-dpo": "500", "dspo": "0.001", "dmpo": "500", "sft": "500"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    models = {
        "sd3": build_tiny_sd3(root / "sd3", seed=0),
        "sd35": build_tiny_sd3(root / "sd35", seed=1, sd35=True),
        "flux": build_tiny_flux(root / "flux", seed=2),
    }
    data = root / "data"
    write_synthetic_pickapic(data, n_pairs=6, ties=1, corrupt_rows=0)
    return {"models": models, "data": data, "root": root}


def _parts(path):
    source = ModelSource(str(path))
    parts = check_family(source).load_parts(source, resolution=32)
    parts.freeze_and_place("cpu", torch.float32)
    return parts


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _run(env, name, out, *extra):
    return train.main(train.parse_args(train_args(env["models"][name], env["data"], out, *extra)))


def _inputs(parts, n=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cond = parts.encode_prompts(["a red cube", "two dogs on grass"][:n], "cpu")
    x = torch.randn(n, 4, 16, 16, generator=gen)
    t = torch.tensor([900.0, 250.0][:n])
    return x, t, cond


# --- detection, objectives ------------------------------------------------------------------


def test_families_are_detected_from_the_configs(env):
    for name, path in env["models"].items():
        family = detect_family(read_configs(ModelSource(str(path))))
        assert family.name == FAMILY_OF[name]
        assert family.default_lora_rank > 0 and family.lora_layers_prefix == "transformer"
    with pytest.raises(ValueError, match="--sdxl was given"):
        check_family(ModelSource(str(env["models"]["sd3"])), flags={"sdxl": True})
    assert get_family("sd15").default_lora_rank == 0  # the reference: full fine-tuning
    # A transformer folder with a DDPM scheduler is refused from the configs.
    bad = env["root"] / "sd3_ddpm"
    if not bad.exists():
        import shutil

        shutil.copytree(env["models"]["sd3"], bad)
        sched = bad / "scheduler" / "scheduler_config.json"
        sched.write_text(
            json.dumps({**json.loads(sched.read_text()), "_class_name": "DDPMScheduler"})
        )
    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler"):
        check_family(ModelSource(str(bad)))


def test_flow_objective_matches_hand_computation():
    """ε first, then u = sigmoid(N(m, s)) from the pair's generator; σ = the shifted sigma at
    index ⌊u·1000⌋ (shift 3: σ = 3s / (1 + 2s), s = 1 − i/1000); x_t = (1 − σ)x0 + σε; target
    ε − x0. A scheduler that was set_timesteps does not change the training schedule."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sched.set_timesteps(4)  # the sampling schedule must not leak into training
    density = TimestepDensity(logit_mean=0.3, logit_std=0.7)
    obj = FlowMatchObjective(sched, density)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    noise, t = obj.draw(gens, (2, 4, 8, 8), "cpu")
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    noisy, target = obj.noisy_and_target(x0, noise, t)
    for i, seed in enumerate((11, 12)):
        g = torch.Generator().manual_seed(seed)
        eps = torch.randn(1, 4, 8, 8, generator=g)
        u = torch.sigmoid(torch.normal(0.3, 0.7, (1,), generator=g))
        index = int(u * 1000)
        s = 1 - index / 1000
        sigma = 3 * s / (1 + 2 * s)
        assert torch.equal(noise[i], eps[0])
        assert float(t[i]) == pytest.approx(sigma * 1000, rel=1e-5)
        assert torch.allclose(noisy[i], (1 - sigma) * x0[i] + sigma * eps[0], atol=1e-5)
        assert torch.equal(target[i], eps[0] - x0[i])
    # Per-pair draws do not depend on the batch they are in (process / accumulation splits).
    alone = obj.draw([torch.Generator().manual_seed(12)], (1, 4, 8, 8), "cpu")
    assert torch.equal(alone[0][0], noise[1]) and torch.equal(alone[1][0], t[1])
    # Other densities of the training scripts run; bad settings name the flag.
    for scheme in ("mode", "uniform"):
        _, t2 = FlowMatchObjective(sched, TimestepDensity(weighting_scheme=scheme)).draw(
            gens, (2, 4, 8, 8), "cpu"
        )
        assert ((t2 > 0) & (t2 <= 1000)).all()
    with pytest.raises(ValueError, match="--logit_std"):
        TimestepDensity(logit_std=0.0)


def test_flux_schedule_is_unshifted_as_the_training_script():
    """FLUX.1-dev shifts at sampling time (use_dynamic_shifting): the training sigmas are the
    plain s = 1 − i/1000, as diffusers' FLUX script indexes them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)
    obj = FlowMatchObjective(sched)
    assert torch.allclose(obj.sigmas[:1000], 1 - torch.arange(1000) / 1000, atol=1e-6)


def test_v_prediction_objective_and_refused_prediction_types():
    """SD 2.x v-prediction: target v = √ᾱ ε − √(1−ᾱ) x0 (Salimans & Ho 2022); 'sample' refused."""
    from diffusers import DDPMScheduler

    from sdpo.families.base import VPredictionObjective

    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear")
    obj = get_family("sd15").objective(sched, "sd2")
    assert isinstance(obj, VPredictionObjective)
    gen = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 4, 8, 8, generator=gen)
    t = torch.tensor([0, 500, 999])
    noisy, target = obj.noisy_and_target(x0, eps, t)
    ab = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(target, ab.sqrt() * eps - (1 - ab).sqrt() * x0, atol=1e-6)
    assert torch.allclose(noisy, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, atol=1e-6)
    with pytest.raises(ValueError, match="prediction_type is 'sample'"):
        get_family("sd15").objective(DDPMScheduler(prediction_type="sample"), "x")


def test_v_prediction_model_trains_through_train_py(env, tmp_path):
    """An SD 2.x-style v-prediction folder trains through train.py (full fine-tuning, its
    family's default), the first DPO loss at policy = reference."""
    from sdpo.testing.tiny import build_tiny_sd15

    model = build_tiny_sd15(tmp_path / "v")
    sched = model / "scheduler" / "scheduler_config.json"
    sched.write_text(
        json.dumps({**json.loads(sched.read_text()), "prediction_type": "v_prediction"})
    )
    out = tmp_path / "out"
    result = train.main(train.parse_args(train_args(model, env["data"], out, "--beta_dpo", "500")))
    assert result["global_step"] == 2 and not (out / LORA_WEIGHT_NAME).exists()
    rows = _log(out)
    # The frozen copy's forward (no_grad) may round differently from the policy's: ~1e-7 gaps.
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert rows[0]["model_mse"] == pytest.approx(rows[0]["ref_mse"], rel=1e-5)
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_flux_packing_ids_and_call_match_diffusers(env):
    """Our packing / ids equal FluxPipeline's helpers, and FLUX.predict equals the transformer
    called as the pipeline calls it (σ, guidance, 2-D ids) then unpacked; schnell-like models
    (no guidance embedding) get no guidance."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from sdpo.families.flux import image_ids, pack_latents, unpack_latents
    from sdpo.testing.tiny import tiny_flux_transformer_config

    x = torch.randn(2, 4, 16, 12)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 16, 12))
    assert torch.equal(unpack_latents(packed, 16, 12), x)
    assert torch.equal(
        FluxPipeline._unpack_latents(packed, 32, 24, 2), unpack_latents(packed, 16, 12)
    )
    assert torch.equal(
        image_ids(16, 12, "cpu", torch.float32),
        FluxPipeline._prepare_latent_image_ids(2, 8, 6, "cpu", torch.float32),
    )
    parts = _parts(env["models"]["flux"])
    family = parts.family
    x, t, cond = _inputs(parts)
    with torch.no_grad():
        ours = family.predict(parts.unet, x, t, cond)
        hidden = cond["encoder_hidden_states"]
        theirs = parts.unet(
            hidden_states=FluxPipeline._pack_latents(x, 2, 4, 16, 16),
            timestep=t / 1000,
            guidance=torch.full((2,), family.train_guidance),
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
        ).sample
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 32, 32, 2))
    schnell = FluxTransformer2DModel(**tiny_flux_transformer_config(guidance_embeds=False))
    with torch.no_grad():
        assert family.predict(schnell, x, t, cond).shape == x.shape


def test_sd3_conditioning_is_the_pipelines(env):
    """CLIP-L + CLIP-G penultimate states padded to the T5 width, then T5 (77 + 256 tokens), no
    cropping (2 × 16 ≤ 32); pooled = both projections."""
    parts = _parts(env["models"]["sd35"])
    cond = parts.encode_prompts(["a cat"], "cpu")
    assert cond["encoder_hidden_states"].shape == (1, 77 + 256, 32)
    assert cond["pooled_projections"].shape == (1, 32)
    clip = cond["encoder_hidden_states"][0, :77]
    assert clip[:, :32].abs().sum() > 0  # both CLIP widths (16 + 16) fit: nothing cropped
    ids = parts.tokenizers[2](["a cat"]).input_ids[0]
    assert 2 not in ids and ids[-1] == 1 and len(ids) == 5  # ▁a ▁c a t </s>: no <unk>


# --- training through train.py ----------------------------------------------------------------


@pytest.mark.parametrize("safeguard", [False, True], ids=["plain", "safeguard"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo", "sft"])
@pytest.mark.parametrize("name", FLOWS)
def test_every_method_trains(env, tmp_path, name, method, safeguard):
    """LoRA by default; the first DPO loss is exactly log 2 (policy = reference: peft's B = 0);
    the policy moves, the reference (adapters off) does not."""
    extra = ["--train_method", method, "--beta_dpo", BETA[method], "--dmpo_alpha", "0.01"]
    extra += ["--train_batch_size", "1", "--max_train_steps", "3", "--lr_warmup_steps", "0"]
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    result = _run(env, name, tmp_path, *extra)
    assert result["global_step"] == 3
    assert (tmp_path / LORA_WEIGHT_NAME).is_file()
    rows = _log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    if method != "sft":
        assert isinstance(result["ref_unet"], AdapterDisabledReference)
        assert rows[0]["model_mse"] == rows[0]["ref_mse"]  # policy = reference at step 1
        assert rows[-1]["model_mse"] != rows[-1]["ref_mse"]  # ... and no longer after updates
    if method == "diffusion-dpo":
        assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    lam = [r["loser_scale"] for r in rows]
    if safeguard and method != "sft":
        assert all(0.0 <= v <= 1.0 for v in lam)
    else:
        assert lam == [1.0] * 3
    start = (
        get_family(FAMILY_OF[name])
        .denoiser_class()
        .from_pretrained(env["models"][name], subfolder="transformer")
    )
    merged = torch.load(tmp_path / "unet.pth", weights_only=True)
    assert max_abs_diff(merged, start.state_dict()) > 0


def test_the_safeguard_acts_on_flow_models(env, tmp_path):
    """Winner and loser share ε and σ, so their velocity residuals share ε − prediction: with a
    conservative μ the safeguard scales the loser down on these pairs."""
    _run(env, "flux", tmp_path, "--use_winner_preserving", "--winner_preserving_mu", "0.9")
    assert all(r["loser_scale"] < 1.0 for r in _log(tmp_path))


@pytest.mark.parametrize("name", ["sd35", "flux"])
def test_lora_reference_is_the_base_and_the_lora_file_loads_in_the_pipeline(env, tmp_path, name):
    """Adapters off = the base transformer bit for bit; pytorch_lora_weights.safetensors loads
    with the pipeline's load_lora_weights and reproduces the policy; unet.pth (merged) too."""
    result = _run(env, name, tmp_path, "--max_train_steps", "3", "--lr_warmup_steps", "0")
    family = get_family(FAMILY_OF[name])
    path = env["models"][name]
    parts = _parts(path)
    x, t, cond = _inputs(parts)
    policy = result["unet"]
    with torch.no_grad():
        base = family.predict(parts.unet, x, t, cond)
        ref = family.predict(result["ref_unet"], x, t, cond)
        pol = family.predict(policy, x, t, cond)
        assert torch.equal(ref, base)
        assert (pol - base).abs().max() > 1e-6
        pipe = family.pipeline_class().from_pretrained(path)
        pipe.load_lora_weights(str(tmp_path))
        loaded = family.predict(pipe.transformer, x, t, cond)
        assert torch.allclose(loaded, pol, atol=1e-5)
        plain = family.denoiser_class().from_pretrained(path, subfolder="transformer")
        plain.load_state_dict(torch.load(tmp_path / "unet.pth", weights_only=True), strict=True)
        assert torch.allclose(family.predict(plain, x, t, cond), pol, atol=1e-5)


def test_flux_resolution_must_tile_the_packing(env):
    """Real FLUX needs multiples of 16 (train.py only checks 8); the tiny VAE halves once: 4."""
    source = ModelSource(str(env["models"]["flux"]))
    with pytest.raises(ValueError, match="--resolution 34: FLUX needs a multiple of 4"):
        get_family("flux").load_parts(source, resolution=34)


def test_full_fine_tuning_with_lora_rank_zero(env, tmp_path):
    result = _run(env, "sd3", tmp_path, "--lora_rank", "0", "--max_train_steps", "1")
    assert not (tmp_path / LORA_WEIGHT_NAME).exists()
    assert not isinstance(result["ref_unet"], AdapterDisabledReference)


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_cached_conditioning_gives_the_same_losses(env, tmp_path, name):
    """python -m sdpo.cache stores T5 + CLIP outputs and VAE posteriors; train.py from the cache
    logs the losses of the image run."""
    from types import SimpleNamespace

    from sdpo import cache

    state = SimpleNamespace(
        process_index=0,
        num_processes=1,
        is_main_process=True,
        device="cpu",
        wait_for_everyone=lambda: None,
    )
    cache_dir = tmp_path / "cache"
    args = ["--pretrained_model_name_or_path", str(env["models"][name])]
    args += ["--train_data_dir", str(env["data"]), "--output_dir", str(cache_dir)]
    args += ["--resolution", "32", "--mixed_precision", "no", "--batch_size", "2"]
    cache.precompute(cache.parse_args(args + ["--dataloader_num_workers", "0"]), state)
    extra = ("--use_winner_preserving", "--winner_preserving_mu", "0.5", "--lr_warmup_steps", "0")
    _run(env, name, tmp_path / "images", *extra)
    _run(env, name, tmp_path / "cached", *extra, "--precomputed_dir", str(cache_dir))
    for a, b in zip(_log(tmp_path / "images"), _log(tmp_path / "cached")):
        for key in ("loss", "model_mse", "ref_mse", "loser_scale"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key


def test_resume_is_bit_exact(env, tmp_path):
    """SD3.5-style with LoRA: 3 steps straight == 2 steps, stop, resume to 3."""
    common = ("--checkpointing_steps", "2", "--train_batch_size", "1", "--lr_warmup_steps", "0")
    common += ("--use_winner_preserving",)
    _run(env, "sd35", tmp_path / "straight", *common, "--max_train_steps", "3")
    _run(env, "sd35", tmp_path / "split", *common, "--max_train_steps", "2")
    _run(env, "sd35", tmp_path / "split", *common, "--max_train_steps", "3")
    a = torch.load(tmp_path / "straight" / "unet.pth", weights_only=True)
    b = torch.load(tmp_path / "split" / "unet.pth", weights_only=True)
    assert max_abs_diff(a, b) == 0.0
    assert [r["loss"] for r in _log(tmp_path / "straight")] == [
        r["loss"] for r in _log(tmp_path / "split")
    ]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_accelerate_launch_smoke(env, tmp_path, name):
    """A real `accelerate launch` run gives the LoRA file and merged weights of the in-process run."""
    extra = ["--max_train_steps", "1", "--lr_warmup_steps", "0", "--use_winner_preserving"]
    inproc = _run(env, name, tmp_path / "in", *extra)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    args = train_args(env["models"][name], env["data"], tmp_path / "cli", *extra)
    run_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [*launcher, "--cpu", "train.py", *args],
        cwd=REPO,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    launched = torch.load(tmp_path / "cli" / "unet.pth", weights_only=True)
    assert (tmp_path / "cli" / LORA_WEIGHT_NAME).is_file()
    assert (
        max_abs_diff(torch.load(tmp_path / "in" / "unet.pth", weights_only=True), launched) < 1e-6
    )
    assert inproc["global_step"] == 1


# --- the safeguard's guarantee on velocity targets ----------------------------------------------


def test_safeguarded_step_never_increases_the_winner_velocity_error():
    """tests/test_safeguard.py's first-order guarantee with flow-matching targets: winner and loser
    share ε and σ, targets are ε − x0 built by FlowMatchObjective. θ is the prediction of both
    (output space = parameter space, so mse_w is exactly quadratic); the loser's clean latent is
    placed so its residual is aligned with the winner's (the hard case). A safeguarded SGD step
    raises the winner's velocity error by at most the exact second-order term ‖Δ‖²/N; the plain
    step raises it at first order on many draws."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from tests.test_safeguard import sgd_step, winner_mse

    obj = FlowMatchObjective(FlowMatchEulerDiscreteScheduler(shift=3.0))
    shape = (1, 4, 4, 4)
    plain_rises = 0
    for draw in range(150):
        method, beta, alpha = [("diffusion-dpo", 50.0, 0.0), ("dmpo", 5.0, 0.01)][draw % 2]
        gen = torch.Generator().manual_seed(zlib.crc32(f"flow{draw}".encode()))
        eps, t = obj.draw([gen], shape, "cpu")
        x0_w = torch.randn(shape, generator=gen)
        _, v_w = obj.noisy_and_target(x0_w, eps, t)
        theta = v_w + torch.randn(shape, generator=gen)  # the prediction, residual r_w
        s = 0.5 + 2.5 * float(torch.rand((), generator=gen))
        r_l = s * (theta - v_w) + 0.5 * torch.randn(shape, generator=gen)
        x0_l = eps - (theta - r_l)  # so that v_l = ε − x0_l = θ − r_l
        _, v_l = obj.noisy_and_target(x0_l, eps, t)
        assert torch.allclose(v_l, theta - r_l, atol=1e-5)
        target = torch.cat([v_w, v_l]).double()
        theta = theta.double()
        ref = torch.cat([theta, theta]) + 0.05 * torch.randn(2, *shape[1:], generator=gen).double()
        kwargs = dict(beta=beta, lr=1e-2, per_pair=False, dmpo_alpha=alpha, mu=[0.0, 0.5][draw % 2])
        step, _ = sgd_step(method, theta, ref, target, **kwargs)
        rise = winner_mse(theta + step, target[:1]) - winner_mse(theta, target[:1])
        assert (rise <= step.pow(2).mean(dim=(1, 2, 3)) + 1e-15).all(), draw
        plain, _ = sgd_step(method, theta, ref, target, safeguard=False, **kwargs)
        plain_rise = winner_mse(theta + plain, target[:1]) - winner_mse(theta, target[:1])
        plain_rises += bool((plain_rise > plain.pow(2).mean(dim=(1, 2, 3)) + 1e-15).any())
    assert plain_rises > 30


# --- evaluation ---------------------------------------------------------------------------------


def _generate(base, out, *extra):
    import eval.generate as G

    argv = ["--pretrained_model_name_or_path", str(base), "--prompts", "smoke"]
    argv += ["--outdir", str(out), "--size", "32", "--steps", "2", "--dtype", "fp32"]
    argv += ["--device", "cpu", *map(str, extra)]
    return Path(G.main(G.parse_args(argv)))


def _images(manifest: Path) -> list[np.ndarray]:
    from PIL import Image

    rows = json.loads(manifest.read_text())
    return [
        np.asarray(Image.open(manifest.parent / r["gen_image_path"]).convert("RGB")).astype(int)
        for r in rows
    ]


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_generation_shared_noise_batched_equals_batch1(env, tmp_path, name):
    """The shared initial noise is the pipeline's own seeded draw (FLUX: drawn [1, C, h, w], then
    packed), the manifest records the family's defaults, batch 3 = batch 1 within a grey level."""
    import eval.generate as G

    family = get_family(FAMILY_OF[name])
    path = env["models"][name]
    pipe = family.pipeline_class().from_pretrained(path)
    noise = G.shared_noise(pipe, 32, 32, 5, "cpu", family)
    own = pipe.prepare_latents(
        1, pipe.transformer.config.in_channels // (4 if name == "flux" else 1), 32, 32,
        torch.float32, "cpu", torch.Generator().manual_seed(5),
    )  # fmt: skip
    assert torch.equal(noise, own[0] if name == "flux" else own)

    one = _generate(path, tmp_path / "b1", "--limit", 3)
    three = _generate(path, tmp_path / "b3", "--limit", 3, "--batch_size", 3)
    meta = json.loads(one.read_text())[0]["metadata"]
    assert meta["family"] == family.name and meta["steps"] == 2
    assert meta["cfg"] == family.eval_cfg and meta["guidance_scale"] == family.eval_cfg + 1
    assert meta["scheduler"] == "FlowMatchEulerDiscreteScheduler"
    for a, b in zip(_images(one), _images(three)):
        assert np.abs(a - b).max() <= 1


def test_eval_script_with_lora_weights_and_tiny_scorers(env, tmp_path):
    """scripts/eval/test_flux.sh on a trained LoRA file: images = those of the merged weights
    (unet.pth), all five metrics scored with the tiny scorers, summary written."""
    from eval.tiny_scorers import build_tiny_scorers

    run = tmp_path / "run"
    _run(env, "flux", run, "--max_train_steps", "2", "--lr_warmup_steps", "0", "--learning_rate", "0.05")  # fmt: skip
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    (lora_dir / LORA_WEIGHT_NAME).write_bytes((run / LORA_WEIGHT_NAME).read_bytes())
    scorer_env = build_tiny_scorers(tmp_path / "scorers")
    script_env = dict(
        os.environ,
        **scorer_env,
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        MODEL_NAME=str(env["models"]["flux"]),
        SIZE="32",
        STEP="2",
        DTYPE="fp32",
        SETS="smoke",
        NUM_PROCESSES="1",
        DEVICE="cpu",
    )
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/eval/test_flux.sh"), str(lora_dir), "--limit", "2"],
        env=script_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    stem = "smoke_seed0_32x32_2s_2.5cfg"
    manifest = lora_dir / "eval_flux" / f"{stem}.json"
    rows = json.loads(manifest.read_text())
    assert rows[0]["metadata"]["unet_path"] == str((lora_dir / LORA_WEIGHT_NAME).resolve())
    summary = lora_dir / "eval_flux" / "summary_seed0_32x32_2s_2.5cfg.json"
    assert summary.is_file()
    merged = _generate(env["models"]["flux"], tmp_path / "merged", "--limit", 2,
                       "--unet_path", run / "unet.pth")  # fmt: skip
    base = _generate(env["models"]["flux"], tmp_path / "base", "--limit", 2)
    for a, b in zip(_images(manifest), _images(merged)):
        assert np.abs(a - b).max() <= 1
    assert any(np.abs(a - c).max() > 1 for a, c in zip(_images(manifest), _images(base)))


# --- recipes ------------------------------------------------------------------------------------

FLOW_RECIPES = {  # method, β, α; all: μ 0.6, LoRA r 32 / alpha 64, effective lr 3e-4 on 64 pairs
    "sd35_diffusion_dpo": ("diffusion-dpo", 100.0, 0.0),
    "sd35_dspo": ("dspo", 0.001, 0.0),
    "sd35_dmpo": ("dmpo", 100.0, 0.01),
    "flux_diffusion_dpo": ("diffusion-dpo", 100.0, 0.0),
    "flux_dspo": ("dspo", 0.001, 0.0),
    "flux_dmpo": ("dmpo", 100.0, 0.01),
}


@pytest.mark.parametrize("name", sorted(FLOW_RECIPES))
def test_flow_recipes(env, tmp_path, name):
    """Each script's command (DRY_RUN=1) parses into its recipe; its LoRA targets exist in the
    family's transformer (image and text streams of the joint attention)."""
    import shlex

    from sdpo.lora import add_lora

    method, beta, alpha = FLOW_RECIPES[name]
    model = env["models"]["sd35" if name.startswith("sd35") else "flux"]
    run_env = dict(os.environ, DRY_RUN="1", NUM_GPUS="8", PYTHON=sys.executable)
    run_env.update(MODEL_NAME=str(model), DATASET_NAME=str(env["data"]), OUTPUT_DIR="o")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "train" / f"{name}.sh"), "--max_train_steps", "7"],
        env=run_env,
        capture_output=True,
        text=True,
        check=True,
    )
    argv = shlex.split(proc.stdout)
    cfg = train.parse_args(argv[argv.index(str(REPO / "train.py")) + 1 :])
    assert (cfg.train_method, cfg.beta_dpo, cfg.dmpo_alpha) == (method, beta, alpha)
    assert cfg.use_winner_preserving and cfg.winner_preserving_mu == 0.6
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.resolution) == (32, 64.0, 1024)
    scaled = cfg.learning_rate * cfg.train_batch_size * cfg.gradient_accumulation_steps * 8
    assert cfg.scale_lr and scaled == pytest.approx(3e-4)
    assert (cfg.logit_mean, cfg.logit_std, cfg.max_train_steps) == (0.0, 1.0, 7)
    denoiser = _parts(model).unet
    add_lora(denoiser, 2, target_modules=cfg.lora_target_modules)
    names = [n for n, _ in denoiser.named_modules() if n.endswith(".lora_A")]
    assert any(".add_q_proj." in n for n in names) and any(".to_q." in n for n in names)


def test_real_size_flow_configs_build_on_the_meta_device():
    """The bench's real-size SD3.5-M / FLUX.1-dev transformers: published configs, known sizes."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from sdpo.testing import configs

    with torch.device("meta"):  # no memory, no initialisation
        sd35 = SD3Transformer2DModel(**configs.SD35M_TRANSFORMER)
        flux = FluxTransformer2DModel(**configs.FLUX_DEV_TRANSFORMER)
    counts = {
        "sd35m_transformer": sum(p.numel() for p in sd35.parameters()),
        "flux_dev_transformer": sum(p.numel() for p in flux.parameters()),
    }
    assert counts == configs.FLOW_EXPECTED_PARAMS
    # Real SD3 conditioning fits without cropping: CLIP-L 768 + CLIP-G 1280 ≤ T5's 4096.
    assert 768 + 1280 <= configs.SD35M_TRANSFORMER["joint_attention_dim"]
    assert configs.SD35M_TRANSFORMER["pos_embed_max_size"] >= 1024 // 8 // 2


def test_toy_flow_model_has_a_deterministic_unit_scale_latent_space(tmp_path):
    """`python -m experiments.toy --flow`'s model: an SD3-style folder whose VAE posterior is
    deterministic and whose scaled latents have zero mean and unit std on the toy images; a
    resumed --outdir holding the other kind of model is refused."""
    from experiments.toy.model import build_toy_flow_model
    from experiments.toy.runs import _check_model_kind
    from experiments.toy.task import make_pairs, winner_loser_arrays

    winners, _, _ = winner_loser_arrays(make_pairs(16, size=16, seed=0, loser_kinds=("noisy",)))
    path = build_toy_flow_model(tmp_path / "model", winners, image_size=16)
    parts = _parts(path)
    assert parts.family.name == "sd3"
    with torch.no_grad():
        post = parts.vae.encode(torch.from_numpy(winners[:64]).float()).latent_dist
        z = parts.family.scale_latents(parts.vae, post.mean)
    assert float(post.std.max()) < 1e-6
    assert abs(float(z.mean())) < 1e-4 and float(z.std()) == pytest.approx(1.0, rel=1e-4)
    _check_model_kind(path, flow=True)
    with pytest.raises(ValueError, match="drop --flow"):
        _check_model_kind(path, flow=False)


def test_sd3_eval_script_dispatch(env, tmp_path):
    """test_sd3.sh runs test_sd15.sh with SD3.5's defaults (40 steps, --cfg 3.5, 1024 px), no
    --sdxl / --no-sdxl (the family is detected), outputs beside the LoRA file in eval_sd3/."""
    weights = tmp_path / "run" / LORA_WEIGHT_NAME
    weights.parent.mkdir()
    weights.write_bytes(b"")  # only its location matters with --print_manifest_path
    script_env = dict(os.environ, PYTHON=sys.executable, MODEL_NAME=str(env["models"]["sd3"]))
    script_env.update(SETS="smoke", NUM_PROCESSES="1", METRICS="none")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts/eval/test_sd3.sh"), str(weights), "--print_manifest_path"],
        env=script_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(weights.parent / "eval_sd3" / "smoke_seed0_1024x1024_40s_3.5cfg.json") in proc.stdout
    assert "sdxl" not in proc.stdout.split("eval.generate", 1)[1]
