"""The five scorers on tiny random weights (eval.tiny_scorers), loaded through the real path.

Each score is checked against an independent hand computation or against the metric package's
own code (hpsv2x's vendored open_clip, image-reward's ImageReward class) on the same weights;
the weight-location errors and the scoring CLI's cache are checked too.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eval import score as score_cli
from eval.scorers import IMAGEREWARD_MEAN, IMAGEREWARD_STD, WeightsNotFoundError, get_scorer
from eval.tiny_scorers import TINY_BLIP_GEOMETRY, TINY_OPENCLIP_NAME

PROMPTS = ["a cat on a mat", "A red car, 4k!", "an astronaut riding a horse on the moon", "x"]


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    shapes = [(40, 48), (48, 48), (56, 40), (48, 48)]  # non-square too: exercises resize + crop
    return [Image.fromarray(rng.integers(0, 256, (*s, 3), dtype=np.uint8)) for s in shapes]


def _spread(scores: torch.Tensor) -> float:
    return float(scores.max() - scores.min())


def test_pickscore_is_cosine_without_logit_scale(tiny_env, images):
    from transformers import CLIPModel, CLIPProcessor

    ours = get_scorer("pickscore", batch_size=3).score(images, PROMPTS)
    # hand: CLIPModel's own forward gives logit_scale.exp() * cosine; divide the scale out
    model = CLIPModel.from_pretrained(tiny_env["SDPO_PICKSCORE_MODEL"]).eval()
    proc = CLIPProcessor.from_pretrained(tiny_env["SDPO_PICKSCORE_PROCESSOR"])
    inputs = proc(
        text=PROMPTS, images=images, padding="max_length", max_length=77, return_tensors="pt"
    )
    assert inputs["input_ids"].shape == (4, 77)
    with torch.no_grad():
        out = model(**inputs)
    scale = model.logit_scale.exp()
    hand = out.logits_per_image.diagonal() / scale
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=0)
    assert scale > 2 and ours.abs().max() <= 1  # a cosine, not a logit
    assert _spread(ours) > 1e-3


def test_pickscore_truncates_long_prompts(tiny_env, images):
    # a prompt longer than 77 tokens scores like its 77-token truncation (padded/truncated text)
    scorer = get_scorer("pickscore")
    long = "word " * 200
    a = scorer.score(images[:1], [long])
    b = scorer.score(images[:1], [long + " and more words at the end"])
    torch.testing.assert_close(a, b)


def _load_vendored_hps_open_clip():
    """hpsv2x's own open_clip copy, imported standalone (hpsv2/__init__ needs `clint`)."""
    # find_spec locates the installed package without running its __init__
    spec_origin = importlib.util.find_spec("hpsv2").submodule_search_locations[0]
    root = Path(spec_origin) / "src" / "open_clip"
    name = "_hpsv2_vendored_open_clip"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        name, root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_hpsv2_default_is_open_clips_own_transform(tiny_env, images):
    """The official evaluation's path: open_clip's PIL val transform on the HPS weights."""
    import open_clip

    ours = get_scorer("hpsv2", batch_size=4).score(images, PROMPTS)
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_OPENCLIP_NAME, pretrained=None
    )
    checkpoint = torch.load(tiny_env["SDPO_HPSV2_CHECKPOINT"], map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])
    model.eval()
    tok = open_clip.get_tokenizer(TINY_OPENCLIP_NAME)
    with torch.no_grad():
        fi = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        ft = model.encode_text(tok(PROMPTS), normalize=True)
    torch.testing.assert_close(ours, (fi * ft).sum(-1), atol=1e-6, rtol=0)
    # the package's tensor-resize variant is another number (only with the flag)
    package = get_scorer("hpsv2", batch_size=4, preprocess="package").score(images, PROMPTS)
    assert not torch.allclose(ours, package, atol=1e-7, rtol=0)
    with pytest.raises(ValueError, match="--hpsv2_preprocess"):
        get_scorer("hpsv2", preprocess="bilinear")


def test_hpsv2_package_variant_identical_to_package_code(tiny_env, images, monkeypatch):
    ours = get_scorer("hpsv2", batch_size=4, preprocess="package").score(images, PROMPTS)
    # hpsv2.img_score.score's steps on its vendored open_clip: val preprocessing, its tokenizer,
    # model(image, text) -> normalised features, diag(image_features @ text_features.T)
    oc = _load_vendored_hps_open_clip()
    oc.add_model_config(tiny_env["SDPO_OPENCLIP_ARCH"])
    model, _, preprocess_val = oc.create_model_and_transforms(
        TINY_OPENCLIP_NAME, None, precision="fp32", device="cpu", output_dict=True
    )
    checkpoint = torch.load(tiny_env["SDPO_HPSV2_CHECKPOINT"], map_location="cpu")
    model.load_state_dict(checkpoint["state_dict"])  # strict, as the package does
    model.eval()
    tokenizer = oc.get_tokenizer(TINY_OPENCLIP_NAME)
    theirs = []
    with torch.no_grad():
        for image, prompt in zip(images, PROMPTS):
            out = model(preprocess_val(image).unsqueeze(0), tokenizer([prompt]))
            logits = out["image_features"] @ out["text_features"].T
            theirs.append(torch.diagonal(logits)[0])
    torch.testing.assert_close(ours, torch.stack(theirs), atol=1e-6, rtol=0)
    assert _spread(ours) > 1e-3


def test_clip_is_open_clip_cosine(tiny_env, images):
    import open_clip

    ours = get_scorer("clip").score(images, PROMPTS)
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_OPENCLIP_NAME, pretrained=None
    )
    model.load_state_dict(torch.load(tiny_env["SDPO_CLIP_CHECKPOINT"], map_location="cpu"))
    model.eval()
    tok = open_clip.get_tokenizer(TINY_OPENCLIP_NAME)
    with torch.no_grad():
        img = torch.stack([preprocess(im) for im in images])
        fi, ft = model.encode_image(img), model.encode_text(tok(PROMPTS))
    hand = (fi @ ft.T).diagonal() / (fi.norm(dim=-1) * ft.norm(dim=-1))
    torch.testing.assert_close(ours, hand, atol=1e-5, rtol=0)
    # different weights than HPSv2 -> different scores
    assert not torch.allclose(ours, get_scorer("hpsv2").score(images, PROMPTS), atol=1e-3)


def test_aesthetics_mlp_on_normalised_clip_features(tiny_env, images):
    from transformers import CLIPImageProcessor, CLIPModel

    ours = get_scorer("aesthetics").score(images, PROMPTS)
    state = torch.load(tiny_env["SDPO_AESTHETICS_MLP"], map_location="cpu")
    shapes = [tuple(state[f"layers.{i}.weight"].shape) for i in (0, 2, 4, 6, 7)]
    assert shapes == [(1024, 768), (128, 1024), (64, 128), (16, 64), (1, 16)]
    assert len(state) == 10  # five Linear layers, nothing else (no activations, dropout params)
    clip = CLIPModel.from_pretrained(tiny_env["SDPO_AESTHETICS_CLIP"]).eval()
    pixels = CLIPImageProcessor.from_pretrained(tiny_env["SDPO_AESTHETICS_CLIP"])(
        images=images, return_tensors="pt"
    )
    with torch.no_grad():
        feats = clip.get_image_features(**pixels)
        feats = feats if isinstance(feats, torch.Tensor) else feats.pooler_output
    x = feats / feats.norm(dim=-1, keepdim=True)
    for i in (0, 2, 4, 6, 7):  # affine maps only, in order
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(ours, x.squeeze(-1), atol=1e-5, rtol=1e-5)
    assert _spread(ours) > 1e-4


def _package_imagereward(tiny_env, monkeypatch):
    """image-reward's own ImageReward model on the tiny checkpoint (its ViT factory shrunk)."""
    from eval.compat import import_imagereward_blip

    ir = import_imagereward_blip()
    from ImageReward.models.BLIP import blip, blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    g = TINY_BLIP_GEOMETRY

    def tiny_vit(vit, image_size, *args, **kwargs):
        assert vit == "large" and image_size == g["image_size"]
        return VisionTransformer(
            img_size=image_size,
            patch_size=g["patch_size"],
            embed_dim=g["width"],
            depth=g["depth"],
            num_heads=1,
        ), g["width"]

    original = blip.BertTokenizer

    class LocalBert(original):  # the package hard-codes the hub id bert-base-uncased
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            assert name == "bert-base-uncased"
            return original.from_pretrained(tiny_env["SDPO_BERT_TOKENIZER"], *args, **kwargs)

    monkeypatch.setattr(blip_pretrain, "create_vit", tiny_vit)
    monkeypatch.setattr(blip, "BertTokenizer", LocalBert)
    model = ir.ImageReward(med_config=tiny_env["SDPO_IMAGEREWARD_MED_CONFIG"], device="cpu")
    state = torch.load(tiny_env["SDPO_IMAGEREWARD_CHECKPOINT"], map_location="cpu")
    model.load_state_dict(state, strict=True)  # our checkpoint has exactly the package's keys
    return model.eval()


def test_imagereward_identical_to_package_score(tiny_env, images, monkeypatch):
    ours = get_scorer("imagereward", batch_size=3).score(images, PROMPTS)
    package = _package_imagereward(tiny_env, monkeypatch)
    assert (package.mean, package.std) == (IMAGEREWARD_MEAN, IMAGEREWARD_STD)
    with torch.no_grad():
        theirs = torch.tensor([package.score(p, im) for p, im in zip(PROMPTS, images)])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert _spread(ours) > 1e-4

    # the normalisation by hand: raw MLP output of the CLS feature, then (raw - mean) / std
    text = package.blip.tokenizer(
        PROMPTS[:1], padding="max_length", truncation=True, max_length=35, return_tensors="pt"
    )
    with torch.no_grad():
        emb = package.blip.visual_encoder(package.preprocess(images[0]).unsqueeze(0))
        cls = package.blip.text_encoder(
            text.input_ids,
            attention_mask=text.attention_mask,
            encoder_hidden_states=emb,
            encoder_attention_mask=torch.ones(emb.shape[:-1], dtype=torch.long),
        ).last_hidden_state[:, 0]
        raw = package.mlp(cls).item()
    assert ours[0].item() == pytest.approx(
        (raw - 0.16717362830052426) / 1.0333394966054072, abs=1e-5
    )


def test_imagereward_checkpoint_loaded_strictly(tiny_env, tmp_path, monkeypatch):
    state = torch.load(tiny_env["SDPO_IMAGEREWARD_CHECKPOINT"], map_location="cpu")
    state["blip.not_a_module.weight"] = torch.zeros(1)
    del state["mlp.layers.7.bias"]
    bad = tmp_path / "ImageReward.pt"
    torch.save(state, bad)
    with pytest.raises(
        ValueError, match=r"missing keys \['mlp.layers.7.bias'\].*blip.not_a_module.weight"
    ):
        get_scorer("imagereward", checkpoint=str(bad))


def test_missing_weight_file_names_the_fix(tiny_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SDPO_HPSV2_CHECKPOINT", str(tmp_path / "nope" / "HPS_v2_compressed.pt"))
    with pytest.raises(WeightsNotFoundError) as err:
        get_scorer("hpsv2")
    msg = str(err.value)
    assert "SDPO_HPSV2_CHECKPOINT" in msg and "--hpsv2_checkpoint" in msg and "xswu/HPSv2" in msg


def test_offline_hub_names_the_fix(tiny_env, monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1 and nothing is cached: hub ids cannot be fetched
    monkeypatch.setenv("SDPO_PICKSCORE_MODEL", "yuvalkirstain/PickScore_v1")
    with pytest.raises(WeightsNotFoundError, match="SDPO_PICKSCORE_MODEL.*--pickscore_model"):
        get_scorer("pickscore")
    monkeypatch.delenv("SDPO_IMAGEREWARD_CHECKPOINT")  # default THUDM/ImageReward/ImageReward.pt
    with pytest.raises(WeightsNotFoundError, match="SDPO_IMAGEREWARD_CHECKPOINT"):
        get_scorer("imagereward")


# ---------------------------------------------------------------- scoring CLI


def _manifest(folder: Path, prompts: list[str], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, p in enumerate(prompts):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            folder / "imgs" / f"{i}_32x32.png"
        )
        entries.append(
            {
                "prompt": p,
                "gen_image_path": f"imgs/{i}_32x32.png",
                "raw_image_path": "",
                "metadata": {},
            }
        )
    path = folder / "set_seed0_32x32_1s_5cfg.json"
    path.write_text(json.dumps(entries))
    return path


def test_score_cli_writes_files_and_skips_cached(tiny_env, tmp_path, capsys):
    manifest = _manifest(tmp_path / "run", PROMPTS[:3], seed=1)
    cfg = score_cli.parse_args(
        [
            "--manifest",
            str(manifest),
            "--metrics",
            "clip,aesthetics",
            "--device",
            "cpu",
            "--batch_size",
            "2",
        ]
    )
    score_cli.main(cfg)
    assert "clip" in capsys.readouterr().out
    records = score_cli.read_scores(manifest.with_name(manifest.stem + ".scores.jsonl"))
    assert [r["index"] for r in records] == [0, 1, 2]
    assert [r["prompt"] for r in records] == PROMPTS[:3]
    images = [Image.open(manifest.parent / r["image"]).convert("RGB") for r in records]
    direct = get_scorer("clip").score(images, PROMPTS[:3])
    torch.testing.assert_close(
        torch.tensor([r["clip"] for r in records]), direct, atol=1e-6, rtol=0
    )
    summary = json.loads(manifest.with_name(manifest.stem + ".summary.json").read_text())
    assert summary["n"] == 3 and summary["metrics"]["clip"]["mean"] == pytest.approx(
        float(direct.mean())
    )
    assert summary["metrics"]["clip"]["std"] == pytest.approx(float(direct.std()), abs=1e-6)

    def no_models(*args, **kwargs):
        raise AssertionError("a scorer was built although every score is cached")

    score_cli.score_manifests(cfg, scorer_factory=no_models)  # second run: nothing to compute
    assert score_cli.read_scores(manifest.with_name(manifest.stem + ".scores.jsonl")) == records

    # one image changes: only that entry is rescored, and only for the requested metric
    Image.new("RGB", (32, 32), "red").save(manifest.parent / "imgs" / "1_32x32.png")
    built = []

    def counting(name, **kwargs):
        scorer = get_scorer(name, **kwargs)
        inner = scorer.score
        scorer.score = lambda ims, ps: built.append((name, len(ims))) or inner(ims, ps)
        return scorer

    score_cli.score_manifests(cfg, scorer_factory=counting)
    assert sorted(built) == [("aesthetics", 1), ("clip", 1)]
    new = score_cli.read_scores(manifest.with_name(manifest.stem + ".scores.jsonl"))
    assert new[0] == records[0] and new[2] == records[2] and new[1]["clip"] != records[1]["clip"]


def test_score_cli_errors_before_loading_models(tiny_env, tmp_path, monkeypatch):
    manifest = _manifest(tmp_path / "run", PROMPTS[:3], seed=2)
    (manifest.parent / "imgs" / "2_32x32.png").unlink()
    (manifest.parent / "imgs" / "0_32x32.png").unlink()

    def no_models(*args, **kwargs):
        raise AssertionError("models must not load")

    cfg = score_cli.parse_args(["--manifest", str(manifest), "--metrics", "clip"])
    with pytest.raises(FileNotFoundError, match=r"(?s)2 image\(s\).*0_32x32.png.*2_32x32.png"):
        score_cli.score_manifests(cfg, scorer_factory=no_models)

    manifest = _manifest(tmp_path / "run2", PROMPTS[:2], seed=3)
    monkeypatch.setenv("SDPO_AESTHETICS_MLP", str(tmp_path / "missing.pth"))
    cfg = score_cli.parse_args(["--manifest", str(manifest), "--metrics", "clip,aesthetics"])
    with pytest.raises(WeightsNotFoundError, match="SDPO_AESTHETICS_MLP"):
        score_cli.score_manifests(cfg, scorer_factory=no_models)
    with pytest.raises(SystemExit):
        score_cli.parse_args(["--manifest", str(manifest), "--metrics", "clip,fid"])


def test_aesthetics_mlp_is_pinned_by_revision_and_sha256(tmp_path, monkeypatch):
    import huggingface_hub

    from eval import scorers

    spec = next(s for s in scorers.WEIGHT_SPECS["aesthetics"] if s.key == "mlp")
    good = tmp_path / "hub" / scorers.AESTHETICS_MLP_NAME
    good.parent.mkdir()
    good.write_bytes(b"not the real MLP")
    calls = []

    def fake_download(repo, filename, revision=None):
        calls.append((repo, filename, revision))
        return str(good)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.delenv(spec.env, raising=False)
    # the default is a hub file at a fixed commit; its bytes must have the published sha256
    with pytest.raises(WeightsNotFoundError, match="sha256 .* is not the published"):
        scorers.resolve_weight("aesthetics", spec)
    assert calls == [("trojblue/clip-aesthetics", scorers.AESTHETICS_MLP_NAME,
                      scorers.AESTHETICS_MLP_REVISION)]  # fmt: skip
    assert len(scorers.AESTHETICS_MLP_REVISION) == 40
    # a local download under the original name is checked too; a renamed file is the user's own
    with pytest.raises(WeightsNotFoundError, match="sha256"):
        scorers.resolve_weight("aesthetics", spec, str(good))
    mine = tmp_path / "my_mlp.pth"
    mine.write_bytes(b"x")
    assert scorers.resolve_weight("aesthetics", spec, str(mine)) == str(mine)
    # the right bytes pass (checked with a spec whose published hash is that of the test file)
    import dataclasses
    import hashlib

    ok = dataclasses.replace(spec, sha256=hashlib.sha256(good.read_bytes()).hexdigest())
    assert scorers.resolve_weight("aesthetics", ok, str(good)) == str(good)


def test_cached_scores_of_another_scorer_configuration_are_recomputed(tiny_env, tmp_path):
    manifest = _manifest(tmp_path / "run", PROMPTS[:2], seed=4)
    scores_file = manifest.with_name(manifest.stem + ".scores.jsonl")
    argv = ["--manifest", str(manifest), "--metrics", "hpsv2,clip", "--device", "cpu"]
    score_cli.score_manifests(score_cli.parse_args(argv))
    first = score_cli.read_scores(scores_file)
    assert all(set(r["scorer_ids"]) == {"hpsv2", "clip"} for r in first)
    built = []

    def counting(name, **kwargs):
        built.append(name)
        return get_scorer(name, **kwargs)

    # same configuration: nothing is rebuilt
    score_cli.score_manifests(score_cli.parse_args(argv), scorer_factory=counting)
    assert built == []
    # the HPSv2 preprocessing switched: hpsv2 is recomputed, clip is kept
    cfg = score_cli.parse_args([*argv, "--hpsv2_preprocess", "package"])
    score_cli.score_manifests(cfg, scorer_factory=counting)
    assert built == ["hpsv2"]
    second = score_cli.read_scores(scores_file)
    assert [r["clip"] for r in second] == [r["clip"] for r in first]
    assert all(a["scorer_ids"]["hpsv2"] != b["scorer_ids"]["hpsv2"] for a, b in zip(first, second))
