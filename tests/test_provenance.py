"""Generation provenance: replaced weights are refused on resume, one-line errors, no leftovers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import eval.generate as G

SIZE, STEPS = 32, 2


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    import sdpo.testing.tiny as tiny

    return tiny.build_tiny_sd15(tmp_path_factory.mktemp("models") / "sd15", seed=0)


def _argv(base, outdir, unet):
    return ["--pretrained_model_name_or_path", str(base), "--prompts", "smoke", "--outdir",
            str(outdir), "--size", str(SIZE), "--steps", str(STEPS), "--dtype", "fp32",
            "--device", "cpu", "--limit", "1", "--unet_path", str(unet)]  # fmt: skip


def _save_unet(base, path: Path, seed: int | None = None) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in unet.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(unet.state_dict(), path)
    return path


def test_replaced_weights_are_refused_and_hash_is_recorded(sd15, tmp_path):
    torch.set_num_threads(1)
    unet = _save_unet(sd15, tmp_path / "ckpt" / "unet.pth")
    manifest = G.main(G.parse_args(_argv(sd15, tmp_path / "out", unet)))
    md = json.loads(Path(manifest).read_text())[0]["metadata"]
    assert md["unet_sha256"] == G._sha256_file(unet) and len(md["unet_sha256"]) == 64
    # the same weights again: resumes (nothing to generate)
    G.main(G.parse_args(_argv(sd15, tmp_path / "out", unet)))
    # other weights at the same path: refused, with the way to regenerate
    _save_unet(sd15, unet, seed=1)
    with pytest.raises(
        G.GenerationError, match="different run.*weights at --unet_path changed"
    ) as e:
        G.main(G.parse_args(_argv(sd15, tmp_path / "out", unet)))
    assert "delete" in str(e.value) and "rerun the same command" in str(e.value)


def test_text_file_as_unet_is_one_line_and_leaves_no_folder(sd15, tmp_path):
    fake = tmp_path / "unet.pth"
    fake.write_text("this is not a checkpoint\n")
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "eval.generate", *_argv(sd15, out, fake)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(G.__file__).resolve().parents[1],
    )
    assert r.returncode == 1
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "is not a PyTorch state_dict file" in err[-1]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    # the output folders made before loading were removed again: nothing left behind
    assert not out.exists()
