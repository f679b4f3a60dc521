"""The benchmark's report: the markdown table of :mod:`bench.bench_train` results and the
issue's targets (met / not met on a GPU; n/a on a CPU), and appending it to RESULTS.md."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from bench.timing import now_utc


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
    if "c" in rows and res.get("lambda"):
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
    tiny = " — TINY CPU MODE (not a claim about targets)" if cfg["tiny"] else ""
    head = (
        f"## {res['date']} — {res['card']} — {cfg['family']} {cfg['resolution']}², "
        f"{cfg['pairs']} pairs/micro-step{tiny}\n\n"
        f"torch {res['torch']}, {cfg['mixed_precision']} autocast, median of {cfg['iters']} after "
        f"{cfg['warmup']} warm-up, pairs/s with {cfg['grad_accum']} micro-steps per optimizer "
        f"step, MFU vs {cfg['peak_tflops']} TFLOP/s. UNet forward = "
        f"{res['unet_gflop_fwd_per_image']:.1f} GFLOP/image (FlopCounterMode on a meta-device "
        "copy).\n\n"
    )
    table = [
        "| row | what | optimizer | ms/micro-step | ms/optimizer step | pairs/s | × (a) | peak GiB "
        "| UNet MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    a = next((r for r in res["rows"] if r["row"] == "a"), None)
    for r in res["rows"]:
        vs_a = "n/a" if a is None else f"{r['pairs_per_s'] / a['pairs_per_s']:.2f}"
        table.append(
            f"| {r['row']} | {r['what']} | {r['optimizer']} | {r['ms_micro']:.1f} | "
            f"{r['ms_optimizer']:.1f} | {r['pairs_per_s']:.2f} | {vs_a} | "
            f"{_fmt(r['peak_gib'])} | {_pct(r['mfu'])} |"
        )
    for name, why in res.get("skipped", {}).items():
        table.append(f"| {name} | {what_of(name)} | | not run ({why}) | | | | | |")
    text = head + "\n".join(table) + "\n\n"
    lam = res.get("lambda")
    if lam:
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


def summary(cfg, card: str, device, **parts) -> dict:
    """The result record :func:`render` reads (``parts``: rows, skipped, lambda, generation,
    unet_gflop_fwd_per_image)."""
    return {
        "date": now_utc(),
        "card": card,
        "device_type": torch.device(device).type,
        "torch": torch.__version__,
        "config": asdict(cfg),
        **parts,
    }


def append_results(path: str | Path, text: str) -> None:
    from sdpo import io

    path = Path(path)
    old = path.read_text() if path.is_file() else ""
    io.write_text(path, old + text)


def what_of(row: str) -> str:
    from bench.bench_train import ROWS

    return ROWS[row].what
