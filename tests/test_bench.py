"""The benchmark: its tiny CPU mode runs every row and writes the table (so the script never
rots), and its UNet FLOP counter matches the published measurement."""

import json

import pytest

from bench import bench_train
from bench.flops import unet_flops_per_image
from bench.reference_recipe import autograd_lambda
from sdpo.families import get_family
from sdpo.safeguard import winner_preserving_scale
from sdpo.testing import realsize


def test_tiny_bench_writes_a_table_with_all_rows(tmp_path):
    results, out_json = tmp_path / "RESULTS.md", tmp_path / "bench.json"
    results.write_text("# Benchmark results\n\n")
    cfg = bench_train.parse_args(
        [
            "--tiny",
            "--pairs", "1",
            "--iters", "1",
            "--warmup", "0",
            "--lora_rank", "2",
            "--gen_prompts", "2",
            "--gen_batch", "2",
            "--gen_steps", "1",
            "--results", str(results),
            "--json", str(out_json),
        ]
    )  # fmt: skip
    res = bench_train.main(cfg)
    rows = {r["row"]: r for r in res["rows"]}
    assert set(rows) == set(bench_train.ROWS) - {"c+compile"}  # compile only with --compile
    for r in rows.values():
        assert r["ms_micro"] > 0 and r["pairs_per_s"] > 0 and 0 < r["mfu"] < 1
        assert r["peak_gib"] is None  # no CUDA memory counters on a CPU
    # LoRA trains only its adapters; every other row the whole UNet.
    assert rows["d"]["trainable_params"] < rows["c"]["trainable_params"] / 10
    assert rows["a"]["trainable_params"] == rows["b"]["trainable_params"]
    # The policy fwd+bwd (~3 forwards) + reference fwd (1) per image: ~4 forwards of FLOPs.
    per_image = rows["c"]["unet_tflop_per_micro"] * 1e12 / 2
    assert 3.8 < per_image / (res["unet_gflop_fwd_per_image"] * 1e9) < 4.2
    gen = res["generation"]
    assert gen["images"] == 2 and gen["max_pixel_diff"] <= 2

    text = results.read_text()
    assert text.startswith("# Benchmark results") and "TINY CPU MODE" in text
    for row in bench_train.ROWS:
        assert f"| {row} | {bench_train.ROWS[row].what} |" in text
    assert "generation ≥ 6× batch-1 images/s" in text and "n/a (CPU/tiny)" in text
    assert json.loads(out_json.read_text())["config"]["tiny"] is True


def test_reference_autograd_lambda_equals_our_closed_form():
    import torch

    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        pred = torch.randn(4, 4, 8, 8, generator=gen)
        target = torch.randn(4, 4, 8, 8, generator=gen)
        pred[2:] = pred[:2] * 0.7 + 0.3 * pred[2:]  # aligned residuals: λ < 1
        ours = winner_preserving_scale(pred, target, 0.5)
        torch.testing.assert_close(autograd_lambda(pred, target, 0.5), ours.float())


def test_unet_flops_sd15_at_512():
    unet, sd15 = realsize.build_unet("sd15"), get_family("sd15")
    fwd = unet_flops_per_image(unet, sd15, (4, 64, 64))
    fwd_bwd = unet_flops_per_image(unet, sd15, (4, 64, 64), backward=True)
    # The measurement: ~0.80 TFLOP per image per forward; backward ~ 2x forward.
    assert 0.79e12 < fwd < 0.81e12
    assert 2.9 < fwd_bwd / fwd < 3.1
    # LoRA: no weight gradients of the frozen base, so the backward costs about one forward.
    from sdpo.lora import add_lora

    add_lora(unet, 8)
    lora = unet_flops_per_image(unet, sd15, (4, 64, 64), backward=True)
    assert 1.8 < lora / fwd < 2.3


def test_rows_are_training_config_variants():
    """Each row is train.py's config with the row's flags, resolved as train.py resolves it."""
    from sdpo.perf import ModelSetup

    cfg = bench_train.parse_args(["--lora_rank", "8"])
    setups = {
        r: ModelSetup.from_flags(bench_train.train_config(cfg, row))
        for r, row in bench_train.ROWS.items()
    }
    assert not setups["a"].cached and not setups["b"].cached and setups["c"].cached
    assert setups["c+fast"].channels_last and not setups["c"].channels_last
    assert setups["c+compile"].torch_compile and setups["d"].lora.rank == 8
    assert bench_train.train_config(cfg, bench_train.ROWS["c"]).use_winner_preserving
    assert not bench_train.train_config(cfg, bench_train.ROWS["e"]).use_winner_preserving
    sdxl = bench_train.train_config(
        bench_train.parse_args(["--family", "sdxl"]), bench_train.ROWS["c"]
    )
    assert sdxl.resolution == 1024 and sdxl.optimizer_name == "adafactor"
    assert sdxl.gradient_checkpointing


def test_bad_flags_are_one_usage_error(capsys):
    for argv, flag in ((["--rows", "a,zz"], "--rows"), (["--pairs", "0"], "--pairs")):
        with pytest.raises(SystemExit) as exit_:
            bench_train.parse_args(argv)
        assert exit_.value.code == 2 and flag in capsys.readouterr().err
