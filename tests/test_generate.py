"""eval.generate on tiny random SD1.5- and SDXL-style pipelines (CPU, fp32, 32 px, 2 steps)."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import eval.generate as G
from eval.prompts import PAPER_SETS

N = 5  # prompts of the shared base runs (batch 4: batches [0..3] and [4])
SIZE, STEPS = 32, 2
STEM = f"smoke_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"


def _build(kind: str, path: Path, seed: int = 0) -> Path:
    import sdpo.testing.tiny as tiny

    build = tiny.build_tiny_sdxl if kind == "sdxl" else tiny.build_tiny_sd15
    return build(path, seed=seed)


def _args(base, outdir, *extra):
    return [
        "--pretrained_model_name_or_path",
        str(base),
        "--prompts",
        "smoke",
        "--outdir",
        str(outdir),
        "--size",
        str(SIZE),
        "--steps",
        str(STEPS),
        "--dtype",
        "fp32",
        "--device",
        "cpu",
        *map(str, extra),
    ]


def _images(folder: Path, n: int) -> list[np.ndarray]:
    return [
        np.asarray(Image.open(folder / f"{i}_{SIZE}x{SIZE}.png").convert("RGB")).astype(np.int16)
        for i in range(n)
    ]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"sd15": _build("sd15", root / "sd15"), "sdxl": _build("sdxl", root / "sdxl")}


@pytest.fixture(scope="module")
def base_runs(models, tmp_path_factory):
    """Batch-1 generations of the first N smoke prompts with each base model (via the CLI parser);
    SDXL with its base VAE (the fp16-fix default cannot be downloaded here) and auto-detected."""
    runs = {}
    for kind, base in models.items():
        out = tmp_path_factory.mktemp(f"run_{kind}")
        vae = ["--vae", "base"] if kind == "sdxl" else []
        manifest = G.main(G.parse_args(_args(base, out, "--limit", N, *vae)))
        runs[kind] = Path(manifest)
    return runs


class _ThreadState:
    """accelerate.PartialState stand-in: ranks are threads, wait_for_everyone a barrier."""

    def __init__(self, rank, world, barrier):
        self.process_index, self.num_processes, self.barrier = rank, world, barrier
        self.is_main_process = rank == 0
        self.device = "cpu"

    def wait_for_everyone(self):
        self.barrier.wait()


# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_manifest_and_image_names(base_runs, models, kind):
    manifest = base_runs[kind]
    assert manifest.name == f"{STEM}.json"  # {set}_seed{S}_{H}x{W}_{steps}s_{cfg}cfg
    rows = json.loads(manifest.read_text())
    smoke = json.loads((Path(G.__file__).parent.parent / "prompts/smoke.json").read_text())
    assert [r["prompt"] for r in rows] == [e["prompt"] for e in smoke[:N]]
    for i, row in enumerate(rows):
        assert set(row) == {"prompt", "gen_image_path", "raw_image_path", "metadata"}
        assert row["gen_image_path"] == f"{STEM}/{i}_{SIZE}x{SIZE}.png"  # relative to manifest
        with Image.open(manifest.parent / row["gen_image_path"]) as im:
            assert im.size == (SIZE, SIZE) and im.mode == "RGB"
            assert im.text["prompt"] == row["prompt"]  # provenance inside the PNG
        md = row["metadata"]
        assert md["index"] == i and md["seed"] == 0 and md["steps"] == STEPS
        assert md["cfg"] == 7.5 and md["guidance_scale"] == 8.5
        assert md["base_model"] == str(models[kind]) and md["unet_path"] is None
        assert md["sdxl"] is (kind == "sdxl")  # SDXL detected from model_index.json
    pngs = sorted(p.name for p in (manifest.parent / STEM).glob("*.png"))
    assert len(pngs) == N
    imgs = _images(manifest.parent / STEM, N)
    # the prompt conditions the image (same noise for all): no two images are the same
    assert min(np.abs(imgs[0] - im).mean() for im in imgs[1:]) > 1.0


def test_sd15_matches_hand_written_reference_loop(base_runs, models):
    """Euler from the base scheduler config, eps = cond + 7.5 (cond - uncond) with "" as the
    negative, one randn(1, 4, H/f, W/f) from seed 0 times init_noise_sigma, fp32 VAE decode."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    base = models["sd15"]
    tok = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    sched = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")

    def embed(text):
        ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        return te(ids.input_ids)[0]

    rows = json.loads(base_runs["sd15"].read_text())
    ours = _images(base_runs["sd15"].parent / STEM, 2)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        for k in range(2):
            cond, uncond = embed(rows[k]["prompt"]), embed("")
            sched.set_timesteps(STEPS)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, 4, SIZE // f, SIZE // f, generator=gen) * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t).repeat(2, 1, 1, 1)
                e_c, e_u = unet(
                    inp, t, encoder_hidden_states=torch.cat([cond, uncond])
                ).sample.chunk(2)
                x = sched.step(e_c + 7.5 * (e_c - e_u), t, x).prev_sample
            img = vae.decode(x / vae.config.scaling_factor).sample
            img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
            # ≤ 1 grey level: the pipeline's uncond + 8.5 (cond - uncond) rounds differently in
            # fp32 than cond + 7.5 (cond - uncond); a wrong guidance/noise/scheduler is >> 1.
            assert np.abs(img.astype(np.int16) - ours[k]).max() <= 1


def test_sdxl_matches_hand_written_reference_loop(base_runs, models):
    """SDXL: penultimate hidden states of both text encoders concatenated, the second encoder's
    pooled projection, time_ids [H, W, 0, 0, H, W], and the empty negative prompt ENCODED (not the
    zeros diffusers substitutes when no negative prompt is given)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    base = models["sdxl"]
    toks = [CLIPTokenizer.from_pretrained(base, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
    encs = [
        CLIPTextModel.from_pretrained(base, subfolder="text_encoder").eval(),
        CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2").eval(),
    ]
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet").eval()
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae").eval()
    sched = EulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler")

    def embed(text):
        hidden, pooled = [], None
        for tok, enc in zip(toks, encs):
            ids = tok(
                text, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            )
            out = enc(ids.input_ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # text_embeds of the projection model (the last encoder)
        return torch.cat(hidden, dim=-1), pooled

    rows = json.loads(base_runs["sdxl"].read_text())
    ours = _images(base_runs["sdxl"].parent / STEM, 1)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2, dtype=torch.float32)
    with torch.no_grad():
        (c, c_pool), (u, u_pool) = embed(rows[0]["prompt"]), embed("")
        sched.set_timesteps(STEPS)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, SIZE // f, SIZE // f, generator=gen) * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(x, t).repeat(2, 1, 1, 1)
            cond = {"text_embeds": torch.cat([c_pool, u_pool]), "time_ids": time_ids}
            pred = unet(inp, t, encoder_hidden_states=torch.cat([c, u]), added_cond_kwargs=cond)
            e_c, e_u = pred.sample.chunk(2)
            x = sched.step(e_c + 7.5 * (e_c - e_u), t, x).prev_sample
        img = vae.decode(x / vae.config.scaling_factor).sample
        img = ((img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
    assert np.abs(img.astype(np.int16) - ours[0]).max() <= 1  # rounding, as for SD1.5


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_batch4_equals_batch1(base_runs, models, tmp_path, kind):
    vae = ["--vae", "base"] if kind == "sdxl" else []
    G.main(G.parse_args(_args(models[kind], tmp_path, "--limit", N, "--batch_size", 4, *vae)))
    one = _images(base_runs[kind].parent / STEM, N)
    four = _images(tmp_path / STEM, N)
    # Tolerance 1 grey level: batched fp32 CPU kernels may sum in another order (~1e-6 relative),
    # which can flip the rounding to uint8 of a few pixels; a different noise/prompt order would
    # change the images by tens of levels (see test_manifest_and_image_names).
    for a, b in zip(one, four):
        assert np.abs(a - b).max() <= 1
        assert (a != b).mean() < 0.01


def test_resume_from_partial_outputs(base_runs, models, tmp_path, monkeypatch):
    """Images already present are kept, a leftover temporary file is dropped, the gaps are
    filled with the same images as an uninterrupted run, and the manifest has no dup/gap."""
    src = base_runs["sd15"].parent / STEM
    dst = tmp_path / STEM
    dst.mkdir()
    for i in (0, 1, 3):
        shutil.copy2(src / f"{i}_{SIZE}x{SIZE}.png", dst / f"{i}_{SIZE}x{SIZE}.png")
    shutil.copy2(src / "generation_config.json", dst / "generation_config.json")
    (dst / f".2_{SIZE}x{SIZE}.png.tmp-12345").write_bytes(b"\x89PNG\r\n\x1a\ntrunc")
    kept = {i: (dst / f"{i}_{SIZE}x{SIZE}.png").stat().st_mtime_ns for i in (0, 1, 3)}

    written = []
    real_save = G._save_png
    monkeypatch.setattr(
        G, "_save_png", lambda im, p, pr: (written.append(p.name), real_save(im, p, pr))
    )
    manifest = G.main(
        G.parse_args(_args(models["sd15"], tmp_path, "--limit", N, "--batch_size", 2))
    )
    assert sorted(written) == [f"{i}_{SIZE}x{SIZE}.png" for i in (2, 4)]
    assert {i: (dst / f"{i}_{SIZE}x{SIZE}.png").stat().st_mtime_ns for i in kept} == kept
    assert sorted(p.name for p in dst.iterdir()) == sorted(
        [f"{i}_{SIZE}x{SIZE}.png" for i in range(N)] + ["generation_config.json"]
    )
    for a, b in zip(_images(src, N), _images(dst, N)):
        assert np.abs(a - b).max() <= 1  # batch 2 vs batch 1 (see test_batch4_equals_batch1)
    rows = json.loads(Path(manifest).read_text())
    assert [r["metadata"]["index"] for r in rows] == list(range(N))
    assert len({r["gen_image_path"] for r in rows}) == N


def test_killed_run_resumes_without_gaps_or_duplicates(models, tmp_path, monkeypatch):
    k = 3
    real_save = G._save_png
    calls = []

    def dying_save(image, path, prompt):
        calls.append(path.name)
        if len(calls) > k:  # killed while writing image k+1: a partial temp file stays behind
            path.with_name(f".{path.name}.tmp-999").write_bytes(b"\x89PNG partial")
            raise KeyboardInterrupt
        real_save(image, path, prompt)

    monkeypatch.setattr(G, "_save_png", dying_save)
    args = _args(models["sd15"], tmp_path, "--limit", 5)
    with pytest.raises(KeyboardInterrupt):
        G.main(G.parse_args(args))
    folder = tmp_path / STEM
    assert sorted(p.name for p in folder.glob("*.png")) == [
        f"{i}_{SIZE}x{SIZE}.png" for i in range(k)
    ]
    assert not (tmp_path / f"{STEM}.json").exists()  # no manifest for an unfinished run

    calls.clear()
    monkeypatch.setattr(
        G, "_save_png", lambda im, p, pr: (calls.append(p.name), real_save(im, p, pr))
    )
    G.main(G.parse_args(args))
    assert calls == [f"{i}_{SIZE}x{SIZE}.png" for i in range(k, 5)]  # only the missing ones
    assert not list(folder.glob(".*"))  # leftover temp file removed
    rows = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert [r["gen_image_path"] for r in rows] == [
        f"{STEM}/{i}_{SIZE}x{SIZE}.png" for i in range(5)
    ]

    # Nothing missing: the manifest is rebuilt from the images without loading any model.
    (tmp_path / f"{STEM}.json").unlink()
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("loaded models"))
    G.main(G.parse_args(args))
    assert json.loads((tmp_path / f"{STEM}.json").read_text()) == rows


def test_unet_pth_strict_and_unet_folder(base_runs, models, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    other = _build("sd15", tmp_path / "other", seed=1)  # same architecture, other weights
    unet = UNet2DConditionModel.from_pretrained(other, subfolder="unet")
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    torch.save(unet.state_dict(), ckpt / "unet.pth")
    unet.save_pretrained(tmp_path / "unet_folder")

    m_pth = G.main(
        G.parse_args(
            _args(models["sd15"], tmp_path / "a", "--limit", 2, "--unet_path", ckpt / "unet.pth")
        )
    )
    m_dir = G.main(
        G.parse_args(
            _args(
                models["sd15"],
                tmp_path / "b",
                "--limit",
                2,
                "--unet_path",
                tmp_path / "unet_folder",
            )
        )
    )
    base = _images(base_runs["sd15"].parent / STEM, 2)
    with_pth = _images(Path(m_pth).parent / STEM, 2)
    with_dir = _images(Path(m_dir).parent / STEM, 2)
    for b, p, d in zip(base, with_pth, with_dir):
        assert np.abs(b - p).mean() > 1.0  # the loaded UNet is used
        assert np.abs(p - d).max() <= 1  # state_dict and folder give the same model
    md = json.loads(Path(m_pth).read_text())[0]["metadata"]
    assert md["unet_path"] == str((ckpt / "unet.pth").resolve())

    # Wrong state_dicts: one clear error with the key counts, before any image is generated.
    monkeypatch.setattr(G, "generate_batch", lambda *a, **k: pytest.fail("generated"))
    sdxl_unet = UNet2DConditionModel.from_pretrained(models["sdxl"], subfolder="unet")
    torch.save(sdxl_unet.state_dict(), tmp_path / "sdxl_unet.pth")
    with pytest.raises(
        G.GenerationError,
        match=r"unet\.pth does not match the base model's UNet2DConditionModel: \d+ missing keys",
    ) as e:
        G.main(
            G.parse_args(
                _args(models["sd15"], tmp_path / "c", "--unet_path", tmp_path / "sdxl_unet.pth")
            )
        )
    assert "unexpected keys" in str(e.value) and "shape mismatches" in str(e.value)
    sd = unet.state_dict()
    sd.pop("conv_out.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(
        G.GenerationError,
        match=r"1 missing keys \(e\.g\. \['conv_out\.bias'\]\), 1 unexpected keys",
    ):
        G.main(
            G.parse_args(
                _args(models["sd15"], tmp_path / "d", "--unet_path", tmp_path / "partial.pth")
            )
        )
    assert not list((tmp_path / "d").rglob("*.png"))


def test_sharded_processes_split_the_missing_images(base_runs, models, tmp_path, monkeypatch):
    """Two ranks (threads) with a barrier as wait_for_everyone: each missing image is written
    exactly once, by rank index % 2 of the missing list, and rank 0 writes the manifest."""
    dst = tmp_path / STEM
    dst.mkdir()
    shutil.copy2(base_runs["sd15"].parent / STEM / f"1_{SIZE}x{SIZE}.png", dst)
    writers = []
    real_save = G._save_png

    def save(image, path, prompt):
        writers.append((threading.current_thread().name, path.name))
        real_save(image, path, prompt)

    monkeypatch.setattr(G, "_save_png", save)
    # Model loading is not thread-safe (diffusers/transformers build on the meta device through
    # a global context); separate processes do not share it, so threads load one at a time.
    lock, real_load = threading.Lock(), G.load_pipeline

    def load(*a, **k):
        with lock:
            return real_load(*a, **k)

    monkeypatch.setattr(G, "load_pipeline", load)
    cfg = G.parse_args(_args(models["sd15"], tmp_path, "--limit", 5))
    barrier = threading.Barrier(2, timeout=120)
    errors = []

    def rank(r):
        try:
            G.run(cfg, _ThreadState(r, 2, barrier))
        except BaseException as e:  # surfaced below
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,), name=f"rank{r}") for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    missing = [0, 2, 3, 4]
    expected = {("rank0", f"{i}_{SIZE}x{SIZE}.png") for i in missing[0::2]}
    expected |= {("rank1", f"{i}_{SIZE}x{SIZE}.png") for i in missing[1::2]}
    assert sorted(writers) == sorted(expected)
    rows = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert len(rows) == 5
    for a, b in zip(_images(base_runs["sd15"].parent / STEM, 5), _images(dst, 5)):
        assert np.abs(a - b).max() <= 1


def test_bad_inputs_fail_before_loading_models(base_runs, models, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("loaded models"))
    sd15, sdxl = models["sd15"], models["sdxl"]
    cases = [
        (_args(sd15, tmp_path, "--steps", 0), "--steps must be >= 1"),
        (_args(sd15, tmp_path, "--size", 30), "multiple of 8"),
        (_args(sdxl, tmp_path, "--no-sdxl"), "is a sdxl pipeline"),
        (_args(sd15, tmp_path, "--sdxl"), "is a sd15 pipeline"),
        (_args(sd15, tmp_path, "--unet_path", tmp_path / "nope.pth"), "--unet_path not found"),
        ([*_args(sd15, tmp_path), "--prompts", str(tmp_path / "x.json")], "prompt file not found"),
    ]
    for argv, message in cases:
        with pytest.raises((G.GenerationError, G.PromptSetError), match=message):
            G.main(G.parse_args(argv))

    # A resumed run must not mix the images of two runs' settings.
    shutil.copytree(base_runs["sd15"].parent / STEM, tmp_path / "r" / STEM)
    with pytest.raises(G.GenerationError, match="holds images of a different run"):
        G.main(G.parse_args(_args(sd15, tmp_path / "r", "--limit", 2, "--dtype", "bf16")))


def test_print_manifest_path_loads_nothing(models, tmp_path, monkeypatch):
    monkeypatch.setattr(G, "load_pipeline", lambda *a, **k: pytest.fail("loaded models"))
    argv = _args(models["sdxl"], tmp_path / "o", "--cfg", 5, "--seed", 3, "--print_manifest_path")
    assert (
        G.main(G.parse_args(argv))
        == tmp_path / "o" / f"smoke_seed3_{SIZE}x{SIZE}_{STEPS}s_5.0cfg.json"
    )
    assert not (tmp_path / "o").exists()


def test_sdxl_script_dispatch(models, tmp_path):
    """test_sdxl.sh runs test_sd15.sh with the SDXL defaults: --sdxl (checked against the tiny SDXL
    folder), 1024 px, outputs in $(dirname unet.pth)/eval_sdxl/. Extra args reach eval.generate
    (here --print_manifest_path: names only, nothing generated or scored)."""
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    (ckpt / "unet.pth").write_bytes(b"")  # only its location matters here
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        MODEL_NAME=str(models["sdxl"]),
        SETS="smoke",
        NUM_PROCESSES="1",
        METRICS="none",
        CFG="5",
    )
    script = Path(G.__file__).resolve().parent.parent / "scripts/eval/test_sdxl.sh"
    r = subprocess.run(
        ["bash", str(script), str(ckpt / "unet.pth"), "--print_manifest_path"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert str(ckpt / "eval_sdxl" / "smoke_seed0_1024x1024_50s_5.0cfg.json") in r.stdout
    assert " --sdxl " in r.stdout


def test_two_real_processes_share_the_work(base_runs, models, tmp_path):
    """torchrun with 2 CPU processes (gloo through accelerate's PartialState): every image once,
    one manifest, the same images as the single-process run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "eval.generate", *_args(models["sd15"], tmp_path, "--limit", 4)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                       cwd=Path(G.__file__).resolve().parent.parent)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 to generate over 2 process(es)" in r.stdout
    assert r.stdout.count("manifest:") == 1  # only the main process writes it
    rows = json.loads((tmp_path / f"{STEM}.json").read_text())
    assert [r["gen_image_path"] for r in rows] == [
        f"{STEM}/{i}_{SIZE}x{SIZE}.png" for i in range(4)
    ]
    for a, b in zip(_images(base_runs["sd15"].parent / STEM, 4), _images(tmp_path / STEM, 4)):
        assert np.abs(a - b).max() <= 1


def test_sd15_script_end_to_end_with_five_metrics(models, tmp_path, paper_prompts):
    """scripts/eval/test_sd15.sh on the tiny SD1.5 model with part B's tiny scorer weights (same
    loading path as the real ones): generation beside unet.pth, all five metrics per set, and the
    combined summary at the end."""
    from diffusers import UNet2DConditionModel

    from eval.tiny_scorers import build_tiny_scorers

    scorer_env = build_tiny_scorers(tmp_path / "scorers")
    ckpt = tmp_path / "checkpoint-5"
    ckpt.mkdir()
    unet = UNet2DConditionModel.from_pretrained(models["sd15"], subfolder="unet")
    torch.save(unet.state_dict(), ckpt / "unet.pth")
    env = dict(
        os.environ,
        **scorer_env,
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        MODEL_NAME=str(models["sd15"]),
        SIZE=str(SIZE),
        STEP=str(STEPS),
        DTYPE="fp32",
        SETS="papv2",
        NUM_PROCESSES="1",
        DEVICE="cpu",
        PROMPTS_DIR=str(tmp_path / "prompts"),
        PROMPTS_FROM=str(paper_prompts),
    )
    script = Path(G.__file__).resolve().parent.parent / "scripts/eval/test_sd15.sh"
    r = subprocess.run(
        ["bash", str(script), str(ckpt / "unet.pth"), "--limit", "2", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # the missing paper prompt file was fetched (verified) from PROMPTS_FROM into PROMPTS_DIR
    fetched = tmp_path / "prompts" / "papv2.json"
    assert hashlib.sha256(fetched.read_bytes()).hexdigest() == PAPER_SETS["papv2"]
    out = ckpt / "eval_sd15"
    stem = f"papv2_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg"
    rows = json.loads((out / f"{stem}.json").read_text())
    assert len(rows) == 2 and all((out / row["gen_image_path"]).is_file() for row in rows)
    assert rows[0]["metadata"]["unet_path"] == str((ckpt / "unet.pth").resolve())
    assert len((out / f"{stem}.scores.jsonl").read_text().splitlines()) == 2  # one per image
    summary = out / f"summary_seed0_{SIZE}x{SIZE}_{STEPS}s_7.5cfg.json"
    assert f"summary: {summary}" in r.stdout
    (entry,) = json.loads(summary.read_text()).values()
    metrics = ("pickscore", "hpsv2", "clip", "aesthetics", "imagereward")
    assert set(entry["metrics"]) == set(metrics) and entry["n"] == 2
    assert all(np.isfinite(entry["metrics"][m]["mean"]) for m in metrics)
    assert all(m in r.stdout for m in metrics)  # the table printed at the end
