"""The toy's runs: data, model and SFT start, then every (method, safeguard, seed) preference run
through the training loop (:func:`sdpo.training.main`, in this process or in spawned workers),
and the held-out evaluation of each run's checkpoints at fixed noise and timesteps."""

from __future__ import annotations

from pathlib import Path

from experiments.toy.config import DMPO_ALPHA, ToyConfig
from experiments.toy.model import build_toy_flow_model, build_toy_model
from experiments.toy.task import load_pairs, make_pairs, winner_loser_arrays, write_parquet
from sdpo import io

# ---------------------------------------------------------------------------------------------
# Training through the loop train.py runs
# ---------------------------------------------------------------------------------------------


def train_argv(
    *,
    model: Path,
    data: Path,
    out: Path,
    method: str,
    seed: int,
    steps: int,
    lr: float,
    batch: int,
    checkpoint_every: int,
    beta: float = 1.0,
    mu: float | None = None,
    unet_init: Path | None = None,
) -> list[str]:
    """The ``train.py`` command line of one toy run (``mu=None``: safeguard off)."""
    argv = [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", str(_image_size_of(data)),
        "--train_method", method,
        "--beta_dpo", str(beta),
        "--dmpo_alpha", str(DMPO_ALPHA),
        "--learning_rate", str(lr),
        "--lr_scheduler", "constant",
        "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps),
        "--train_batch_size", str(batch),
        "--checkpointing_steps", str(checkpoint_every),
        "--seed", str(seed),
        "--mixed_precision", "no",
        "--report_to", "none",
        "--no_hflip",  # winner and loser keep the same layout: the pair differs only in quality
        "--lora_rank", "0",  # full fine-tuning for every family (the flow families default to LoRA)
    ]  # fmt: skip
    if mu is not None:
        argv += ["--use_winner_preserving", "--winner_preserving_mu", str(mu)]
    if unet_init is not None:
        argv += ["--unet_init", str(unet_init)]
    return argv


def _image_size_of(data: Path) -> int:
    return int((Path(data).parent / "image_size.txt").read_text())


def run_train(argv: list[str]) -> Path:
    """Run the training loop (:func:`sdpo.training.main`, what ``train.py`` runs) in this
    process; returns its output folder. Quiet: the toy logs itself."""
    import logging

    from sdpo.config import parse_args
    from sdpo.training import main

    cfg = parse_args(argv)
    # The loop's basicConfig(INFO) is a no-op once the root logger has a handler.
    logging.basicConfig(level=logging.WARNING)
    main(cfg)
    return Path(cfg.output_dir)


def read_train_log(out: Path) -> list[dict]:
    import json

    path = Path(out) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare(cfg: ToyConfig) -> dict[str, Path]:
    """Data, tiny model and SFT start under ``cfg.outdir`` (each step skipped if already done)."""

    root = Path(cfg.outdir).resolve()
    data = root / "data"
    paths = {
        "train": data / "train",
        "heldout": data / "heldout",
        "model": root / "model",
        "sft": root / "sft",
    }
    if not (paths["heldout"] / "pairs.parquet").exists():
        # Different seeds: the held-out layouts, colours and noise are never trained on.
        kinds = tuple(cfg.loser_kinds)
        rows = make_pairs(cfg.train_pairs, size=cfg.image_size, seed=1, loser_kinds=kinds)
        write_parquet(rows, paths["train"] / "pairs.parquet")
        (data / "image_size.txt").write_text(str(cfg.image_size))
        rows = make_pairs(cfg.heldout_pairs, size=cfg.image_size, seed=2, loser_kinds=kinds)
        write_parquet(rows, paths["heldout"] / "pairs.parquet")
    if not (paths["model"] / "model_index.json").exists():
        winners, _, _ = winner_loser_arrays(load_pairs(paths["train"]))
        build = build_toy_flow_model if cfg.flow else build_toy_model
        with io.atomic_dir(paths["model"]) as tmp:
            build(tmp, winners, image_size=cfg.image_size)
    _check_model_kind(paths["model"], flow=cfg.flow)
    if not (paths["sft"] / "unet.pth").exists():
        # SFT on the preferred images (train.py's --train_method sft), from the random UNet.
        run_train(
            train_argv(
                model=paths["model"],
                data=paths["train"],
                out=paths["sft"],
                method="sft",
                seed=0,
                steps=cfg.sft_steps,
                lr=cfg.sft_lr,
                batch=2 * cfg.batch_pairs,
                checkpoint_every=cfg.sft_steps,
            )
        )
    return paths


def _check_model_kind(model: Path, *, flow: bool) -> None:
    """A resumed --outdir must hold the model kind asked for (--flow or not)."""
    import json

    has_transformer = "transformer" in json.loads((model / "model_index.json").read_text())
    if has_transformer != flow:
        raise ValueError(
            f"{model.parent} holds a {'flow' if has_transformer else 'UNet'} toy model; "
            f"{'drop' if has_transformer else 'give'} --flow or use another --outdir"
        )


# ---------------------------------------------------------------------------------------------
# Held-out evaluation at fixed noise and timesteps
# ---------------------------------------------------------------------------------------------


def build_heldout(cfg: ToyConfig, paths: dict[str, Path]) -> Path:
    """Fix the held-out evaluation once: latents, text conditioning, noise, timesteps and the
    reference (SFT start) predictions; saved to ``outdir/heldout.pt`` and reused by every run.

    Tensors: ``noisy`` ``[D, 2N, 4, h, w]`` (D draws; per draw the N winners then the N losers,
    each pair sharing its noise and timestep as in training), ``timesteps`` ``[D, 2N]``,
    ``target`` ``[D, 2N, 4, h, w]`` (the family's objective: ε, or the velocity ε − x0 with
    ``--flow``), ``cond`` (the denoiser's conditioning of the 2N captions), ``ref_pred`` like
    target.
    """
    import torch

    out = Path(cfg.outdir).resolve() / "heldout.pt"
    if out.exists():
        return out
    from sdpo.config import parse_args
    from sdpo.data.pairs import decode_image, transform_image
    from sdpo.families import ModelSource, check_family

    tcfg = parse_args(
        train_argv(
            model=paths["model"], data=paths["train"], out=paths["sft"], method="sft", seed=0,
            steps=1, lr=1.0, batch=1, checkpoint_every=1, unet_init=paths["sft"] / "unet.pth",
        )
    )  # fmt: skip
    # The same VAE, text encoder and scheduler training uses.
    source = ModelSource.from_flags(tcfg, denoiser_init=tcfg.unet_init)
    parts = check_family(source).load_parts(source, resolution=tcfg.resolution)
    parts.freeze_and_place("cpu", torch.float32)
    ref = parts.unet.eval()
    rows = [r for r in load_pairs(paths["heldout"]) if r["label_0"] != 0.5]
    gen = torch.Generator().manual_seed(1234)
    winners, losers, captions = [], [], []
    for r in rows:
        w, lo = (r["jpg_0"], r["jpg_1"]) if r["label_0"] == 1 else (r["jpg_1"], r["jpg_0"])
        for img, bucket in ((w, winners), (lo, losers)):
            bucket.append(transform_image(decode_image(img), tcfg.resolution, gen))
        captions.append(r["caption"])
    objective, family = parts.objective, parts.family
    with torch.no_grad():
        pixels = torch.stack(winners + losers)
        latents = family.scale_latents(parts.vae, parts.vae.encode(pixels).latent_dist.mean)
        cond = parts.encode_prompts(captions + captions, "cpu")
        n, draws = len(rows), cfg.eval_draws
        noise = torch.randn(draws, n, *latents.shape[1:], generator=gen)
        t = torch.stack([objective.draw_timesteps(gen, n, "cpu") for _ in range(draws)])
        noise, t = torch.cat([noise, noise], 1), torch.cat([t, t], 1)
        noisy, target = zip(
            *(objective.noisy_and_target(latents, noise[d], t[d]) for d in range(draws))
        )
        noisy, target = torch.stack(noisy), torch.stack(target)
        ref_pred = _predict(family, ref, noisy, t, cond)
    payload = {
        "noisy": noisy, "timesteps": t, "target": target, "cond": cond, "ref_pred": ref_pred,
        "captions": captions, "loser_kind": [r.get("loser_kind", "") for r in rows],
    }  # fmt: skip
    return io.save_torch(payload, out)


def _predict(family, denoiser, noisy, timesteps, cond):
    """The denoiser's predictions (ε, or velocity) for every draw: ``[D, 2N, C, h, w]``."""
    import torch

    with torch.no_grad():
        return torch.stack(
            [family.predict(denoiser, noisy[d], timesteps[d], cond) for d in range(len(noisy))]
        )


def heldout_metrics(model_pred, ref_pred, target, *, mu: float) -> dict[str, float]:
    """Policy-minus-reference errors on the fixed held-out set.

    Inputs ``[D, 2N, C, h, w]``, winners in rows ``0..N-1`` of each draw. Returns scalars:
    ``winner_diff`` / ``loser_diff`` (mean over pairs and draws of ``err_policy - err_ref``,
    the paper's training-dynamics curves), ``margin`` = ``loser_diff - winner_diff`` (the
    preference margin u = β/2 · margin, β-free), ``implicit_acc`` (fraction of (pair, draw)
    with u > 0), ``winner_err`` / ``loser_err`` (absolute policy errors) and ``heldout_lambda``
    (the safeguard's λ at ``mu`` on the held-out residuals, mean over draws).
    """
    import torch

    from sdpo.losses import per_image_error
    from sdpo.safeguard import winner_preserving_scale

    draws = model_pred.shape[0]
    model_err = torch.stack([per_image_error(model_pred[d], target[d]) for d in range(draws)])
    ref_err = torch.stack([per_image_error(ref_pred[d], target[d]) for d in range(draws)])
    diff_w, diff_l = (model_err - ref_err).chunk(2, dim=1)
    margin = diff_l - diff_w  # [D, N]
    lam = torch.stack([winner_preserving_scale(model_pred[d], target[d], mu) for d in range(draws)])
    err_w, err_l = model_err.chunk(2, dim=1)
    return {
        "winner_diff": float(diff_w.mean()),
        "loser_diff": float(diff_l.mean()),
        "margin": float(margin.mean()),
        "implicit_acc": float((margin > 0).float().mean()),
        "winner_err": float(err_w.mean()),
        "loser_err": float(err_l.mean()),
        "heldout_lambda": float(lam.mean()),
    }


def evaluate_run(
    run_dir: Path, heldout: dict, base_unet_dir: Path, *, mu: float, model: Path
) -> dict:
    """Held-out metrics of ``checkpoint-N/unet.pth`` for every N (and step 0 = the start);
    ``model``: the toy's model folder (its family says how the denoiser loads and is called)."""
    import torch

    from sdpo.checkpoint import list_checkpoints
    from sdpo.families import ModelSource, check_family

    family = check_family(ModelSource(str(model)))
    unet = family.denoiser_class().from_pretrained(base_unet_dir).eval()
    curve: dict[str, list] = {"step": []}

    def add(step: int, pred) -> None:
        row = heldout_metrics(pred, heldout["ref_pred"], heldout["target"], mu=mu)
        curve["step"].append(step)
        for k, v in row.items():
            curve.setdefault(k, []).append(v)

    add(0, heldout["ref_pred"])
    for step, ckpt_dir in list_checkpoints(run_dir):
        unet.load_state_dict(
            torch.load(ckpt_dir / "unet.pth", map_location="cpu", weights_only=True)
        )
        add(step, _predict(family, unet, heldout["noisy"], heldout["timesteps"], heldout["cond"]))
    return curve


# ---------------------------------------------------------------------------------------------
# Every (method, safeguard, seed) run
# ---------------------------------------------------------------------------------------------

TRAIN_KEYS = ("loss", "implicit_acc", "margin", "winner_diff", "loser_diff", "loser_scale",
              "loser_scale_min", "model_mse", "ref_mse")  # fmt: skip


def run_name(method: str, safeguard: bool, seed: int) -> str:
    return f"{method}_{'on' if safeguard else 'off'}_seed{seed}"


def _one_run(job: dict) -> dict:
    """Train one (method, safeguard, seed) through the training loop, then evaluate its
    checkpoints.

    Runs in a worker process; writes ``run_dir/curves.json`` (atomically) and returns it.
    Skipped when that file exists (resume).
    """
    import contextlib
    import json
    import shutil

    import torch

    run_dir = Path(job["run_dir"])
    done = run_dir / "curves.json"
    if done.exists():
        return json.loads(done.read_text())
    torch.set_num_threads(job["threads"])
    shutil.rmtree(run_dir, ignore_errors=True)  # a run killed half-way restarts from scratch
    run_dir.mkdir(parents=True)
    # Progress bars of parallel runs would interleave: each run's console output goes to a file.
    with (
        open(run_dir / "console.log", "w") as console,
        contextlib.redirect_stderr(console),
        contextlib.redirect_stdout(console),
    ):
        run_train(job["argv"])
    heldout = torch.load(job["heldout"], weights_only=False)
    curves = {
        "method": job["method"],
        "safeguard": job["safeguard"],
        "seed": job["seed"],
        "beta": job["beta"],
        "mu": job["mu"],
        "heldout": evaluate_run(
            run_dir, heldout, Path(job["base_unet"]), mu=job["mu"], model=Path(job["model"])
        ),
    }
    log = read_train_log(run_dir)
    curves["train"] = {"step": [r["step"] for r in log]}
    for key in TRAIN_KEYS:
        curves["train"][key] = [r.get(key) for r in log]
    if not job["keep_checkpoints"]:
        from sdpo.checkpoint import list_checkpoints

        for _, ckpt_dir in list_checkpoints(run_dir):
            shutil.rmtree(ckpt_dir)
    io.write_json(done, curves, indent=None)
    final = {k: curves["heldout"][k][-1] for k in ("winner_diff", "loser_diff", "margin")}
    print(
        f"[toy] {run_dir.name}: winner {final['winner_diff'] * 1e3:+.1f}e-3, loser "
        f"{final['loser_diff'] * 1e3:+.1f}e-3, margin {final['margin'] * 1e3:+.2f}e-3",
        flush=True,
    )
    return curves


def make_jobs(cfg: ToyConfig, paths: dict[str, Path], heldout: Path) -> list[dict]:
    """Every (method, safeguard, seed) run: same SFT start, same data order and noise per seed."""
    root = Path(cfg.outdir).resolve() / "runs"
    jobs = []
    for method in cfg.methods:
        for seed in range(cfg.seeds):
            for safeguard in (False, True):
                run_dir = root / run_name(method, safeguard, seed)
                argv = train_argv(
                    model=paths["model"],
                    data=paths["train"],
                    out=run_dir,
                    method=method,
                    seed=seed,
                    steps=cfg.steps,
                    lr=cfg.lr,
                    batch=cfg.batch_pairs,
                    checkpoint_every=cfg.eval_every,
                    beta=cfg.betas[method],
                    mu=cfg.mus[method] if safeguard else None,
                    unet_init=paths["sft"] / "unet.pth",
                )
                jobs.append(
                    {
                        "method": method, "safeguard": safeguard, "seed": seed,
                        "beta": cfg.betas[method], "mu": cfg.mus[method],
                        "argv": argv, "run_dir": str(run_dir), "heldout": str(heldout),
                        "base_unet": str(paths["sft"] / "unet"), "threads": 1,
                        "model": str(paths["model"]),
                        "keep_checkpoints": cfg.keep_checkpoints,
                    }
                )  # fmt: skip
    return jobs


def run_jobs(jobs: list[dict], workers: int) -> list[dict]:
    """Run jobs in ``workers`` spawned processes of one thread each (tiny UNets do not scale
    with threads; two single-thread processes do twice the work of one two-thread process)."""
    if workers == 1:
        return [_one_run(j) for j in jobs]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return pool.map(_one_run, jobs, chunksize=1)
