"""End-to-end training runs on tiny SD1.5 / SDXL models (CPU): every objective with and without
the safeguard, real ``accelerate launch`` runs (1 and 2 processes), exact resume, gradient
accumulation equivalence, checkpoint layout and the saved UNet."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

import train
from sdpo.testing.data import write_synthetic_pickapic
from tests.train_fixtures import (
    REPO,
    build_models,
    load_unet_state,
    max_abs_diff,
    relative_gap,
    train_args,
)

# β per objective and family, as the reference recipes (defaults.md); DMPO also gets α.
BETA = {"diffusion-dpo": "5000", "dspo": "0.001", "dmpo": "2000", "sft": "5000"}
LOG_KEYS = {
    "step",
    "epoch",
    "loss",
    "model_mse",
    "loser_scale",
    "loser_scale_min",
    "lr",
    "grad_norm",
    "corrupt_skipped",
}
PAIRED_KEYS = {"implicit_acc", "ref_mse", "winner_diff", "loser_diff"}
# Update linear in the gradient (Adam with a large ε), so float rounding is not amplified into
# ±lr sign flips when comparing two layouts of the same global batch.
LINEAR_ADAM = ("--learning_rate", "1.0", "--adam_epsilon", "1.0", "--lr_warmup_steps", "0")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    models = build_models(root / "models")
    data = root / "data"
    write_synthetic_pickapic(data, n_pairs=12, ties=2, corrupt_rows=1)
    start = {name: load_unet_state(path) for name, path in models.items()}
    return {"models": models, "data": data, "start": start}


def _log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _run(env, family, out, *extra):
    cfg = train.parse_args(
        train_args(env["models"][family], env["data"], out, *extra, sdxl=family == "sdxl")
    )
    return train.main(cfg)


@pytest.mark.parametrize("safeguard", [False, True], ids=["plain", "safeguard"])
@pytest.mark.parametrize("method", ["diffusion-dpo", "dspo", "dmpo", "sft"])
@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_every_method_trains(env, tmp_path, family, method, safeguard):
    extra = ["--train_method", method, "--beta_dpo", BETA[method], "--dmpo_alpha", "0.01"]
    extra += ["--train_batch_size", "1"]  # 1 pair = 2 images per step: CPU time
    if safeguard:
        extra += ["--use_winner_preserving", "--winner_preserving_mu", "0.5"]
    result = _run(env, family, tmp_path, *extra)
    start = env["start"][family]

    assert result["global_step"] == 2
    assert max_abs_diff(result["unet"].state_dict(), start) > 0  # the policy moved
    if method == "sft":
        assert result["ref_unet"] is None  # SFT needs no reference model
    else:
        ref = result["ref_unet"]
        assert not any(p.requires_grad for p in ref.parameters())
        assert max_abs_diff(ref.state_dict(), start) == 0  # the frozen reference did not

    rows = _log(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    keys = LOG_KEYS | (PAIRED_KEYS if method != "sft" else set())
    assert all(keys <= r.keys() for r in rows)
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    lam = [r["loser_scale"] for r in rows]
    if safeguard and method != "sft":
        assert all(0.0 <= v <= 1.0 for v in lam) and min(lam) < 1.0  # the safeguard acted
        assert all(r["loser_scale_min"] <= r["loser_scale"] for r in rows)
    else:
        assert lam == [1.0, 1.0]


def test_gradient_accumulation_matches_one_big_batch(env, tmp_path):
    """1 micro-step x 4 pairs == 4 micro-steps x 1 pair: same pairs, same noise and timesteps
    (keyed by row, not by position), mean over pairs either way."""
    common = ("--max_train_steps", "2", "--no_hflip", "--proportion_empty_prompts", "0")
    # --scale_lr: 0.25 x (accumulation x pairs per micro-step) = 1.0 in both layouts
    common += (*LINEAR_ADAM, "--scale_lr", "--learning_rate", "0.25")
    big = _run(env, "sd15", tmp_path / "big", *common, "--train_batch_size", "4")
    small = _run(
        env,
        "sd15",
        tmp_path / "acc",
        *common,
        "--train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "4",
    )
    start = env["start"]["sd15"]
    a, b = big["unet"].state_dict(), small["unet"].state_dict()
    assert relative_gap(a, b, start) < 1e-3
    assert [r["lr"] for r in _log(tmp_path / "big") + _log(tmp_path / "acc")] == [1.0] * 4
    for ra, rb in zip(_log(tmp_path / "big"), _log(tmp_path / "acc")):
        # β = 5000 multiplies float rounding of the error gaps: the loss agrees to ~1e-4 only
        assert ra["loss"] == pytest.approx(rb["loss"], abs=2e-3)
        assert ra["model_mse"] == pytest.approx(rb["model_mse"], rel=1e-5)


def _subprocess(cmd: list[str], extra_env: dict | None = None) -> None:
    # Same thread count as this process, so float reductions match an in-process run.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, **(extra_env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _accelerate_launch(args: list[str]) -> None:
    """`accelerate launch` exactly as the recipes use it (one CPU process)."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _subprocess([*launcher, "--cpu", "train.py", *args])


def _torchrun(n_proc: int, args: list[str]) -> None:
    """n CPU processes with the gloo backend. (`accelerate launch --cpu` starts ONE process and
    leaves multi-CPU to mpirun, so torchrun starts them; accelerate picks the world up from its
    environment exactly as under `accelerate launch --multi_gpu`.)"""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n_proc)]
    launcher += ["--master_addr", "127.0.0.1", "--master_port", str(port)]
    _subprocess(
        [*launcher, "train.py", *args], {"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    )


def test_two_processes_match_one_process(env, tmp_path):
    """2 gloo processes x 2 pairs == `accelerate launch` 1 process x 4 pairs (same global batch;
    per-pair noise keyed by row; λ synced over processes with --winner_preserving_sync)."""
    common = ["--max_train_steps", "2", "--no_hflip", "--proportion_empty_prompts", "0"]
    common += [*LINEAR_ADAM, "--use_winner_preserving", "--winner_preserving_sync"]
    _accelerate_launch(
        train_args(env["models"]["sd15"], env["data"], tmp_path / "one", *common)
        + ["--train_batch_size", "4"]
    )
    _torchrun(
        2,
        train_args(env["models"]["sd15"], env["data"], tmp_path / "two", *common)
        + ["--train_batch_size", "2"],
    )
    one = torch.load(tmp_path / "one" / "unet.pth", weights_only=True)
    two = torch.load(tmp_path / "two" / "unet.pth", weights_only=True)
    assert relative_gap(one, two, env["start"]["sd15"]) < 1e-3
    rows_one, rows_two = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert [r["lr"] for r in rows_one] == [r["lr"] for r in rows_two]  # schedule per opt. step
    for ra, rb in zip(rows_one, rows_two):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=2e-3)
        assert ra["model_mse"] == pytest.approx(rb["model_mse"], rel=1e-5)
        assert ra["loser_scale"] == pytest.approx(rb["loser_scale"], rel=1e-4)


def test_sdxl_through_accelerate_launch(env, tmp_path):
    """A real `accelerate launch` SDXL run gives the same UNet as the in-process run."""
    inproc = _run(env, "sdxl", tmp_path / "in", "--train_method", "dmpo", "--dmpo_alpha", "0.01")
    args = train_args(env["models"]["sdxl"], env["data"], tmp_path / "cli", sdxl=True)
    _accelerate_launch(args + ["--train_method", "dmpo", "--dmpo_alpha", "0.01"])
    launched = torch.load(tmp_path / "cli" / "unet.pth", weights_only=True)
    assert max_abs_diff(inproc["unet"].state_dict(), launched) < 1e-6
    assert max_abs_diff(launched, env["start"]["sdxl"]) > 0


def test_resume_is_exact_and_checkpoints_are_complete(env, tmp_path):
    """5 steps straight == 3 steps, stop, resume to 5. With 4 pairs, 1 pair per micro-step and
    accumulation 2, an epoch is 2 steps: the resume restarts mid-epoch (skipping batches) and the
    run crosses two epoch boundaries. Checkpoints are pruned, complete, and the saved unet.pth
    loads strictly into a fresh UNet."""
    from diffusers import UNet2DConditionModel

    common = ("--gradient_accumulation_steps", "2", "--checkpointing_steps", "2")
    common += ("--train_batch_size", "1", "--max_train_samples", "4")
    straight = tmp_path / "straight"
    _run(env, "sd15", straight, *common, "--max_train_steps", "5", "--checkpoints_total_limit", "2")
    split = tmp_path / "split"
    _run(env, "sd15", split, *common, "--max_train_steps", "3")
    (split / "checkpoint-9.tmp").mkdir()  # a save killed midway: must be ignored
    _run(
        env, "sd15", split, *common, "--max_train_steps", "5", "--resume_from_checkpoint", "latest"
    )

    a = torch.load(straight / "unet.pth", weights_only=True)
    b = torch.load(split / "unet.pth", weights_only=True)
    assert max_abs_diff(a, b) == 0.0
    assert [r["loss"] for r in _log(straight)] == [r["loss"] for r in _log(split)]
    assert [r["epoch"] for r in _log(straight)] == [0, 0, 1, 1, 2]

    assert not [p for p in (*straight.iterdir(), *split.iterdir()) if p.name.endswith(".tmp")][1:]
    # Pruning: limit 2 keeps the newest two; every kept checkpoint is complete.
    assert sorted(p.name for p in straight.iterdir() if p.name.startswith("checkpoint")) == [
        "checkpoint-4",
        "checkpoint-5",
    ]
    for ckpt in ("checkpoint-4", "checkpoint-5"):
        files = {p.name for p in (straight / ckpt).iterdir()}
        assert {"unet.pth", "trainer_state.json", "optimizer.bin", "scheduler.bin"} <= files
    assert (
        json.loads((straight / "checkpoint-4" / "trainer_state.json").read_text())["global_step"]
        == 4
    )

    # unet.pth: a plain state_dict that loads strictly; unet/ is a diffusers folder.
    config = UNet2DConditionModel.load_config(env["models"]["sd15"], subfolder="unet")
    fresh = UNet2DConditionModel.from_config(config)
    fresh.load_state_dict(a, strict=True)
    folder = UNet2DConditionModel.from_pretrained(straight / "unet")
    assert (straight / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert max_abs_diff(folder.state_dict(), a) == 0.0
    assert max_abs_diff(a, env["start"]["sd15"]) > 0


def test_unet_init_from_state_dict_and_folder(env, tmp_path):
    """--unet_init: a unet.pth state_dict (strict) or a diffusers UNet folder replaces the start."""
    from diffusers import UNet2DConditionModel

    from sdpo.families import ModelSource, get_family

    def load_unet(cfg):
        source = ModelSource.from_flags(cfg, denoiser_init=cfg.unet_init)
        return get_family("sd15").load_denoiser(source)

    model = env["models"]["sd15"]
    start = env["start"]["sd15"]
    shifted = {k: v + 0.5 for k, v in start.items()}
    torch.save(shifted, tmp_path / "unet.pth")
    folder = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    folder.load_state_dict(shifted)
    folder.save_pretrained(tmp_path / "init_dir")
    for init in (tmp_path / "unet.pth", tmp_path / "init_dir"):
        cfg = train.parse_args(
            train_args(model, env["data"], tmp_path / "o", "--unet_init", str(init))
        )
        assert max_abs_diff(load_unet(cfg).state_dict(), shifted) == 0.0
    torch.save({k: v for k, v in list(shifted.items())[1:]}, tmp_path / "partial.pth")
    cfg = train.parse_args(
        train_args(model, env["data"], tmp_path / "o", "--unet_init", str(tmp_path / "partial.pth"))
    )
    with pytest.raises(ValueError, match="--unet_init"):
        load_unet(cfg)


def test_sdxl_conditioning(env):
    """SDXL kwargs: penultimate states of both encoders concatenated, pooled projection of
    encoder 2, time_ids [H, W, 0, 0, H, W]; SD1.5: the last hidden state only."""
    from sdpo.families import ModelSource, get_family

    def load_model_parts(cfg):
        family = get_family("sdxl" if cfg.sdxl else "sd15")
        return family.load_parts(ModelSource.from_flags(cfg), resolution=cfg.resolution)

    data, models = env["data"], env["models"]
    xl = load_model_parts(train.parse_args(train_args(models["sdxl"], data, "o", sdxl=True)))
    cond = xl.encode_prompts(["a cat", ""], "cpu")
    assert cond["encoder_hidden_states"].shape == (2, 77, 64)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    ids = xl.tokenizers[0](["a cat"], padding="max_length", max_length=77, return_tensors="pt")
    penultimate = xl.text_encoders[0](ids.input_ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(cond["encoder_hidden_states"][:1, :, :32], penultimate)
    sd = load_model_parts(train.parse_args(train_args(models["sd15"], data, "o")))
    cond = sd.encode_prompts(["a cat"], "cpu")
    assert set(cond) == {"encoder_hidden_states"} and cond["encoder_hidden_states"].shape == (
        1,
        77,
        32,
    )


def test_reference_can_stay_the_base_while_the_policy_starts_elsewhere(env, tmp_path):
    """--unet_init X: the reference is a frozen copy of X; with --ref_unet_init base it is the
    base model's own UNet (iterative rounds that keep the original reference), or any
    unet.pth given; the first logged ref_mse differs accordingly while the policy's is the same."""
    start = env["start"]["sd15"]
    shifted = {k: v + 0.01 for k, v in start.items()}
    torch.save(shifted, tmp_path / "x.pth")
    runs = {}
    for name, ref in (("copy", ()), ("base", ("--ref_unet_init", "base"))):
        out = tmp_path / name
        extra = ("--unet_init", str(tmp_path / "x.pth"), "--max_train_steps", "1", *ref)
        result = _run(env, "sd15", out, *extra)
        runs[name] = (result["ref_unet"].state_dict(), _log(out)[0])
    assert max_abs_diff(runs["copy"][0], shifted) == 0.0
    assert max_abs_diff(runs["base"][0], start) == 0.0
    assert runs["copy"][1]["model_mse"] == runs["base"][1]["model_mse"]
    assert runs["copy"][1]["ref_mse"] != runs["base"][1]["ref_mse"]
    with pytest.raises(SystemExit):  # LoRA's reference is its own base: refused up front
        train.parse_args(
            train_args(env["models"]["sd15"], env["data"], tmp_path / "l", "--lora_rank", "4",
                       "--ref_unet_init", "base")
        )  # fmt: skip
