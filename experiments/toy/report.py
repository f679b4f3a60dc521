"""The toy's results: per-seed curves aggregated over seeds, the final table, the PNG plots and
``summary.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from experiments.toy.config import ToyConfig
from sdpo import io

HELDOUT_KEYS = ("winner_diff", "loser_diff", "margin", "implicit_acc", "winner_err", "loser_err",
                "heldout_lambda")  # fmt: skip


def _band(series: list[list[float]]) -> dict[str, list[float]]:
    a = np.asarray(series, dtype=np.float64)  # [seeds, points]
    return {
        "mean": a.mean(0).tolist(),
        "std": a.std(0).tolist(),
        "min": a.min(0).tolist(),
        "max": a.max(0).tolist(),
    }


def aggregate(runs: list[dict]) -> dict:
    """Mean / std / min / max over seeds of every curve, per method and safeguard setting."""
    out: dict = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        out[method] = {}
        for safeguard in (False, True):
            group = [r for r in runs if r["method"] == method and r["safeguard"] == safeguard]
            if not group:
                continue
            agg = {"seeds": [r["seed"] for r in group], "step": group[0]["heldout"]["step"]}
            for key in HELDOUT_KEYS:
                agg[key] = _band([r["heldout"][key] for r in group])
            agg["train_step"] = group[0]["train"]["step"]
            for key in ("loss", "loser_scale", "margin", "implicit_acc"):
                agg[f"train_{key}"] = _band([r["train"][key] for r in group])
            out[method]["on" if safeguard else "off"] = agg
    return out


def final_table(runs: list[dict]) -> list[dict]:
    """One row per (method, safeguard): final held-out values over seeds, and seed counts."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in runs):
        for safeguard in (False, True):
            group = [r for r in runs if r["method"] == method and r["safeguard"] == safeguard]
            if not group:
                continue
            last = {k: np.array([r["heldout"][k][-1] for r in group]) for k in HELDOUT_KEYS}
            lam = np.array([np.mean(r["train"]["loser_scale"]) for r in group])
            # Training-batch margin u and accuracy as train.py logs them, last 10 steps.
            train_u = np.array([np.mean(r["train"]["margin"][-10:]) for r in group])
            train_acc = np.array([np.mean(r["train"]["implicit_acc"][-10:]) for r in group])
            rows.append(
                {
                    "method": method,
                    "safeguard": safeguard,
                    "beta": group[0]["beta"],
                    "mu": group[0]["mu"] if safeguard else None,
                    "seeds": len(group),
                    "step": group[0]["heldout"]["step"][-1],
                    **{f"{k}_mean": float(v.mean()) for k, v in last.items()},
                    **{f"{k}_std": float(v.std()) for k, v in last.items()},
                    "seeds_winner_up": int((last["winner_diff"] > 0).sum()),
                    "seeds_loser_up": int((last["loser_diff"] > 0).sum()),
                    "seeds_margin_up": int((last["margin"] > 0).sum()),
                    "train_lambda_mean": float(lam.mean()),
                    "train_u_last10": float(train_u.mean()),
                    "train_acc_last10": float(train_acc.mean()),
                }
            )
    return rows


def plot_curves(agg: dict, outdir: Path) -> list[Path]:
    """``errors.png`` (winner / loser error minus reference vs step) and ``margin.png``
    (held-out margin, implicit accuracy, training λ): one column per method, safeguard off (red)
    vs on (blue), mean line and min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"off": ("tab:red", "safeguard off"), "on": ("tab:blue", "safeguard on")}
    figures = {
        "errors.png": [
            ("winner_diff", "step", "winner error − reference (×1e-3)", 1e3),
            ("loser_diff", "step", "loser error − reference (×1e-3)", 1e3),
        ],
        "margin.png": [
            ("margin", "step", "held-out margin: Δloser − Δwinner (×1e-3)", 1e3),
            ("implicit_acc", "step", "held-out implicit accuracy", 1.0),
            ("train_loser_scale", "train_step", "λ (training batches)", 1.0),
        ],
    }
    methods = list(agg)
    written = []
    for name, panels in figures.items():
        fig, axes = plt.subplots(
            len(panels), len(methods), figsize=(4.2 * len(methods), 3.0 * len(panels)),
            squeeze=False, sharex=True,
        )  # fmt: skip
        for col, method in enumerate(methods):
            for row, (key, xkey, label, scale) in enumerate(panels):
                ax = axes[row][col]
                for setting, (colour, legend) in colours.items():
                    if setting not in agg[method]:
                        continue
                    a = agg[method][setting]
                    x = np.asarray(a[xkey])
                    band = a[key]
                    if key == "implicit_acc":  # step 0: u = 0 exactly, so "u > 0" is 0 by rule
                        x, band = x[1:], {k: v[1:] for k, v in band.items()}
                    ax.plot(x, np.asarray(band["mean"]) * scale, color=colour, label=legend)
                    ax.fill_between(
                        x, np.asarray(band["min"]) * scale, np.asarray(band["max"]) * scale,
                        color=colour, alpha=0.2, linewidth=0,
                    )  # fmt: skip
                if key in ("winner_diff", "loser_diff", "margin"):
                    ax.axhline(0.0, color="black", linewidth=0.8, linestyle="--")
                if key == "implicit_acc":
                    ax.axhline(0.5, color="black", linewidth=0.8, linestyle="--")
                ax.set_ylabel(label, fontsize=9)
                ax.grid(alpha=0.3)
                if row == 0:
                    ax.set_title(method)
                if row == len(panels) - 1:
                    ax.set_xlabel("training step")
        axes[0][0].legend(fontsize=8, loc="best")
        seeds = len(next(iter(agg[methods[0]].values()))["seeds"])
        fig.suptitle(
            f"Toy task, held-out pairs at fixed noise/timesteps: mean and min–max over {seeds} seeds",
            fontsize=10,
        )
        fig.tight_layout()
        path = io.atomic_write(outdir / name, lambda tmp, f=fig: f.savefig(tmp, dpi=90, format="png"))
        plt.close(fig)
        written.append(path)
    return written


def _fmt(mean: float, std: float, scale: float = 1e3, digits: int = 1) -> str:
    return f"{mean * scale:+.{digits}f} ± {std * scale:.{digits}f}"


def _model_kind(cfg) -> str:
    if getattr(cfg, "flow", False):
        return (
            "Tiny SD3-style flow-matching transformer (velocity target ε − x0, logit-normal σ; "
            "errors are velocity errors)"
        )
    return "Tiny SD1.5-style model"


def write_summary(
    cfg: ToyConfig, table: list[dict], ref: dict, outdir: Path, seconds: float
) -> Path:
    """``summary.md``: settings, the table of final values, and what was observed (numbers)."""
    lines = [
        "# Toy reproduction: Diffusion-DPO / DSPO / DMPO with and without the SDPO safeguard",
        "",
        f"Task: {cfg.train_pairs} training and {cfg.heldout_pairs} held-out pairs of "
        f"{cfg.image_size}-px coloured shapes; loser = the winner's picture made worse "
        f"({', '.join(cfg.loser_kinds)}). {_model_kind(cfg)}, SFT start "
        f"({cfg.sft_steps} steps, lr {cfg.sft_lr:g}), then {cfg.steps} preference steps of "
        f"{cfg.batch_pairs} pairs, lr {cfg.lr:g}, {cfg.seeds} seeds, all through `train.py`. "
        f"Held-out: {cfg.eval_draws} fixed (noise, timestep) draws per pair. Reference (SFT) "
        f"held-out errors: winner {ref['winner_err']:.4f}, loser {ref['loser_err']:.4f}. "
        f"Wall time {seconds:.0f} s.",
        "",
        f"Final values at step {table[0]['step']} (policy − reference, ×1e-3, mean ± std over "
        "seeds; margin = Δloser − Δwinner, so u = β/2 · margin):",
        "",
        "| method | β | safeguard (μ) | Δ winner error | Δ loser error | margin | implicit acc "
        "| λ (train mean) | seeds winner↑ / margin↑ | train u / acc (last 10 steps) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        sg = f"on ({r['mu']:g})" if r["safeguard"] else "off"
        lines.append(
            f"| {r['method']} | {r['beta']:g} | {sg} "
            f"| {_fmt(r['winner_diff_mean'], r['winner_diff_std'])} "
            f"| {_fmt(r['loser_diff_mean'], r['loser_diff_std'])} "
            f"| {_fmt(r['margin_mean'], r['margin_std'], digits=2)} "
            f"| {r['implicit_acc_mean']:.2f} | {r['train_lambda_mean']:.2f} "
            f"| {r['seeds_winner_up']}/{r['seeds']} / {r['seeds_margin_up']}/{r['seeds']} "
            f"| {r['train_u_last10']:+.2f} / {r['train_acc_last10']:.2f} |"
        )
    lines += ["", "## Observed", ""]
    for method in dict.fromkeys(r["method"] for r in table):
        pair = {r["safeguard"]: r for r in table if r["method"] == method}
        if False not in pair or True not in pair:
            continue
        off, on = pair[False], pair[True]
        lines.append(
            f"- **{method}** (β {off['beta']:g}): without the safeguard the winner's error "
            f"{'rose' if off['winner_diff_mean'] > 0 else 'fell'} by "
            f"{off['winner_diff_mean'] * 1e3:+.1f}e-3 (up in {off['seeds_winner_up']}/"
            f"{off['seeds']} seeds) and the loser's by {off['loser_diff_mean'] * 1e3:+.1f}e-3, "
            f"margin {off['margin_mean'] * 1e3:+.2f}e-3 (accuracy {off['implicit_acc_mean']:.2f}); "
            f"with it (μ {on['mu']:g}, mean λ {on['train_lambda_mean']:.2f}) the winner's error "
            f"changed by {on['winner_diff_mean'] * 1e3:+.1f}e-3 (up in {on['seeds_winner_up']}/"
            f"{on['seeds']} seeds), the loser's by {on['loser_diff_mean'] * 1e3:+.1f}e-3, margin "
            f"{on['margin_mean'] * 1e3:+.2f}e-3 (accuracy {on['implicit_acc_mean']:.2f})."
        )
    lines += [
        "",
        "Plots: `errors.png` (winner / loser error minus reference), `margin.png` (held-out "
        "margin, implicit accuracy, λ). All curves: `curves.json`.",
        "",
    ]
    return io.write_text(outdir / "summary.md", "\n".join(lines))
