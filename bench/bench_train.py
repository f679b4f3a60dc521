"""Training-step and generation benchmark on real-size random-weight models (one GPU, one run).

    python -m bench.bench_train                       # SD1.5 512², 8 pairs/step, peak 790
    python -m bench.bench_train --family sdxl --pairs 2
    python -m bench.bench_train --tiny                # tiny models on CPU, seconds (tests)

Every row is a VARIANT OF THE TRAINING CONFIG (:class:`sdpo.config.TrainConfig` with the launch
recipe's method settings plus the row's flags, resolved as ``train.py`` resolves them) and goes
through the code training runs: :func:`sdpo.perf.setup_models` (:class:`sdpo.perf.ModelSetup`
from the flags), :func:`sdpo.step.build_optimizer`, :class:`sdpo.step.Preference` and
:func:`sdpo.step.training_step`; models, conditioning and the denoiser call come from the model
family (:mod:`sdpo.families`). Rows (safeguard on, as the launch recipes, unless said otherwise):

a. reference recipe, emulated in ``bench/reference_recipe.py``: VAE + text encoder every step, a
   full frozen reference UNet, λ by autograd, the optimizer's defaults (foreach AdamW);
b. our default step (default flags);
c. ``--precomputed_dir``: batches of cached VAE posteriors and text embeddings;
   ``c+fast``: plus ``--use_fused_adam --channels_last``; ``c+compile``: plus ``--torch_compile``;
d. ``--lora_rank`` (reference = adapters disabled) on cached inputs;
e. c with the safeguard off: the safeguard's overhead is the c / e time ratio, and, more
   precisely, the closed-form λ timed alone against the c micro-step;
unet: the denoiser work alone (policy forward + backward, reference forward) with the c+fast setup.

Timing: ``--warmup`` iterations excluded, then ``--iters`` iterations, each timed between
``torch.cuda.synchronize()`` calls; the MEDIAN is reported. A micro-step (data prep, forwards,
backward) and an optimizer step (step + zero_grad) are timed separately, and
pairs/s = pairs / (t_micro + t_optimizer / --grad_accum) (the paper's recipe accumulates 32).
Peak memory: ``torch.cuda.max_memory_allocated`` over the row (weights, optimizer state,
activations), counters reset between rows after freeing the previous row's models.

MFU: the denoiser FLOPs of one forward and one forward + backward per image are counted once with
``torch.utils.flop_counter.FlopCounterMode`` on a meta-device copy (:func:`bench.flops.
unet_flops_per_image`: matmuls, convolutions, attention, 2 FLOPs per MAC). Per micro-step the
model FLOPs are 2B·(F_fwd+bwd + F_fwd) (policy + reference); VAE / text encoders and
gradient-checkpointing recomputation are not counted. MFU = FLOPs / time / ``--peak_tflops``
(default 790: the bf16 peak the team's earlier H100 measurements were expressed against; 989 is
the H100 SXM spec-sheet dense bf16 number).

The table is printed, appended with card, date and configuration to ``--results``
(bench/RESULTS.md) and written as JSON to ``--json`` when given.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # python bench/bench_train.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.report import append_results, render, summary
from bench.timing import (
    Autocast,
    autocast_ctx,
    cpu_threads,
    default_device,
    is_cuda,
    peak_gib,
    prepare_device,
    timed,
)
from bench.timing import free as free_memory
from sdpo.cli import arg, parse

REPO = Path(__file__).resolve().parents[1]
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def _family_names() -> list[str]:
    from sdpo.families import FAMILIES

    return list(FAMILIES)


@dataclass(frozen=True)
class Row:
    """One benchmark row: the training flags it changes, and what its micro-step runs
    (``"reference"``: the emulated reference recipe, ``"ours"``: :func:`sdpo.step.training_step`,
    ``"unet"``: the denoiser calls alone)."""

    what: str
    flags: dict = field(default_factory=dict)
    step: str = "ours"


_CACHED = {"precomputed_dir": "<bench: synthetic cached batches>"}
_FAST = {**_CACHED, "use_fused_adam": True, "channels_last": True}
# "lora_rank": True stands for the bench's --lora_rank (see train_config).
ROWS: dict[str, Row] = {
    "a": Row(
        "reference recipe (emulated): VAE+text enc. every step, 2nd UNet, autograd λ, AdamW",
        step="reference",
    ),
    "b": Row("ours, default flags: sdpo.step (VAE+text enc. every step, 2nd UNet, closed-form λ)"),
    "c": Row("ours + --precomputed_dir (cached VAE posterior + text embeddings)", _CACHED),
    "c+fast": Row("c + --use_fused_adam + --channels_last", _FAST),
    "c+compile": Row("c+fast + --torch_compile", {**_FAST, "torch_compile": True}),
    "d": Row("LoRA (c+fast, reference = adapters disabled, no 2nd UNet)", {**_FAST, "lora_rank": True}),
    "e": Row("c with the safeguard OFF (overhead = c / e)", {**_CACHED, "use_winner_preserving": False}),
    "unet": Row("UNet work only: policy fwd+bwd + reference fwd (c+fast options)", _FAST, "unet"),
}  # fmt: skip


@dataclass
class BenchConfig:
    """Options of ``python -m bench.bench_train`` (see ``--help``)."""

    family: str = arg("sd15", "model family (sdpo.families registry)", choices_from=_family_names)
    resolution: int | None = arg(None, "image side (default: the family's; --tiny: 32)")
    pairs: int = arg(8, "preference pairs per micro-step (2 images each)")
    iters: int = arg(10, "timed iterations per row (median reported)")
    warmup: int = arg(3, "untimed iterations before timing")
    grad_accum: int = arg(32, "micro-steps per optimizer step in the pairs/s formula")
    peak_tflops: float = arg(
        790.0, "peak TFLOP/s for MFU (790 as in issue 6's measurements; 989 = H100 SXM spec sheet)"
    )
    mixed_precision: str = arg(
        "bf16", "autocast dtype; frozen models stored in it", choices=list(WEIGHT_DTYPES)
    )
    gradient_checkpointing: bool = arg(
        False, "recompute UNet activations (forced for SDXL, as train.py does with --sdxl)"
    )
    lora_rank: int = arg(64, "LoRA rank of row d")
    compile: bool = arg(False, "also measure torch.compile (row c+compile; compile time excluded)")
    gen_prompts: int = arg(16, "prompts generated at batch 1 and batched")
    gen_batch: int = arg(16, "batch size of the batched generation")
    gen_steps: int = arg(50, "Euler steps per image (reference: 50)")
    skip_generation: bool = arg(False, "training rows only")
    tiny: bool = arg(False, "tiny sdpo.testing.tiny models on CPU (seconds; for tests); fp32")
    rows: str = arg(",".join(ROWS), "comma-separated rows to measure (a and c for the ratios)")
    device: str | None = arg(None, "default: cuda if available, else cpu")
    results: str = arg(str(REPO / "bench" / "RESULTS.md"), "markdown file the table is appended to")
    json: str | None = arg(None, "also write the results as JSON here")
    seed: int = arg(0, "seed of the random weights and inputs")

    def row_names(self) -> list[str]:
        return [r.strip() for r in self.rows.split(",") if r.strip()]


def check(cfg: BenchConfig) -> BenchConfig:
    """Resolve the defaults that depend on other flags; one ``ValueError`` naming a bad flag."""
    from sdpo.families import get_family

    if cfg.tiny:
        cfg.resolution = cfg.resolution or 32
        cfg.mixed_precision = "no"  # CPU autocast in bf16 is slow and not what a GPU runs
    cfg.resolution = cfg.resolution or get_family(cfg.family).default_resolution
    for name in ("pairs", "iters", "grad_accum", "gen_prompts", "gen_batch", "gen_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {cfg.warmup}")
    if cfg.lora_rank < 1:
        raise ValueError(f"--lora_rank must be >= 1, got {cfg.lora_rank}")
    unknown = [r for r in cfg.row_names() if r not in ROWS]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {unknown}; known: {list(ROWS)}")
    return cfg


def parse_args(argv=None) -> BenchConfig:
    return parse(
        BenchConfig,
        argv,
        prog="python -m bench.bench_train",
        description=__doc__.split("\n\n")[0],
        check=check,
    )


def train_config(cfg: BenchConfig, row: Row):
    """The row's :class:`sdpo.config.TrainConfig`: the launch recipe's method settings
    (Diffusion-DPO, β 5000, safeguard μ 0.9) plus the row's flags, resolved like ``train.py``
    (a family with an official flag, SDXL, gets the reference's gradient checkpointing and
    Adafactor)."""
    from sdpo.config import TrainConfig, resolve, resolve_for_family
    from sdpo.families import get_family

    family = get_family(cfg.family)
    flags = dict(row.flags)
    if flags.get("lora_rank") is True:
        flags["lora_rank"] = cfg.lora_rank
    recipe = dict(
        pretrained_model_name_or_path="bench",
        train_method="diffusion-dpo",
        beta_dpo=5000.0,
        use_winner_preserving=True,
        winner_preserving_mu=0.9,
        mixed_precision=cfg.mixed_precision,
        resolution=cfg.resolution,
        gradient_checkpointing=cfg.gradient_checkpointing,
        train_batch_size=cfg.pairs,
        gradient_accumulation_steps=cfg.grad_accum,
        seed=cfg.seed,
    )
    if family.flag:
        recipe[family.flag] = True
    tc = TrainConfig(**{**recipe, **flags})
    return resolve_for_family(resolve(tc), family)


# ---------------------------------------------------------------------------------------------
# Models, inputs, rows
# ---------------------------------------------------------------------------------------------


def tiny_builder(family_name: str):
    """``sdpo.testing.tiny.build_tiny_<family>`` (the tiny pipeline folder of a family), or None."""
    import sdpo.testing.tiny as tiny

    return getattr(tiny, f"build_tiny_{family_name}", None)


def has_realsize(family_name: str) -> bool:
    """Whether :mod:`sdpo.testing.configs` has real-size configs for the family."""
    from sdpo.testing import configs

    return family_name in configs.FAMILIES


class Bench:
    """Fresh models for each row (identical weights every time: seeded), the row's inputs, and
    its timing. ``tiny``: the family's tiny pipeline folder loaded through ``load_parts``; else
    real-size random-weight modules from :mod:`sdpo.testing.realsize`."""

    def __init__(self, cfg: BenchConfig, device, workdir: Path):
        from sdpo.families import get_family

        self.cfg, self.device, self.workdir = cfg, device, Path(workdir)
        self.family = get_family(cfg.family)
        self.weight_dtype = WEIGHT_DTYPES[cfg.mixed_precision]
        self._flops: dict[bool, tuple[int, int]] = {}
        self.tiny_path = None
        if cfg.tiny:
            build = tiny_builder(cfg.family)
            if build is None:
                raise ValueError(f"--tiny: no sdpo.testing.tiny.build_tiny_{cfg.family}")
            self.tiny_path = build(self.workdir / f"tiny_{cfg.family}", seed=cfg.seed)

    # --- models --------------------------------------------------------------------------------
    def parts(self, *, cached: bool):
        """The family's ModelParts, all in float32. ``cached``: the VAE / text encoders are not
        needed (cached batches), so real-size ones stay shape-only on the meta device."""
        cfg = self.cfg
        if self.tiny_path is not None:
            from sdpo.families import ModelSource

            return self.family.load_parts(
                ModelSource(str(self.tiny_path)), resolution=cfg.resolution
            )
        from sdpo.testing import realsize

        parts = realsize.build_model_parts(
            self.family.name, self.workdir / "tokenizers", device="meta", resolution=cfg.resolution
        )
        parts.unet = self._materialise(parts.unet, cfg.seed)
        if not cached:
            parts.vae = self._materialise(parts.vae, cfg.seed + 1)
            parts.text_encoders = [
                self._materialise(enc, cfg.seed + 2 + i)
                for i, enc in enumerate(parts.text_encoders)
            ]
        return parts

    def _materialise(self, module, seed: int):
        from sdpo.testing.realsize import random_init_

        return random_init_(module.to_empty(device=self.device), seed)

    def latent_shape(self, parts) -> tuple[int, int, int]:
        """``(channels, h, w)`` of the VAE latents (diffusers' scale factor: 2^(blocks-1))."""
        vae_cfg = parts.vae.config
        side = self.cfg.resolution // 2 ** (len(vae_cfg.block_out_channels) - 1)
        return int(vae_cfg.latent_channels), side, side

    def flops(self, parts, *, lora: bool) -> tuple[int, int]:
        """(forward, forward + backward) denoiser FLOPs per image, counted once per kind."""
        from bench.flops import unet_flops_per_image

        if lora not in self._flops:
            shape = self.latent_shape(parts)
            self._flops[lora] = (
                unet_flops_per_image(parts.unet, self.family, shape),
                unet_flops_per_image(parts.unet, self.family, shape, backward=True),
            )
        return self._flops[lora]

    def unet_gflop_fwd(self) -> float:
        if False not in self._flops:
            self.flops(self.parts(cached=True), lora=False)
        return self._flops[False][0] / 1e9

    def inputs(self, parts) -> dict:
        """Synthetic inputs: pixels + captions (uncached rows) and the cached equivalents (VAE
        posterior moments, the family's conditioning)."""
        cfg, device = self.cfg, self.device
        gen = torch.Generator().manual_seed(cfg.seed)
        b, res = cfg.pairs, cfg.resolution
        channels, h, w = self.latent_shape(parts)
        captions = [f"a photo of object {i} on a table, detailed, high quality" for i in range(b)]
        pixels = (torch.rand(2 * b, 3, res, res, generator=gen) * 2 - 1).to(device)
        moments = torch.randn(2 * b, 2 * channels, h, w, generator=gen)
        moments[:, channels:] = -6.0  # log-variance of a sharp posterior
        torch.manual_seed(cfg.seed)
        cond = self.family.dummy_cond(dict(parts.unet.config), b, device)
        meta = {"index": torch.arange(b), "epoch": torch.zeros(b, dtype=torch.long), "corrupt": 0}
        return {
            "pixels": pixels,
            "captions": captions,
            "batch": {"pixel_values": pixels, "captions": captions, **meta},
            "cached_batch": {
                "latent_moments": moments.to(device, self.weight_dtype),
                "cond": cond,
                "captions": captions,
                **meta,
            },
        }

    # --- one row -------------------------------------------------------------------------------
    def measure(self, name: str) -> dict:
        """Build the row's models through training's setup, warm up, time micro-steps and
        optimizer steps, count FLOPs."""
        from sdpo.losses import LOSSES
        from sdpo.perf import ModelSetup, setup_models
        from sdpo.step import Preference, build_optimizer, training_step

        cfg, device, wdtype = self.cfg, self.device, self.weight_dtype
        row = ROWS[name]
        tc = train_config(cfg, row)
        setup, pref, spec = (
            ModelSetup.from_flags(tc),
            Preference.from_flags(tc),
            LOSSES[tc.train_method],
        )
        free_memory(device)
        parts = self.parts(cached=setup.cached)
        unet, ref, params = setup_models(
            parts, setup, needs_reference=spec.needs_reference, device=device, weight_dtype=wdtype
        )
        # validate() refuses --use_fused_adam without CUDA or with another optimizer.
        fused = tc.use_fused_adam and is_cuda(device) and tc.optimizer_name == "adamw"
        optimizer = build_optimizer(
            params,
            name=tc.optimizer_name,
            lr=tc.learning_rate,
            betas=(tc.adam_beta1, tc.adam_beta2),
            weight_decay=tc.adam_weight_decay,
            eps=tc.adam_epsilon,
            fused=fused,
        )
        flops_fwd, flops_train = self.flops(parts, lora=setup.lora is not None)
        policy = Autocast(unet, device, wdtype)
        inputs = self.inputs(parts)

        def autocast():
            return autocast_ctx(device, wdtype)

        if row.step == "reference":
            from bench.reference_recipe import reference_step

            def micro():
                with autocast():
                    loss = reference_step(
                        parts=parts,
                        unet=policy,
                        ref_unet=ref,
                        pixels=inputs["pixels"],
                        captions=inputs["captions"],
                        beta=pref.beta,
                        mu=pref.mu,
                        use_safeguard=pref.safeguard,
                    )
                loss.backward()

        elif row.step == "unet":
            family, b = self.family, cfg.pairs
            gens = [torch.Generator(device=device).manual_seed(cfg.seed + i) for i in range(b)]
            noise, timesteps = parts.objective.draw(gens, (b, *self.latent_shape(parts)), device)
            noisy, timesteps = noise.repeat(2, 1, 1, 1), timesteps.repeat(2)
            cond = family.dummy_cond(dict(parts.unet.config), 2 * b, device)

            def micro():
                pred = family.predict(policy, noisy, timesteps, cond)
                with torch.no_grad(), autocast():
                    family.predict(ref, noisy, timesteps, cond)
                pred.float().square().mean().backward()

        else:
            batch = inputs["cached_batch"] if setup.cached else inputs["batch"]

            def micro():
                loss, _ = training_step(
                    parts=parts,
                    unet=policy,
                    ref_unet=ref,
                    batch=batch,
                    spec=spec,
                    pref=pref,
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
            t_micro.append(timed(micro, device))
            t_opt.append(timed(opt, device))
        micro_s, opt_s = statistics.median(t_micro), statistics.median(t_opt)
        model_flops = 2 * cfg.pairs * (flops_train + flops_fwd)  # every row has a reference fwd
        return {
            "row": name,
            "what": row.what,
            "family": self.family.name,
            "flags": {k: v for k, v in row.flags.items() if k != "precomputed_dir"}
            | {"precomputed": setup.cached},
            "optimizer": tc.optimizer_name + (" (fused)" if fused else ""),
            "gradient_checkpointing": setup.gradient_checkpointing,
            "ms_micro": 1e3 * micro_s,
            "ms_optimizer": 1e3 * opt_s,
            "pairs_per_s": cfg.pairs / (micro_s + opt_s / cfg.grad_accum),
            "peak_gib": peak_gib(device),
            "unet_tflop_per_micro": model_flops / 1e12,
            "mfu": model_flops / micro_s / (cfg.peak_tflops * 1e12),
            "trainable_params": sum(p.numel() for p in params),
        }  # the row's models are freed by the next row's free_memory()

    def lambda_timing(self) -> dict:
        """The safeguard alone on a c-sized prediction: closed form (ours) vs autograd."""
        from bench.reference_recipe import autograd_lambda
        from sdpo.safeguard import winner_preserving_scale

        gen = torch.Generator().manual_seed(self.cfg.seed)
        parts = self.parts(cached=True)
        shape = (2 * self.cfg.pairs, *self.latent_shape(parts))
        del parts
        pred, target = (torch.randn(shape, generator=gen).to(self.device) for _ in range(2))
        times = {}
        for name, fn in (
            ("closed_form", lambda: winner_preserving_scale(pred, target, 0.9)),
            ("autograd", lambda: autograd_lambda(pred, target, 0.9)),
        ):
            for _ in range(3):
                fn()
            times[name] = 1e3 * statistics.median(timed(fn, self.device) for _ in range(20))
        return {
            "ms_lambda_closed_form": times["closed_form"],
            "ms_lambda_autograd": times["autograd"],
        }

    def generation(self) -> dict:
        """Images/s at batch 1 vs ``--gen_batch`` through the evaluation's generation code."""
        from bench.bench_generate import bench_generation

        cfg = self.cfg
        free_memory(self.device)
        parts = self.parts(cached=False)
        return bench_generation(
            parts,
            device=self.device,
            dtype=self.weight_dtype,
            resolution=cfg.resolution,
            prompts=[f"prompt number {i}, a scenic view" for i in range(cfg.gen_prompts)],
            batch=cfg.gen_batch,
            steps=cfg.gen_steps,
        )


def main(cfg: BenchConfig) -> dict:
    from sdpo import io

    device = default_device(cfg.device)
    torch.manual_seed(cfg.seed)
    card = prepare_device(device)
    rows = cfg.row_names()
    skipped = {r: "not in --rows" for r in ROWS if r not in rows}
    if not cfg.compile and "c+compile" in rows:
        skipped["c+compile"] = "pass --compile"
    threads = 1 if cfg.tiny and not is_cuda(device) else None
    with tempfile.TemporaryDirectory() as tmp, cpu_threads(threads):
        bench = Bench(cfg, device, Path(tmp))
        results = [bench.measure(row) for row in rows if row not in skipped]
        res = summary(
            cfg,
            card,
            device,
            unet_gflop_fwd_per_image=bench.unet_gflop_fwd(),
            rows=results,
            skipped=skipped,
            **{"lambda": bench.lambda_timing()},
        )
        if not cfg.skip_generation:
            res["generation"] = bench.generation()
    text = render(res)
    print(text)
    append_results(cfg.results, text)
    if cfg.json:
        io.write_json(cfg.json, res)
    return res


if __name__ == "__main__":
    main(parse_args())
