"""Training-step and generation benchmark on real-size random-weight models (one GPU, one run).

    python -m bench.bench_train                       # SD1.5 512², 8 pairs/step, peak 790
    python -m bench.bench_train --family sdxl --pairs 2 --gradient_checkpointing
    python -m bench.bench_train --tiny                # tiny models on CPU, seconds (tests)

Rows (all with the SDPO safeguard on, as the launch recipes, unless said otherwise):

a. reference recipe, emulated in ``bench/reference_recipe.py``: VAE + text encoder every step, a
   full frozen reference UNet, λ by autograd, ``torch.optim.AdamW`` defaults (foreach);
b. our default step (:func:`sdpo.step.training_step`, default flags);
c. our step reading precomputed latents (VAE posterior) and text embeddings (:mod:`sdpo.cache`);
   ``c+fast``: plus fused AdamW and channels-last; ``c+compile``: plus ``torch.compile``;
d. LoRA (:mod:`sdpo.lora`, reference = adapters disabled) on cached inputs;
e. safeguard off (same as c): the safeguard's overhead is the c / e time ratio, and, more
   precisely, the closed-form λ timed alone against the c micro-step;
unet: the UNet work alone (policy forward + backward, reference forward) with the c+fast options.

Timing: ``--warmup`` iterations excluded, then ``--iters`` iterations, each timed between
``torch.cuda.synchronize()`` calls; the MEDIAN is reported. A micro-step (data prep, forwards,
backward) and an optimizer step (step + zero_grad) are timed separately, and
pairs/s = pairs / (t_micro + t_optimizer / --grad_accum) (the paper's recipe accumulates 32).
Peak memory: ``torch.cuda.max_memory_allocated`` over the row (weights, optimizer state,
activations), counters reset between rows after freeing the previous row's models.

MFU: the UNet FLOPs of one forward and one forward + backward per image are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy of the UNet
(:func:`bench.flops.unet_flops_per_image`: matmuls, convolutions, attention, 2 FLOPs per MAC).
Per micro-step the model FLOPs are 2B·(F_fwd+bwd + F_fwd if a reference is needed); VAE / text
encoders and gradient-checkpointing recomputation are not counted. MFU = FLOPs / time /
``--peak_tflops`` (default 790: the bf16 peak the issue's own H100 measurements were
expressed against; 989 is the H100 SXM spec-sheet dense bf16 number).

The table is printed, appended with card, date and configuration to ``--results``
(bench/RESULTS.md) and written as JSON to ``--json`` when given.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_train.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]


@dataclass
class BenchConfig:
    family: str = "sd15"
    resolution: int | None = None
    pairs: int = 8
    iters: int = 10
    warmup: int = 3
    grad_accum: int = 32
    peak_tflops: float = 790.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = False
    lora_rank: int = 64
    compile: bool = False
    gen_prompts: int = 16
    gen_batch: int = 16
    gen_steps: int = 50
    skip_generation: bool = False
    tiny: bool = False
    rows: str = "a,b,c,c+fast,c+compile,d,e,unet"
    device: str | None = None
    results: str = str(REPO / "bench" / "RESULTS.md")
    json: str | None = None
    seed: int = 0


def parse_args(argv=None) -> BenchConfig:
    p = argparse.ArgumentParser(
        prog="python -m bench.bench_train",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    helps = {
        "family": "sd15 or sdxl",
        "resolution": "image side (default 512 / SDXL 1024; --tiny: 32)",
        "pairs": "preference pairs per micro-step (2 images each)",
        "iters": "timed iterations per row (median reported)",
        "warmup": "untimed iterations before timing",
        "grad_accum": "micro-steps per optimizer step in the pairs/s formula",
        "peak_tflops": "peak TFLOP/s for MFU (790 as in issue 6's measurements; 989 = H100 SXM spec sheet)",
        "mixed_precision": "autocast dtype (bf16, fp16, no); frozen models stored in it",
        "gradient_checkpointing": "recompute UNet activations (the reference forces it for SDXL)",
        "lora_rank": "LoRA rank of row d",
        "compile": "also measure torch.compile (row c+compile; compile time excluded)",
        "gen_prompts": "prompts generated at batch 1 and batched",
        "gen_batch": "batch size of the batched generation",
        "gen_steps": "Euler steps per image (reference: 50)",
        "skip_generation": "training rows only",
        "tiny": "tiny sdpo.testing.tiny models on CPU (seconds; for tests); implies fp32",
        "rows": "comma-separated rows to measure (a and c needed for the ratios)",
        "device": "default: cuda if available, else cpu",
        "results": "markdown file the table is appended to",
        "json": "also write the results as JSON here",
        "seed": "seed of the random weights and inputs",
    }
    for name, default in asdict(BenchConfig()).items():
        kind = BenchConfig.__dataclass_fields__[name].type
        kw = {"help": helps[name], "default": default}
        if str(kind).startswith("bool"):
            kw["action"] = "store_true"
        else:
            kw["type"] = (
                int if str(kind).startswith("int") else float if "float" in str(kind) else str
            )
        p.add_argument(f"--{name}", **kw)
    cfg = BenchConfig(**vars(p.parse_args(argv)))
    if cfg.tiny:
        cfg.resolution = cfg.resolution or 32
        cfg.mixed_precision = "no"  # CPU autocast in bf16 is slow and not what a GPU runs
    cfg.resolution = cfg.resolution or (1024 if cfg.family == "sdxl" else 512)
    if cfg.family not in ("sd15", "sdxl"):
        p.error(f"--family must be sd15 or sdxl, got {cfg.family!r}")
    for name in ("pairs", "iters", "grad_accum", "gen_prompts", "gen_batch", "gen_steps"):
        if getattr(cfg, name) < 1:
            p.error(f"--{name} must be >= 1")
    return cfg


# ---------------------------------------------------------------------------------------------
# Models and inputs
# ---------------------------------------------------------------------------------------------


class ModelFactory:
    """Fresh models for each row, identical weights every time (seeded)."""

    def __init__(self, cfg: BenchConfig, device, workdir: Path):
        self.cfg, self.device, self.workdir = cfg, device, workdir
        self._flops: dict[bool, tuple[int, int]] = {}
        self.weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            cfg.mixed_precision, torch.float32
        )
        if cfg.tiny:
            import sdpo.testing.tiny as tiny
            from sdpo.testing.realsize import build_scheduler

            try:  # sdpo/testing/tiny.py passes an argument diffusers 0.42's DDPMScheduler rejects
                tiny._scheduler()
            except TypeError:
                tiny._scheduler = build_scheduler
            build = tiny.build_tiny_sdxl if cfg.family == "sdxl" else tiny.build_tiny_sd15
            self.tiny_path = build(workdir / "tiny", seed=cfg.seed)

    def parts(self, *, encoders: bool):
        """ModelParts with the UNet in fp32 on the device (trainable); VAE and text encoders
        frozen in the weight dtype when ``encoders`` (else left on the CPU: cached rows)."""
        cfg = self.cfg
        if cfg.tiny:
            from sdpo.families import ModelSource, get_family

            source = ModelSource(str(self.tiny_path))
            parts = get_family(cfg.family).load_parts(source, resolution=cfg.resolution)
        else:
            from sdpo.testing import realsize as arch

            dev = self.device if encoders else "meta"
            parts = arch.build_model_parts(
                cfg.family,
                self.workdir / "tokenizers",
                resolution=cfg.resolution,
                unet=arch.build_unet(cfg.family, device=self.device, seed=cfg.seed),
                vae=arch.build_vae(cfg.family, device=dev, seed=cfg.seed + 1),
                text_encoders=arch.build_text_encoders(cfg.family, device=dev, seed=cfg.seed + 2),
            )
        parts.unet.to(self.device)
        if encoders:
            parts.freeze_and_place(self.device, self.weight_dtype)
        return parts

    def flops(self, unet, *, lora: bool) -> tuple[int, int]:
        """(forward, forward + backward) UNet FLOPs per image, counted once per kind of UNet."""
        from bench.flops import unet_flops_per_image

        if lora not in self._flops:
            res = self.cfg.resolution
            scale = res // self.latent_size()
            self._flops[lora] = (
                unet_flops_per_image(unet, res, vae_scale_factor=scale),
                unet_flops_per_image(unet, res, backward=True, vae_scale_factor=scale),
            )
        return self._flops[lora]

    def latent_size(self) -> int:
        """Latent side: the real VAEs downsample 8×, the tiny one (2 blocks) 2×."""
        return self.cfg.resolution // (2 if self.cfg.tiny else 8)


def make_inputs(cfg: BenchConfig, parts, device, weight_dtype, latent: int) -> dict:
    """Synthetic inputs: pixels + captions (uncached rows), and the cached equivalents."""
    gen = torch.Generator().manual_seed(cfg.seed)
    b, res = cfg.pairs, cfg.resolution
    captions = [f"a photo of object {i} on a table, detailed, high quality" for i in range(b)]
    pixels = (torch.rand(2 * b, 3, res, res, generator=gen) * 2 - 1).to(device)
    unet_cfg = parts.unet.config
    moments = torch.randn(2 * b, 2 * unet_cfg.in_channels, latent, latent, generator=gen)
    moments[:, unet_cfg.in_channels :] = -6.0  # log-variance of a sharp posterior
    cond = {
        "encoder_hidden_states": torch.randn(b, 77, unet_cfg.cross_attention_dim, generator=gen).to(
            device
        )
    }
    if cfg.family == "sdxl":
        pooled = (
            unet_cfg.projection_class_embeddings_input_dim - 6 * unet_cfg.addition_time_embed_dim
        )
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(b, pooled, generator=gen).to(device),
            "time_ids": torch.tensor([[res, res, 0, 0, res, res]] * b, dtype=torch.float32).to(
                device
            ),
        }
    meta = {"index": torch.arange(b), "epoch": torch.zeros(b, dtype=torch.long), "corrupt": 0}
    return {
        "pixels": pixels,
        "captions": captions,
        "batch": {"pixel_values": pixels, "captions": captions, **meta},
        "cached_batch": {
            "latent_moments": moments.to(device, weight_dtype),
            "cond": cond,
            "captions": captions,
            **meta,
        },
    }


class Autocast(torch.nn.Module):
    """Runs the wrapped UNet under autocast (what ``accelerator.prepare`` does in train.py)."""

    def __init__(self, module, device, dtype):
        super().__init__()
        self.module, self.device_type, self.dtype = module, torch.device(device).type, dtype

    def forward(self, *args, **kwargs):
        if self.dtype == torch.float32:
            return self.module(*args, **kwargs)
        with torch.autocast(self.device_type, dtype=self.dtype):
            return self.module(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _free(device) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated() / 2**30


ROWS = {
    "a": "reference recipe (emulated): VAE+text enc. every step, 2nd UNet, autograd λ, AdamW",
    "b": "ours, default flags: sdpo.step (VAE+text enc. every step, 2nd UNet, closed-form λ)",
    "c": "ours + --precomputed_dir (cached VAE posterior + text embeddings)",
    "c+fast": "c + --use_fused_adam + --channels_last",
    "c+compile": "c+fast + --torch_compile",
    "d": "LoRA (c+fast, reference = adapters disabled, no 2nd UNet)",
    "e": "c with the safeguard OFF (overhead = c / e)",
    "unet": "UNet work only: policy fwd+bwd + reference fwd (c+fast options)",
}


def train_config(cfg: BenchConfig, *, safeguard: bool):
    """A real :class:`sdpo.config.TrainConfig` with the recipe's method settings."""
    from sdpo.config import TrainConfig

    return TrainConfig(
        pretrained_model_name_or_path="bench",
        train_method="diffusion-dpo",
        beta_dpo=5000.0,
        use_winner_preserving=safeguard,
        winner_preserving_mu=0.9,
        sdxl=cfg.family == "sdxl",
        mixed_precision=cfg.mixed_precision,
        resolution=cfg.resolution,
    )


def measure_row(row: str, cfg: BenchConfig, factory: ModelFactory, device) -> dict:
    """Build the row's models, warm up, time micro-steps and optimizer steps, count FLOPs."""
    import functools

    from bench.reference_recipe import reference_step
    from sdpo.losses import LOSSES
    from sdpo.step import Preference, training_step

    _free(device)
    wdtype = factory.weight_dtype
    uses_encoders = row in ("a", "b")
    parts = factory.parts(encoders=uses_encoders)
    unet = parts.unet.train()
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    fast = row in ("c+fast", "c+compile", "d", "unet")
    lora = row == "d"
    if lora:
        from sdpo.lora import AdapterDisabledReference, add_lora

        params = add_lora(unet, cfg.lora_rank)
        ref = AdapterDisabledReference(unet)
    else:
        params = [p for p in unet.parameters() if p.requires_grad]
        ref = copy.deepcopy(unet).requires_grad_(False).eval().to(dtype=wdtype)
    if fast:
        unet.to(memory_format=torch.channels_last)
        if not lora:
            ref.to(memory_format=torch.channels_last)
    flops_fwd, flops_train = factory.flops(unet, lora=lora)
    policy = Autocast(unet, device, wdtype)
    if row == "c+compile":
        policy = torch.compile(policy)
        ref = torch.compile(ref)
    is_cuda = torch.device(device).type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-8, fused=fast and is_cuda)
    inputs = make_inputs(cfg, parts, device, wdtype, factory.latent_size())
    autocast = functools.partial(Autocast.ctx, device, wdtype)
    spec = LOSSES["diffusion-dpo"]

    if row == "a":

        def micro():
            with autocast():
                loss = reference_step(
                    parts=parts,
                    unet=unet,
                    ref_unet=ref,
                    pixels=inputs["pixels"],
                    captions=inputs["captions"],
                    beta=5000.0,
                    mu=0.9,
                    use_safeguard=True,
                )
            loss.backward()

    elif row == "unet":
        batch = inputs["cached_batch"]
        latent = batch["latent_moments"][:, : unet.config.in_channels].float()
        timesteps = torch.randint(0, 1000, (latent.shape[0],), device=device)
        cond = {
            k: {kk: vv.repeat(2, 1) for kk, vv in v.items()}
            if isinstance(v, dict)
            else v.repeat(2, 1, 1)
            for k, v in batch["cond"].items()
        }

        def micro():
            pred = policy(latent, timesteps, **cond).sample
            with torch.no_grad(), autocast():
                ref(latent, timesteps, **cond)
            pred.float().square().mean().backward()

    else:
        train_cfg = train_config(cfg, safeguard=row != "e")
        batch = inputs["batch"] if row == "b" else inputs["cached_batch"]

        def micro():
            loss, _ = training_step(
                parts=parts,
                unet=policy,
                ref_unet=ref,
                batch=batch,
                spec=spec,
                pref=Preference.from_flags(train_cfg),
                seed=cfg.seed,
                device=device,
                autocast=autocast,
            )
            loss.backward()

    def opt():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(cfg.warmup):
        micro()
        opt()
    t_micro, t_opt = [], []
    for _ in range(cfg.iters):
        t_micro.append(_timed(micro, device))
        t_opt.append(_timed(opt, device))
    micro_s, opt_s = statistics.median(t_micro), statistics.median(t_opt)
    model_flops = 2 * cfg.pairs * (flops_train + flops_fwd)  # every row has a reference fwd
    result = {
        "row": row,
        "what": ROWS[row],
        "ms_micro": 1e3 * micro_s,
        "ms_optimizer": 1e3 * opt_s,
        "pairs_per_s": cfg.pairs / (micro_s + opt_s / cfg.grad_accum),
        "peak_gib": _peak_gib(device),
        "unet_tflop_per_micro": model_flops / 1e12,
        "mfu": model_flops / micro_s / (cfg.peak_tflops * 1e12),
        "trainable_params": sum(p.numel() for p in params),
    }
    return result  # the row's models are freed by the next row's _free()


def _autocast_ctx(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


Autocast.ctx = staticmethod(_autocast_ctx)


def measure_lambda(cfg: BenchConfig, device, latent: int, channels: int = 4) -> dict:
    """The safeguard alone on a c-sized prediction: closed form (ours) vs autograd (reference)."""
    from bench.reference_recipe import autograd_lambda
    from sdpo.safeguard import winner_preserving_scale

    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (2 * cfg.pairs, channels, latent, latent)
    pred, target = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    times = {}
    for name, fn in (
        ("closed_form", lambda: winner_preserving_scale(pred, target, 0.9)),
        ("autograd", lambda: autograd_lambda(pred, target, 0.9)),
    ):
        for _ in range(3):
            fn()
        times[name] = 1e3 * statistics.median(_timed(fn, device) for _ in range(20))
    return {"ms_lambda_closed_form": times["closed_form"], "ms_lambda_autograd": times["autograd"]}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _pct(x: float) -> str:
    """A share as a percentage; tiny CPU values keep two significant digits."""
    return f"{100 * x:.1f}%" if x >= 1e-3 else f"{100 * x:.2g}%"


def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def targets(res: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) lines of the issue's targets; verdicts only for GPU runs, and
    only for targets whose rows were measured."""
    rows = {r["row"]: r for r in res["rows"]}
    gpu = res["device_type"] == "cuda"
    lines = []

    def add(name, value, ok):
        lines.append((name, value, ("met" if ok else "NOT met") if gpu else "n/a (CPU/tiny)"))

    a = rows.get("a")
    ours = [r for k, r in rows.items() if k not in ("a", "e", "unet")]
    if a and ours:
        best = max(ours, key=lambda r: r["pairs_per_s"])
        ratio = best["pairs_per_s"] / a["pairs_per_s"]
        add("training pairs/s ≥ 2× reference", f"{ratio:.2f}× (row {best['row']})", ratio >= 2)
    if "unet" in rows:
        mfu = rows["unet"]["mfu"]
        add("MFU on the UNet work ≥ 40%", f"{100 * mfu:.1f}% (row unet)", mfu >= 0.4)
    if "c" in rows:
        lam = res["lambda"]["ms_lambda_closed_form"] / rows["c"]["ms_micro"]
        text = f"λ alone {100 * lam:.2f}% of c's micro-step"
        if "e" in rows:
            text += f"; c vs e {100 * (rows['c']['ms_micro'] / rows['e']['ms_micro'] - 1):+.2f}%"
        add("safeguard overhead ≤ 0.5% of the step", text, lam <= 0.005)
    if a and gpu:
        mine = [k for k in ("b", "c", "c+fast", "c+compile") if k in rows]
        worst = max((rows[k]["peak_gib"] for k in mine), default=0.0)
        add(
            "peak memory ≤ reference's",
            ", ".join(f"{k} {rows[k]['peak_gib']:.1f}" for k in mine)
            + f" vs a {a['peak_gib']:.1f} GiB",
            worst <= a["peak_gib"],
        )
        if "d" in rows:
            share = rows["d"]["peak_gib"] / a["peak_gib"]
            add("LoRA peak memory ≤ 50% of reference's", f"{100 * share:.0f}%", share <= 0.5)
    elif a:
        add("peak memory ≤ reference's (and LoRA ≤ 50%)", "n/a (no CUDA memory counters)", False)
    gen = res.get("generation")
    if gen:
        add("generation ≥ 6× batch-1 images/s", f"{gen['speedup']:.2f}×", gen["speedup"] >= 6)
    return lines


def render(res: dict) -> str:
    cfg = res["config"]
    head = (
        f"## {res['date']} — {res['card']} — {cfg['family']} {cfg['resolution']}², "
        f"{cfg['pairs']} pairs/micro-step{' — TINY CPU MODE (not a claim about targets)' if cfg['tiny'] else ''}\n\n"
        f"torch {res['torch']}, {cfg['mixed_precision']} autocast, gradient checkpointing "
        f"{cfg['gradient_checkpointing']}, median of {cfg['iters']} after {cfg['warmup']} "
        f"warm-up, pairs/s with {cfg['grad_accum']} micro-steps per optimizer step, MFU vs "
        f"{cfg['peak_tflops']} TFLOP/s. UNet forward = {res['unet_gflop_fwd_per_image']:.1f} "
        f"GFLOP/image (FlopCounterMode on a meta-device copy).\n\n"
    )
    table = [
        "| row | what | ms/micro-step | ms/optimizer step | pairs/s | × (a) | peak GiB | UNet MFU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    a = next((r for r in res["rows"] if r["row"] == "a"), None)
    for r in res["rows"]:
        vs_a = "n/a" if a is None else f"{r['pairs_per_s'] / a['pairs_per_s']:.2f}"
        table.append(
            f"| {r['row']} | {r['what']} | {r['ms_micro']:.1f} | {r['ms_optimizer']:.1f} | "
            f"{r['pairs_per_s']:.2f} | {vs_a} | "
            f"{_fmt(r['peak_gib'])} | {_pct(r['mfu'])} |"
        )
    for name in res.get("skipped", []):
        table.append(f"| {name} | {ROWS[name]} | not run ({res['skipped'][name]}) | | | | | |")
    lam = res["lambda"]
    text = head + "\n".join(table) + "\n\n"
    text += (
        f"Safeguard λ alone: closed form {lam['ms_lambda_closed_form']:.3f} ms, autograd "
        f"(reference) {lam['ms_lambda_autograd']:.3f} ms.\n\n"
    )
    gen = res.get("generation")
    if gen:
        text += (
            f"Generation ({gen['images']} prompts, {gen['steps']} Euler steps, CFG, VAE decode "
            f"included): batch 1 {gen['images_per_s_batch1']:.3f} images/s, batch "
            f"{gen['batch']} {gen['images_per_s_batched']:.3f} images/s ({gen['speedup']:.2f}×); "
            f"same images: max pixel difference {gen['max_pixel_diff']}/255, "
            f"{100 * gen['identical_fraction']:.0f}% bit-identical.\n\n"
        )
    text += "| target | measured | verdict |\n|---|---|---|\n"
    text += "".join(f"| {t} | {m} | {v} |\n" for t, m, v in targets(res))
    return text + "\n"


def main(cfg: BenchConfig) -> dict:
    device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.seed)
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "CPU"
    rows = [r.strip() for r in cfg.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; known: {list(ROWS)}")
    skipped = {r: "not in --rows" for r in ROWS if r not in rows}
    if not cfg.compile and "c+compile" in rows:
        skipped["c+compile"] = "pass --compile"
    with tempfile.TemporaryDirectory() as tmp:
        factory = ModelFactory(cfg, device, Path(tmp))
        results = [measure_row(row, cfg, factory, device) for row in rows if row not in skipped]
        latent = factory.latent_size()
        if False in factory._flops:
            fwd = factory._flops[False][0]
        else:
            probe = factory.parts(encoders=False)
            fwd = factory.flops(probe.unet, lora=False)[0]
            del probe
        res = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "card": card,
            "device_type": torch.device(device).type,
            "torch": torch.__version__,
            "config": asdict(cfg),
            "unet_gflop_fwd_per_image": fwd / 1e9,
            "rows": results,
            "skipped": skipped,
            "lambda": measure_lambda(cfg, device, latent),
        }
        if not cfg.skip_generation:
            from bench.bench_generate import bench_generation

            parts = factory.parts(encoders=True)
            res["generation"] = bench_generation(
                parts,
                device=device,
                dtype=factory.weight_dtype,
                resolution=cfg.resolution,
                prompts=[f"prompt number {i}, a scenic view" for i in range(cfg.gen_prompts)],
                batch=cfg.gen_batch,
                steps=cfg.gen_steps,
            )
            del parts
    text = render(res)
    print(text)
    results_path = Path(cfg.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    with results_path.open("a") as fh:
        fh.write(text)
    if cfg.json:
        tmp = Path(cfg.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(res, indent=1))
        os.replace(tmp, cfg.json)
    return res


if __name__ == "__main__":
    main(parse_args())
