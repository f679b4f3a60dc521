"""``python -m experiments.toy``: the whole toy demo (see :mod:`experiments.toy`)."""

from __future__ import annotations

from pathlib import Path

from experiments.toy.config import DMPO_ALPHA, ToyConfig, parse_args
from experiments.toy.report import aggregate, final_table, plot_curves, write_summary
from experiments.toy.runs import (
    build_heldout,
    heldout_metrics,
    make_jobs,
    prepare,
    run_jobs,
    run_name,
)
from sdpo import io


def main(cfg: ToyConfig) -> dict:
    """Run the whole demo; returns the curves dict also written to ``outdir/curves.json``."""
    import os
    import time

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # workers inherit it: no progress-bar spam
    start = time.time()
    outdir = Path(cfg.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    # One thread: with 2 threads on a busy 2-core machine, torch's thread pool can slow 10x.
    torch.set_num_threads(1)
    print(f"[toy] data, model and SFT start in {outdir}", flush=True)
    paths = prepare(cfg)
    heldout = build_heldout(cfg, paths)
    jobs = make_jobs(cfg, paths, heldout)
    print(f"[toy] {len(jobs)} preference runs on {cfg.workers} worker(s) "
          f"({time.time() - start:.0f} s so far)", flush=True)  # fmt: skip
    runs = run_jobs(jobs, cfg.workers)
    ref_pred = torch.load(heldout, weights_only=False)
    start_metrics = heldout_metrics(
        ref_pred["ref_pred"], ref_pred["ref_pred"], ref_pred["target"], mu=0.0
    )
    agg = aggregate(runs)
    table = final_table(runs)
    seconds = time.time() - start
    curves = {
        "settings": {
            k: getattr(cfg, k) for k in ("seeds", "steps", "lr", "batch_pairs", "eval_every",
                                         "sft_steps", "sft_lr", "train_pairs", "heldout_pairs",
                                         "eval_draws", "image_size", "loser_kinds", "methods",
                                         "flow")
        } | {"beta": cfg.betas, "mu": cfg.mus, "dmpo_alpha": DMPO_ALPHA},
        "reference": {"winner_err": start_metrics["winner_err"],
                      "loser_err": start_metrics["loser_err"]},
        "runs": {run_name(r["method"], r["safeguard"], r["seed"]): r for r in runs},
        "aggregate": agg,
        "final": table,
        "seconds": seconds,
    }  # fmt: skip
    io.write_json(outdir / "curves.json", curves)
    plot_curves(agg, outdir)
    summary = write_summary(cfg, table, curves["reference"], outdir, seconds)
    print(summary.read_text(), flush=True)
    print(f"[toy] done in {time.time() - start:.0f} s: {outdir}/summary.md, curves.json, "
          "errors.png, margin.png", flush=True)  # fmt: skip
    return curves


if __name__ == "__main__":
    main(parse_args())
