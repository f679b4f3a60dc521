"""The precompute cache: contents equal the uncached data path (same rows, flips, caption dropout,
corrupt-row skips), mismatched / incomplete caches are refused, an interrupted precompute
resumes, and (through the training step) cached and uncached runs give the same losses."""

import json
from types import SimpleNamespace

import pytest
import torch

from sdpo import cache
from sdpo.data import Augment, DataSource
from sdpo.data.cached import (
    MANIFEST,
    CachedPairs,
    cache_identity,
    check_cache,
    collate_cached,
    shard_name,
)
from sdpo.data.pairs import PreferencePairs, collate_pairs
from sdpo.data.pickapic import prepare_pairs
from sdpo.families import ModelSource, get_family
from sdpo.io import TMP_MARK
from sdpo.testing.data import write_synthetic_pickapic
from sdpo.testing.tiny import build_tiny_sd15 as tiny_sd15
from tests.train_fixtures import load_tiny_parts

SD15 = get_family("sd15")


def _both(ds, cache_dir, *, seed, paired, proportion_empty_prompts):
    """The image and the cached dataset of the same rows, with one Augment."""
    aug = Augment(resolution=32, seed=seed, proportion_empty_prompts=proportion_empty_prompts)
    return PreferencePairs(ds, aug, paired=paired), CachedPairs(cache_dir, aug, paired=paired)


STATE = SimpleNamespace(
    process_index=0,
    num_processes=1,
    is_main_process=True,
    device="cpu",
    wait_for_everyone=lambda: None,
)


def cache_args(model, data, out, *extra):
    return [
        "--pretrained_model_name_or_path", str(model),
        "--train_data_dir", str(data),
        "--output_dir", str(out),
        "--resolution", "32",
        "--mixed_precision", "no",
        "--batch_size", "2",
        "--shard_size", "3",
        "--dataloader_num_workers", "0",
        *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    model = tiny_sd15(root / "sd15")
    data = root / "data"
    # 6 pairs, 1 tie (dropped), 1 corrupt row (kept as a pair, marked invalid, skipped).
    write_synthetic_pickapic(data, n_pairs=6, ties=1, corrupt_rows=1, size=40)
    out = root / "cache"
    manifest = cache.precompute(cache.parse_args(cache_args(model, data, out)), STATE)
    return SimpleNamespace(model=model, data=data, out=out, manifest=manifest, root=root)


def test_manifest_and_shards(setup):
    m = json.loads((setup.out / MANIFEST).read_text())
    assert m["complete"] and m == {**setup.manifest, "complete": True}
    assert m["pairs"] == 7 and m["ties_dropped"] == 1 and m["num_shards"] == 3
    assert m["moments_shape"] == [8, 16, 16] and m["resolution"] == 32
    assert m["model"] == str(setup.model.resolve()) and m["mixed_precision"] == "no"
    from safetensors.torch import load_file

    valid = torch.cat([load_file(setup.out / shard_name(k))["valid"] for k in range(3)])
    # Row 6: label 0, so jpg_1 (fine) is the winner and the truncated jpg_0 the loser.
    assert valid.tolist() == [[1, 1]] * 6 + [[1, 0]]
    # No temporary file of an atomic write is left behind (sdpo.io names them .NAME.tmp-PID).
    assert not [p.name for p in setup.out.iterdir() if TMP_MARK in p.name]


def load_parts(model):
    return load_tiny_parts(model)


@pytest.mark.parametrize("paired", [True, False])
def test_cached_items_match_the_image_pipeline(setup, paired):
    """Same row choice (corrupt skip), flips and caption dropout as sdpo.data.PreferencePairs;
    the cached posterior equals the VAE's posterior of the transformed pixels."""
    import datasets
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    parts = load_parts(setup.model)
    hf = datasets.load_dataset("parquet", data_files=str(setup.data / "*.parquet"), split="train")
    ds, _ = prepare_pairs(hf)
    images, cached = _both(ds, setup.out, seed=5, paired=paired, proportion_empty_prompts=0.5)
    assert len(images) == len(cached) == 7
    drops = flips = 0
    for epoch in (0, 1):
        images.start_epoch(epoch)
        cached.start_epoch(epoch)
        for i in range(7):
            a, b = images[i], cached[i]
            assert (a["index"], a["epoch"], a["corrupt"]) == (b["index"], b["epoch"], b["corrupt"])
            with torch.no_grad():
                want = parts.vae.encode(a["pixel_values"]).latent_dist
                cond = parts.encode_prompts([a["caption"]], "cpu")["encoder_hidden_states"][0]
            got = DiagonalGaussianDistribution(b["latent_moments"])
            torch.testing.assert_close(got.mean, want.mean, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got.logvar, want.logvar, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(b["cond"]["hidden"], cond, rtol=1e-5, atol=1e-5)
            drops += a["caption"] == ""
            plain_winner = cached._get("moments", b["index"])[0, 0]
            flips += int(not torch.equal(b["latent_moments"][0], plain_winner))
    assert 0 < drops < 14 and flips > 0  # both branches of dropout and flips were exercised
    # Pairs skip row 6 (loser does not decode) to row 0; SFT needs only its decodable winner.
    assert (cached[6]["index"], cached[6]["corrupt"]) == ((0, 1) if paired else (6, 0))


def test_mismatched_or_incomplete_cache_is_refused(setup, tmp_path):
    def identity(model=None, vae=None, resolution=32, mixed_precision="no", data=None, seed=0, **d):
        source = ModelSource(str(model or setup.model), vae=vae)
        data = DataSource(train_data_dir=str(data or setup.data), **d)
        return cache_identity(
            source,
            family="sd15",
            resolution=resolution,
            mixed_precision=mixed_precision,
            data=data,
            seed=seed,
        )

    assert check_cache(setup.out, identity())["complete"]
    for over, word in [
        (dict(resolution=64), "resolution"),
        (dict(mixed_precision="bf16"), "mixed_precision"),
        (dict(vae="other/vae"), "vae"),
        (dict(data=tmp_path), "data"),
        (dict(max_train_samples=3, seed=1), "data"),
    ]:
        with pytest.raises(ValueError, match=word):
            check_cache(setup.out, identity(**over))
    with pytest.raises(ValueError, match="not a cache"):
        check_cache(tmp_path, identity())
    with pytest.raises(SystemExit):
        cache.parse_args(cache_args(setup.model, setup.data, tmp_path, "--random_crop"))


def test_interrupted_precompute_resumes(setup, monkeypatch):
    from safetensors.torch import load_file

    out = setup.root / "interrupted"
    cfg = cache.parse_args(cache_args(setup.model, setup.data, out))
    real, calls = cache.encode_images, []

    def dies_on_third_batch(vae, images):
        calls.append(len(images))
        if len(calls) == 3:  # first batch of shard 1
            raise KeyboardInterrupt
        return real(vae, images)

    monkeypatch.setattr(cache, "encode_images", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.precompute(cfg, STATE)
    assert not json.loads((out / MANIFEST).read_text())["complete"]
    assert sorted(p.name for p in out.glob("shard-*")) == [shard_name(0)]
    first_shard = (out / shard_name(0)).stat().st_mtime_ns

    calls.clear()
    monkeypatch.setattr(cache, "encode_images", lambda vae, x: calls.append(len(x)) or real(vae, x))
    cache.precompute(cfg, STATE)
    assert calls == [2, 1, 1]  # shard 1 (rows 3-5), shard 2 (row 6) only
    assert (out / shard_name(0)).stat().st_mtime_ns == first_shard
    assert json.loads((out / MANIFEST).read_text())["complete"]
    for k in range(3):
        a = load_file(out / shard_name(k))
        b = load_file(setup.out / shard_name(k))
        assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    # A different setting in the same folder is refused up front.
    with pytest.raises(ValueError, match="other settings"):
        cache.precompute(
            cache.parse_args(cache_args(setup.model, setup.data, out, "--resolution", "64")), STATE
        )


@pytest.mark.parametrize("method", ["sft"])  # paired methods: through train.py below
def test_cached_step_gives_the_same_loss_as_the_image_step(setup, method):
    """sdpo.step.training_step on a cached batch = on the image batch (same keyed noise, t,
    posterior draw, flips and caption dropout); SFT reads only the winner's moments."""
    import contextlib

    import datasets

    from sdpo.losses import LOSSES
    from sdpo.step import Preference, training_step

    parts = load_parts(setup.model)
    spec = LOSSES[method]
    ref = parts.make_reference() if spec.needs_reference else None
    hf = datasets.load_dataset("parquet", data_files=str(setup.data / "*.parquet"), split="train")
    images, cached = _both(
        prepare_pairs(hf)[0], setup.out, seed=3, paired=spec.paired, proportion_empty_prompts=0.5
    )
    pref = Preference(beta=5000.0, safeguard=True, mu=0.5)
    with torch.no_grad():  # perturb the policy so that policy != reference
        for p in parts.unet.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    for epoch, rows in ((0, [0, 3, 6]), (1, [5, 1, 2])):
        images.start_epoch(epoch)
        cached.start_epoch(epoch)
        losses = []
        for batch in (
            collate_pairs([images[i] for i in rows]),
            collate_cached([cached[i] for i in rows], family=SD15, resolution=32),
        ):
            loss, stats = training_step(
                parts=parts,
                unet=parts.unet,
                ref_unet=ref,
                batch=batch,
                spec=spec,
                pref=pref,
                seed=11,
                device="cpu",
                autocast=contextlib.nullcontext,
            )
            losses.append((loss.detach(), {k: v.detach() for k, v in stats.items()}))
        (loss_img, stats_img), (loss_cache, stats_cache) = losses
        # Equal up to float rounding: the VAE convolutions see other batch compositions (~1e-7
        # in the errors), and β = 5000 multiplies error differences into the margin and loss.
        assert stats_cache.keys() == stats_img.keys()
        for key in stats_img:
            tol = 1e-3 if key in ("loss", "margin") else 1e-5
            torch.testing.assert_close(stats_cache[key], stats_img[key], rtol=tol, atol=1e-6)
        torch.testing.assert_close(loss_cache, loss_img, rtol=1e-3, atol=1e-6)


def test_train_py_from_the_cache_logs_the_same_losses(setup, tmp_path):
    """Two train.py runs, images vs --precomputed_dir, same seed: the same logged losses."""
    import train
    from tests.train_fixtures import train_args

    extra = ("--use_winner_preserving", "--winner_preserving_mu", "0.5", "--max_train_steps", "2")
    logs = []
    for name, more in (("images", ()), ("cached", ("--precomputed_dir", str(setup.out)))):
        out = tmp_path / name
        train.main(train.parse_args(train_args(setup.model, setup.data, out, *extra, *more)))
        logs.append([json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()])
    images, cached = logs
    assert [r["step"] for r in cached] == [1, 2]
    for a, b in zip(images, cached):
        for key in ("loss", "model_mse", "ref_mse", "loser_scale", "implicit_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-6), key
        assert a["corrupt_skipped"] == b["corrupt_skipped"]
    # A cache made for other settings is refused before training starts.
    with pytest.raises(ValueError, match="resolution"):
        args = train_args(setup.model, setup.data, tmp_path / "bad", "--resolution", "64")
        train.main(train.parse_args([*args, "--precomputed_dir", str(setup.out)]))


def test_each_distinct_caption_is_encoded_and_stored_once(tmp_path):
    """Six pairs over three prompts: three conditioning rows in text-00000, every pair's cached
    conditioning equal to its caption's encoding, and the text encoder called on 3 captions."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file

    model = tiny_sd15(tmp_path / "m")
    data = tmp_path / "d"
    path = write_synthetic_pickapic(data, n_pairs=6)
    table = pq.read_table(path)
    prompts = [f"prompt {i % 3}" for i in range(table.num_rows)]
    table = table.set_column(table.schema.get_field_index("caption"), "caption", [prompts])
    pq.write_table(table, path)
    out = tmp_path / "cache"
    encoded = []
    real = cache.encode_text

    def counting(parts, captions, device, dtype):
        encoded.extend(captions)
        return real(parts, captions, device, dtype)

    cache.encode_text, saved = counting, cache.encode_text
    try:
        manifest = cache.precompute(cache.parse_args(cache_args(model, data, out)), STATE)
    finally:
        cache.encode_text = saved
    assert manifest["captions"] == 3 and manifest["pairs"] == 6
    assert sorted(encoded) == ["", "prompt 0", "prompt 1", "prompt 2"]  # "" = the dropout one
    text = load_file(out / "text-00000.safetensors")
    assert text["hidden"].shape[0] == 3
    parts = load_parts(model)
    cached = CachedPairs(out, Augment(resolution=32, seed=0))
    for i in range(6):
        item = cached[i]
        want = parts.encode_prompts([prompts[item["index"]]], "cpu")["encoder_hidden_states"][0]
        torch.testing.assert_close(item["cond"]["hidden"], want, rtol=1e-5, atol=1e-5)
