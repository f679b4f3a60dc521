"""The GPU run: every benchmark target and GPU-only code path in ONE prepared call (issue 14).

    bash bench/gpu_check.sh                      # on the GPU machine (installs carried wheels)
    python -m bench.gpu_check --cpu-dry-run      # every job at tiny size on the CPU (the tests)
    python -m bench.gpu_check --list             # the jobs, in order, with their estimates

Jobs run in priority order (a run cut short keeps what it measured):

1. SD1.5 512² training rows of :mod:`bench.bench_train` (a reference-recipe emulation, b ours,
   c cached, c+fast, d LoRA, e safeguard off, unet = UNet-only MFU), the safeguard's λ alone;
2. batch-1 vs batched generation (SD1.5 512², the evaluation's generation code);
3. SDXL 1024² training rows (a, c, d, unet; the recipe's Adafactor + gradient checkpointing);
4. flow-matching families' rows (see :func:`extra_families`: picked up from the registry);
5. scoring images/s per metric (:mod:`eval.scorers` on random-weight real-size backbones,
   :mod:`bench.scorer_weights`);
6. smoke runs of GPU-only paths: the training loop (``train.py``'s :func:`sdpo.training.main`) in
   fp16 with accelerate's grad scaler + fused AdamW + channels-last, 8-bit AdamW (bitsandbytes),
   and the keyed pair-noise generators on CUDA vs CPU;
7. SDXL generation, and the SD1.5 ``c+compile`` row last (compilation takes minutes).

Each job's result joins ``results.json`` (rewritten atomically the moment the job ends) and the
tables in ``summary.md``, under ``--out`` (default ``$OUT``). One file for all jobs rather than one
per job, because the device tool returns at most 8 files from ``$OUT``. Before each job the run
prints the elapsed time and an ETA from the jobs' estimates (seconds on one H200); a job whose
estimate would end past ``--budget_s`` is skipped (recorded as such), so the run ends in time. A
job that fails is recorded with its error and the run goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # python bench/gpu_check.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import bench_train as bt
from bench import report, timing
from sdpo.cli import arg, parse

# Training rows per family, in priority order. A family not listed here but registered in
# sdpo.families gets FLOW_ROWS (see extra_families).
TRAINING_ROWS = {
    "sd15": ("a", "b", "c", "c+fast", "d", "e", "unet"),
    "sdxl": ("a", "c", "d", "unet"),
}
# Flow-matching families ("sd3", "flux"): they train LoRA by default (a second full FLUX
# transformer alone is 24 GB in bf16), so their row is LoRA on cached conditioning (d): pairs/s
# and peak memory. The reference recipe (row a) is DDPM-ε only; a full fine-tune (row c) of
# FLUX does not fit one GPU, and one row each keeps the run inside its 8 minutes.
FLOW_ROWS = ("d",)
# Benchmark sizes on the GPU (the dry run: tiny models, 1 pair, 1 iteration).
GPU_SIZES = {
    "sd15": dict(pairs=8, iters=5, warmup=2, gen_prompts=16, gen_batch=16, gen_steps=25),
    "sdxl": dict(pairs=2, iters=3, warmup=1, gen_prompts=8, gen_batch=8, gen_steps=20),
}
FLOW_SIZE = dict(pairs=2, iters=3, warmup=1)
DRY_SIZE = dict(
    tiny=True,
    resolution=16,
    pairs=1,
    iters=1,
    warmup=0,
    lora_rank=2,
    gen_prompts=2,
    gen_batch=2,
    gen_steps=1,
)
SCORE_IMAGES = 64  # per metric on the GPU (4 in the dry run), 512² like SD1.5's images
PACKAGES = ("diffusers", "transformers", "accelerate", "peft", "open_clip", "bitsandbytes")


@dataclass
class CheckConfig:
    """Options of ``python -m bench.gpu_check`` (see ``--help``)."""

    out: str | None = arg(None, "folder of results.json / summary.md (default: $OUT)")
    cpu_dry_run: bool = arg(
        False,
        "walk every job at tiny size on the CPU (minutes of GPU work become seconds)",
        flags=["--cpu-dry-run", "--cpu_dry_run"],
    )
    budget_s: float = arg(450.0, "skip a job whose estimate would end the run past this time")
    jobs: str | None = arg(None, "comma-separated job names or name prefixes (default: all)")
    list: bool = arg(False, "print the jobs in order with their estimates and exit")
    peak_tflops: float = arg(790.0, "peak TFLOP/s for MFU (as bench.bench_train)")
    seed: int = arg(0, "seed of the random weights and inputs")


def check(cfg: CheckConfig) -> CheckConfig:
    cfg.out = cfg.out or os.environ.get("OUT")
    if not cfg.out and not cfg.list:
        raise ValueError("--out: give a folder (or set $OUT)")
    if cfg.budget_s <= 0:
        raise ValueError(f"--budget_s must be > 0, got {cfg.budget_s}")
    return cfg


def parse_args(argv=None) -> CheckConfig:
    return parse(
        CheckConfig,
        argv,
        prog="python -m bench.gpu_check",
        description=__doc__.split("\n\n")[0],
        check=check,
    )


@dataclass
class Job:
    name: str
    estimate_s: float  # on one H200
    run: Callable[[Context], dict]
    group: str = ""  # the summary table it belongs to (a family name, "scoring", "smoke")


def extra_families(dry: bool) -> list[str]:
    """HOOK for new model families: every family registered in :data:`sdpo.families.FAMILIES`
    beyond :data:`TRAINING_ROWS` gets :data:`FLOW_ROWS`, once it has real-size configs in
    :mod:`sdpo.testing.configs` (``FAMILIES``) — and, for the dry run, a tiny pipeline builder
    ``sdpo.testing.tiny.build_tiny_<name>(path, seed=)``. Nothing else needs editing here.

    What the rows use of such a family: ``sdpo.testing.realsize.build_model_parts(name,
    tokenizer_dir, device="meta", resolution=)``, the family's ``dummy_cond``, ``predict`` and
    ``objective(...).draw``, and the VAE config's ``latent_channels`` / ``block_out_channels``.
    A full fine-tune that does not fit the GPU (FLUX's 12 B parameters in fp32 + AdamW) is
    recorded as an error and the run goes on."""
    from sdpo.families import FAMILIES

    found = []
    for name in FAMILIES:
        if name in TRAINING_ROWS:
            continue
        if bt.has_realsize(name) and (not dry or bt.tiny_builder(name) is not None):
            found.append(name)
    return found


class Context:
    """What jobs share: the device, a work folder, one :class:`bench_train.Bench` per family."""

    def __init__(self, cfg: CheckConfig, workdir: Path):
        self.cfg, self.workdir = cfg, workdir
        self.dry = cfg.cpu_dry_run
        self.device = "cpu" if self.dry else timing.default_device(None)
        self._benches: dict[str, bt.Bench] = {}
        self.cleanup: list[Path] = []

    def clean(self) -> None:
        import shutil

        while self.cleanup:
            shutil.rmtree(self.cleanup.pop(), ignore_errors=True)

    def bench_config(self, family: str, **extra) -> bt.BenchConfig:
        size = DRY_SIZE if self.dry else GPU_SIZES.get(family, FLOW_SIZE)
        return bt.check(
            bt.BenchConfig(
                family=family,
                peak_tflops=self.cfg.peak_tflops,
                seed=self.cfg.seed,
                device=self.device,
                compile=True,
                **{**size, **extra},
            )
        )

    def bench(self, family: str) -> bt.Bench:
        if family not in self._benches:
            cfg = self.bench_config(family)
            self._benches[family] = bt.Bench(cfg, self.device, self.workdir / family)
        return self._benches[family]

    def tiny_folder(self, family: str = "sd15") -> Path:
        path = self.workdir / f"smoke_{family}"
        if not path.is_dir():
            bt.tiny_builder(family)(path, seed=self.cfg.seed)
        return path


# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------


def row_job(family: str, row: str, estimate: float) -> Job:
    def run(ctx: Context) -> dict:
        compiling = row == "c+compile" and ctx.dry
        # The dry run walks the compile row with dynamo disabled (inductor on a CPU takes
        # minutes); torch.compile's wrapper and the rest of the row run as on the GPU.
        with _dynamo_disabled() if compiling else contextlib.nullcontext():
            return ctx.bench(family).measure(row)

    return Job(f"{family}_{row}", estimate, run, family)


@contextlib.contextmanager
def _dynamo_disabled():
    import torch._dynamo

    old = torch._dynamo.config.disable
    torch._dynamo.config.disable = True
    try:
        yield
    finally:
        torch._dynamo.config.disable = old


def lambda_job(family: str) -> Job:
    return Job(f"{family}_lambda", 2, lambda ctx: ctx.bench(family).lambda_timing(), family)


def generation_job(family: str, estimate: float) -> Job:
    return Job(f"{family}_generation", estimate, lambda ctx: ctx.bench(family).generation(), family)


def scoring_job(metric: str, estimate: float) -> Job:
    def run(ctx: Context) -> dict:
        import numpy as np
        from PIL import Image

        from eval.scorers import get_scorer

        start = time.perf_counter()
        if ctx.dry:
            from eval.tiny_scorers import build_tiny_scorers

            env = build_tiny_scorers(ctx.workdir / "tiny_scorers", seed=ctx.cfg.seed)
        else:
            from bench.scorer_weights import build_scorer_weights

            folder = _fast_tmp() / f"scorer_{metric}"
            ctx.cleanup.append(folder)  # GBs of weights: removed when the next job starts
            env = build_scorer_weights(metric, folder, device=ctx.device)
        built = time.perf_counter()
        with _environ(env):  # eval.scorers reads its weight locations from the environment
            scorer = get_scorer(metric, device=ctx.device, batch_size=16)
        loaded = time.perf_counter()
        n, side = (4, 32) if ctx.dry else (SCORE_IMAGES, 512)
        rng = np.random.default_rng(ctx.cfg.seed)
        images = [
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)
        ]
        prompts = [f"a photo of object {i} on a table" for i in range(n)]
        scorer.score(images[:2], prompts[:2])  # warm-up
        timing.sync(ctx.device)
        t0 = time.perf_counter()
        scores = scorer.score(images, prompts)
        timing.sync(ctx.device)
        seconds = time.perf_counter() - t0
        return {
            "metric": metric,
            "images": n,
            "image_side": side,
            "batch_size": 16,
            "images_per_s": n / seconds,
            "s_write_weights": built - start,
            "s_load": loaded - built,
            "scores_finite": bool(torch.isfinite(scores).all()),
            "peak_gib": timing.peak_gib(ctx.device),
        }

    return Job(f"scoring_{metric}", estimate, run, "scoring")


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    """Set environment variables for the block only (the process's other users never see them)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _fast_tmp(need_gib: float = 8.0) -> Path:
    """A RAM-backed folder for the multi-GB scorer files when one has room, else the temp dir."""
    import shutil

    shm = Path("/dev/shm")
    roomy = (
        shm.is_dir() and os.access(shm, os.W_OK) and shutil.disk_usage(shm).free > need_gib * 2**30
    )
    path = (shm if roomy else Path(tempfile.gettempdir())) / "sdpo_gpu_check"
    path.mkdir(parents=True, exist_ok=True)
    return path


def train_smoke_job(name: str, extra: list[str], *, gpu_precision: str, needs: str | None = None):
    """One optimizer step of the real training loop on the tiny SD1.5 model (GPU: in
    ``gpu_precision`` with GPU-only flags; dry run: fp32 on the CPU, GPU-only flags dropped)."""

    def run(ctx: Context) -> dict:
        if needs and importlib.util.find_spec(needs) is None:
            return {"status": "skipped", "reason": f"{needs} is not installed (carry its wheel)"}
        from sdpo.config import parse_args as train_args
        from sdpo.testing.data import write_synthetic_pickapic
        from sdpo.training import main as train

        data = ctx.workdir / "smoke_data"
        if not data.is_dir():
            write_synthetic_pickapic(data, n_pairs=8, seed=ctx.cfg.seed)
        model, out = ctx.tiny_folder("sd15"), ctx.workdir / f"smoke_out_{name}"
        flags = [f for f in extra if not (ctx.dry and f in GPU_ONLY_FLAGS)]
        argv = [
            "--pretrained_model_name_or_path", str(model),
            "--train_data_dir", str(data),
            "--output_dir", str(out),
            "--resolution", "16" if ctx.dry else "32",
            "--train_batch_size", "2",
            "--max_train_steps", "1",
            "--mixed_precision", "no" if ctx.dry else gpu_precision,
            "--report_to", "none",
            "--seed", "7",
            "--learning_rate", "1e-4",
            "--lr_warmup_steps", "0",
            "--checkpointing_steps", "100",
            "--use_winner_preserving",
            "--winner_preserving_mu", "0.9",
            "--resume_from_checkpoint", "none",
            *flags,
        ]  # fmt: skip
        from diffusers import UNet2DConditionModel

        start = UNet2DConditionModel.from_pretrained(model, subfolder="unet").state_dict()
        result = train(train_args(argv))
        import json

        log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
        trained = torch.load(result["unet_pth"], map_location="cpu", weights_only=True)
        moved = max(float((trained[k].float() - start[k].float()).abs().max()) for k in start)
        losses = [row["loss"] for row in log]
        finite = all(x == x and abs(x) != float("inf") for x in losses)
        # fp16: accelerate's grad scaler may skip an overflowing step, so a step that leaves the
        # weights unchanged is reported (weights_moved), not failed.
        return {
            "status": "ok" if finite and len(log) == 1 else "FAILED",
            "flags": flags,
            "mixed_precision": "no" if ctx.dry else gpu_precision,
            "steps": len(log),
            "losses": losses,
            "loser_scale": [row.get("loser_scale") for row in log],
            "max_weight_change": moved,
            "weights_moved": moved > 0,
        }

    return Job(f"smoke_{name}", 25, run, "smoke")


GPU_ONLY_FLAGS = ("--use_fused_adam",)


def generator_smoke_job() -> Job:
    """Keyed pair noise (:func:`sdpo.step.pair_generators` + the objective's draw + the VAE
    posterior sample) on the run's device: split-invariant (4 pairs at once = 4 pairs one by one),
    and compared with the CPU draws of the same keys."""

    def run(ctx: Context) -> dict:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        from sdpo.families import get_family
        from sdpo.step import pair_generators
        from sdpo.testing.realsize import build_scheduler

        family = get_family("sd15")
        objective = family.objective(build_scheduler(), "bench")
        moments = torch.randn(8, 8, 64, 64, generator=torch.Generator().manual_seed(0))

        def draw(device, rows):
            batch = {"epoch": torch.zeros(len(rows), dtype=torch.long), "index": torch.tensor(rows)}
            gens = pair_generators(batch, ctx.cfg.seed, device)
            idx = rows + [r + 4 for r in rows]  # the pairs' winners, then their losers
            post = DiagonalGaussianDistribution(moments[idx].to(device))
            latents = post.sample(generator=gens * 2)
            noise, t = objective.draw(gens, latents.shape, device)
            return latents.cpu(), noise.cpu(), t.cpu()

        def cat(parts):
            lat = torch.cat(
                [torch.cat([p[0][:1] for p in parts]), torch.cat([p[0][1:] for p in parts])]
            )
            return lat, torch.cat([p[1] for p in parts]), torch.cat([p[2] for p in parts])

        rows = [0, 1, 2, 3]
        whole = draw(ctx.device, rows)
        split = cat([draw(ctx.device, [r]) for r in rows])
        cpu = draw("cpu", rows)
        split_diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(whole, split))
        cpu_noise = float((whole[1] - cpu[1]).abs().max())
        cpu_latent = float((whole[0] - cpu[0]).abs().max())
        return {
            "status": "ok" if split_diff == 0 else "FAILED",
            "device": ctx.device,
            "split_invariance_max_diff": split_diff,
            "vs_cpu_noise_max_diff": cpu_noise,
            "vs_cpu_latent_sample_max_diff": cpu_latent,
            "vs_cpu_timesteps_equal": float((whole[2] == cpu[2]).float().mean()),
            "equal_to_cpu_within_1e-5": cpu_noise < 1e-5 and cpu_latent < 1e-5,
        }

    return Job("smoke_cuda_generators", 5, run, "smoke")


def plan(dry: bool) -> list[Job]:
    """Every job in priority order, with its estimated seconds on one H200."""
    from eval.scorers import SCORERS

    jobs = [row_job("sd15", r, 12 if r in ("a", "b") else 9) for r in TRAINING_ROWS["sd15"]]
    jobs += [lambda_job("sd15"), generation_job("sd15", 30)]
    jobs += [row_job("sdxl", r, 25) for r in TRAINING_ROWS["sdxl"]]
    for family in extra_families(dry):
        jobs += [row_job(family, r, 30) for r in FLOW_ROWS]
    jobs += [scoring_job(m, 15 if m == "aesthetics" else 25) for m in SCORERS]
    jobs += [
        train_smoke_job(
            "fp16_gradscaler_fused_adam",
            ["--use_fused_adam", "--channels_last"],
            gpu_precision="fp16",
        ),
        train_smoke_job(
            "adamw8bit", ["--use_8bit_adam"], gpu_precision="bf16", needs="bitsandbytes"
        ),
        generator_smoke_job(),
    ]
    jobs += [generation_job("sdxl", 45), row_job("sd15", "c+compile", 150)]
    return jobs


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def environment(device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in PACKAGES:
        dist = {"open_clip": "open_clip_torch"}.get(name, name)
        try:
            versions[name] = version(dist)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "date": timing.now_utc(),
        "card": timing.prepare_device(device),
        "device_type": torch.device(device).type,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "packages": versions,
    }


def render_summary(state: dict, ctx: Context) -> str:
    """Markdown: one bench_train table per family, then scoring and smoke tables."""
    env, jobs = state["environment"], state["jobs"]
    text = [
        f"# GPU check — {env['date']} — {env['card']}\n\n"
        f"python {env['python']}, torch {env['torch']} (CUDA {env['cuda']}), "
        + ", ".join(f"{k} {v}" for k, v in env["packages"].items())
        + f". {'CPU DRY RUN (tiny models): no claim about any target. ' if ctx.dry else ''}"
        f"Elapsed {state['elapsed_s']:.0f} s.\n\n"
    ]
    for family in [*TRAINING_ROWS, *extra_families(ctx.dry)]:
        rows = [
            j["result"]
            for j in jobs.values()
            if j["group"] == family and j["status"] == "ok" and "row" in j["result"]
        ]
        if not rows:
            continue
        get = jobs.get
        res = report.summary(
            ctx.bench_config(family),
            env["card"],
            ctx.device,
            unet_gflop_fwd_per_image=ctx.bench(family).unet_gflop_fwd(),
            rows=rows,
        )
        for key in ("lambda", "generation"):
            job = get(f"{family}_{key}")
            if job and job["status"] == "ok":
                res[key] = job["result"]
        text.append(report.render(res))
    scoring = [
        j["result"] for j in jobs.values() if j["group"] == "scoring" and j["status"] == "ok"
    ]
    if scoring:
        text.append(
            "| metric | images/s | images | batch | load s | finite |\n|---|---|---|---|---|---|\n"
        )
        text += [
            f"| {r['metric']} | {r['images_per_s']:.1f} | {r['images']} × {r['image_side']}² | "
            f"{r['batch_size']} | {r['s_load']:.1f} | {r['scores_finite']} |\n"
            for r in scoring
        ]
        text.append("\n")
    text.append("| job | status | seconds | notes |\n|---|---|---|---|\n")
    for name, j in jobs.items():
        note = j.get("error") or j.get("result", {}).get("reason", "")
        if j["group"] == "smoke" and j["status"] == "ok":
            note = ", ".join(f"{k}={v}" for k, v in j["result"].items() if k != "losses")
        text.append(f"| {name} | {j['status']} | {j['seconds']:.1f} | {note} |\n")
    return "".join(text)


def save(state: dict, ctx: Context, out: Path) -> None:
    from sdpo import io

    io.write_json(out / "results.json", state)
    try:
        io.write_text(out / "summary.md", render_summary(state, ctx))
    except Exception as err:  # noqa: BLE001 - the JSON is what matters; say why the table failed
        io.write_text(out / "summary.md", f"summary failed: {err!r}\n")


def selected(jobs: list[Job], spec: str | None) -> list[Job]:
    if not spec:
        return jobs
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [j for j in jobs if any(j.name == w or j.name.startswith(w) for w in wanted)]
    if not chosen:
        raise ValueError(f"--jobs {spec!r} matches none of {[j.name for j in jobs]}")
    return chosen


def main(cfg: CheckConfig) -> dict:
    jobs = selected(plan(cfg.cpu_dry_run), cfg.jobs)
    if cfg.list:
        total = 0.0
        for j in jobs:
            total += j.estimate_s
            print(f"{j.name:40s} ~{j.estimate_s:5.0f} s   (cumulative {total:5.0f} s)")
        return {}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads = 1 if cfg.cpu_dry_run else None
    with tempfile.TemporaryDirectory(prefix="sdpo_gpu_check_") as tmp, timing.cpu_threads(threads):
        ctx = Context(cfg, Path(tmp))
        if not ctx.dry and ctx.device != "cuda":
            raise SystemExit("gpu_check: no CUDA device (use --cpu-dry-run on a CPU)")
        state = {"environment": environment(ctx.device), "dry_run": ctx.dry, "jobs": {}}
        print(f"gpu_check on {state['environment']['card']}: {len(jobs)} jobs", flush=True)
        for k, job in enumerate(jobs, 1):
            elapsed = time.perf_counter() - t_start
            left = sum(j.estimate_s for j in jobs[k - 1 :])
            print(
                f"[{k}/{len(jobs)}] {job.name} (~{job.estimate_s:.0f} s) — elapsed {elapsed:.0f} s,"
                f" ETA {left:.0f} s (budget {cfg.budget_s:.0f} s)",
                flush=True,
            )
            record = {"group": job.group, "estimate_s": job.estimate_s}
            # (the estimates are GPU seconds: the dry run checks only the time already spent)
            if elapsed + (0.0 if ctx.dry else job.estimate_s) > cfg.budget_s:
                record.update(status="skipped (budget)", seconds=0.0)
            else:
                t0 = time.perf_counter()
                try:
                    result = job.run(ctx)
                    status = result.pop("status", "ok") if isinstance(result, dict) else "ok"
                    record.update(status=status, result=result)
                except Exception as err:  # noqa: BLE001 - record it, run the next job
                    tb = traceback.format_exc(limit=-4)
                    print(tb, file=sys.stderr, flush=True)
                    record.update(status="error", error=f"{type(err).__name__}: {err}"[:500])
                    record["traceback"] = tb[-3000:]
                record["seconds"] = time.perf_counter() - t0
                ctx.clean()
                timing.free(ctx.device)
            state["jobs"][job.name] = record
            state["elapsed_s"] = time.perf_counter() - t_start
            save(state, ctx, out)
            print(f"    -> {record['status']} in {record['seconds']:.1f} s", flush=True)
    print((out / "summary.md").read_text())
    return state


if __name__ == "__main__":
    main(parse_args())
