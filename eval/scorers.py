"""The five image-text scorers of the paper's evaluation, behind one interface.

``get_scorer(name, device=..., **weights).score(images, prompts) -> torch.Tensor [N]`` (float32,
on the CPU; higher is better) for ``name`` in :data:`SCORERS`:

=============  ==============================================================================
pickscore      transformers ``CLIPModel`` PickScore_v1, processor of laion CLIP-ViT-H-14: cosine of
               the L2-normalised image and text embeddings (NO logit_scale), text padded and
               truncated to 77 tokens.
hpsv2          open_clip ``ViT-H-14`` built with ``pretrained=None`` + ``HPS_v2_compressed.pt``
               (``torch.load(f)["state_dict"]``), open_clip's own val transform (PIL bicubic
               resize + centre crop, as the official evaluation scores) and the open_clip
               tokenizer; cosine. ``preprocess="package"`` (``--hpsv2_preprocess package``)
               selects the hpsv2 package's tensor-resize variant instead (1e-4 to 3e-4 apart).
clip           open_clip ``ViT-H-14`` / ``laion2B-s32B-b79K``; the same cosine.
aesthetics     ``openai/clip-vit-large-patch14`` image embeddings, L2-normalised, into the LAION
               improved-aesthetic MLP (768-1024-128-64-16-1 Linear layers, dropout, no activation).
imagereward    ImageReward-v1.0 (BLIP of the ``image-reward`` package, run on transformers 5 through
               :mod:`eval.compat`): ``(MLP(CLS of the text encoder cross-attending the image)
               - 0.16717362830052426) / 1.0333394966054072``.
=============  ==============================================================================

Every weight location is a keyword of :func:`get_scorer` (CLI flag ``--<name>_<key>`` in
``eval.score``), else an environment variable, else the public default:

======================  ============================  ============================================
scorer / keyword        environment variable          default
======================  ============================  ============================================
pickscore  model        SDPO_PICKSCORE_MODEL          yuvalkirstain/PickScore_v1
pickscore  processor    SDPO_PICKSCORE_PROCESSOR      laion/CLIP-ViT-H-14-laion2B-s32B-b79K
hpsv2      checkpoint   SDPO_HPSV2_CHECKPOINT         xswu/HPSv2/HPS_v2_compressed.pt
hpsv2/clip arch         SDPO_OPENCLIP_ARCH            ViT-H-14 (or a path to an open_clip JSON
                                                      model config, registered under its stem)
hpsv2      preprocess   SDPO_HPSV2_PREPROCESS         open_clip (or package: the hpsv2 package's)
clip       checkpoint   SDPO_CLIP_CHECKPOINT          laion/CLIP-ViT-H-14-laion2B-s32B-b79K/
                                                      open_clip_pytorch_model.bin
aesthetics clip         SDPO_AESTHETICS_CLIP          openai/clip-vit-large-patch14
aesthetics mlp          SDPO_AESTHETICS_MLP           trojblue/clip-aesthetics/sac+logos+ava1-l14-
                                                      linearMSE.pth at commit 99cdc88ce4f3 (sha256
                                                      21dd590f...; a local download of the file,
                                                      any name, or the original GitHub URL works)
imagereward checkpoint  SDPO_IMAGEREWARD_CHECKPOINT   THUDM/ImageReward/ImageReward.pt
imagereward med_config  SDPO_IMAGEREWARD_MED_CONFIG   THUDM/ImageReward/med_config.json
imagereward tokenizer   SDPO_BERT_TOKENIZER           bert-base-uncased
======================  ============================  ============================================

A value is a local path (file or folder), a hub location (``owner/repo`` for a model folder,
``owner/repo/path/in/repo`` for one file; fetched with huggingface_hub, which honours
``HF_HUB_OFFLINE`` and its cache) or, for single files, an ``https://`` URL (cached under
``$SDPO_CACHE`` or ``~/.cache/sdpo``). Every location is resolved before any model is built; a
missing file or an unreachable hub raises one :class:`WeightsNotFoundError` that names the file, the
environment variable and the flag.

Precision: fp32 throughout (the scores are cheap next to generation, and fp32 keeps them
comparable across GPUs and the CPU).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

# ImageReward's normalisation of the raw MLP output (ImageReward-v1.0, ``ImageReward.mean/.std``).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
IMAGEREWARD_MAX_TOKENS = 35  # the package tokenises prompts to exactly 35 BERT tokens
CLIP_MAX_TOKENS = 77
# The LAION aesthetic MLP is published only as a file in a GitHub repository (a branch URL that can
# move). The default is a byte-identical copy on the hub, pinned to a commit, and every copy of the
# file (hub, URL or a local download named like the original) must have the published sha256
# (the git-LFS oid of the hub copies, 3714759 bytes).
AESTHETICS_MLP_NAME = "sac+logos+ava1-l14-linearMSE.pth"
AESTHETICS_MLP_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"
AESTHETICS_MLP_HUB = f"trojblue/clip-aesthetics/{AESTHETICS_MLP_NAME}"
AESTHETICS_MLP_REVISION = "99cdc88ce4f3ce8b120d04121a443bf24e80ddec"
AESTHETICS_MLP_URL = (  # the original location (still accepted; checked against the same sha256)
    "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
    "sac%2Blogos%2Bava1-l14-linearMSE.pth"
)


# Bumped when a scorer's computation changes (cached scores of the old one are then recomputed):
# hpsv2 2 = open_clip's own PIL preprocessing by default.
SCORER_REVISIONS = {"pickscore": 1, "hpsv2": 2, "clip": 1, "aesthetics": 1, "imagereward": 1}


class WeightsNotFoundError(FileNotFoundError):
    """A scorer weight could not be found locally nor fetched (the message says how to fix it)."""


@dataclass(frozen=True)
class WeightSpec:
    """One configurable weight location of a scorer."""

    key: str  # keyword of get_scorer / suffix of the CLI flag
    env: str  # environment variable
    default: str  # public location
    kind: str  # "file" (one file), "dir" (a transformers folder / hub repo), "arch", "option"
    what: str  # human description for error messages
    probe: str = "config.json"  # kind="dir": a small file proving the repo; "option": choices
    revision: str | None = None  # hub commit of the default location (pinned)
    sha256: str | None = None  # required sha256 of the file (see :func:`_check_sha256`)

    @property
    def shown_default(self) -> str:
        return f"{self.default}@{self.revision[:12]}" if self.revision else self.default


WEIGHT_SPECS: dict[str, tuple[WeightSpec, ...]] = {
    "pickscore": (
        WeightSpec(
            "model",
            "SDPO_PICKSCORE_MODEL",
            "yuvalkirstain/PickScore_v1",
            "dir",
            "PickScore_v1 CLIP model folder",
        ),
        WeightSpec(
            "processor",
            "SDPO_PICKSCORE_PROCESSOR",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "dir",
            "CLIP processor folder (tokenizer + image processor)",
            probe="preprocessor_config.json",
        ),
    ),
    "hpsv2": (
        WeightSpec(
            "checkpoint",
            "SDPO_HPSV2_CHECKPOINT",
            "xswu/HPSv2/HPS_v2_compressed.pt",
            "file",
            "HPS v2.0 checkpoint HPS_v2_compressed.pt",
        ),
        WeightSpec(
            "arch",
            "SDPO_OPENCLIP_ARCH",
            "ViT-H-14",
            "arch",
            "open_clip architecture name or model-config JSON",
        ),
        WeightSpec(
            "preprocess",
            "SDPO_HPSV2_PREPROCESS",
            "open_clip",
            "option",
            "image preprocessing: open_clip (its PIL val transform, as the official evaluation) "
            "or package (the hpsv2 package's tensor resize)",
            probe="open_clip,package",
        ),
    ),
    "clip": (
        WeightSpec(
            "checkpoint",
            "SDPO_CLIP_CHECKPOINT",
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K/open_clip_pytorch_model.bin",
            "file",
            "open_clip ViT-H-14 laion2B-s32B-b79K weights",
        ),
        WeightSpec(
            "arch",
            "SDPO_OPENCLIP_ARCH",
            "ViT-H-14",
            "arch",
            "open_clip architecture name or model-config JSON",
        ),
    ),
    "aesthetics": (
        WeightSpec(
            "clip",
            "SDPO_AESTHETICS_CLIP",
            "openai/clip-vit-large-patch14",
            "dir",
            "CLIP ViT-L/14 folder (model + preprocessor)",
        ),
        WeightSpec(
            "mlp",
            "SDPO_AESTHETICS_MLP",
            AESTHETICS_MLP_HUB,
            "file",
            f"LAION aesthetic MLP {AESTHETICS_MLP_NAME} (sha256 {AESTHETICS_MLP_SHA256[:12]}...)",
            revision=AESTHETICS_MLP_REVISION,
            sha256=AESTHETICS_MLP_SHA256,
        ),
    ),
    "imagereward": (
        WeightSpec(
            "checkpoint",
            "SDPO_IMAGEREWARD_CHECKPOINT",
            "THUDM/ImageReward/ImageReward.pt",
            "file",
            "ImageReward-v1.0 checkpoint ImageReward.pt",
        ),
        WeightSpec(
            "med_config",
            "SDPO_IMAGEREWARD_MED_CONFIG",
            "THUDM/ImageReward/med_config.json",
            "file",
            "ImageReward med_config.json",
        ),
        WeightSpec(
            "tokenizer",
            "SDPO_BERT_TOKENIZER",
            "bert-base-uncased",
            "dir",
            "bert-base-uncased tokenizer folder",
            probe="vocab.txt",
        ),
    ),
}


def _looks_local(value: str) -> bool:
    """Paths that cannot be a hub location: absolute/relative markers, or a file name with
    fewer than two slashes (hub files are ``owner/repo/file``)."""
    return value.startswith(("/", "./", "../", "~")) or (
        Path(value).suffix != "" and value.count("/") < 2
    )


def _fail(scorer: str, spec: WeightSpec, value: str, reason: str) -> WeightsNotFoundError:
    return WeightsNotFoundError(
        f"{scorer}: cannot get the {spec.what} from {value!r} ({reason}). Download it "
        f"(default location: {spec.default}) and point the environment variable {spec.env} or "
        f"the flag --{scorer}_{spec.key} at the local path (file or folder)."
    )


def _download_url(url: str) -> str:
    cache = Path(os.environ.get("SDPO_CACHE", Path.home() / ".cache" / "sdpo"))
    target = cache / Path(url.split("?")[0]).name.replace("%2B", "+")
    if target.is_file():
        return str(target)
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise OSError("offline (HF_HUB_OFFLINE is set) and not in the cache")
    from sdpo import io as sdpo_io

    sdpo_io.atomic_write(target, lambda tmp: torch.hub.download_url_to_file(url, str(tmp)))
    return str(target)


def _sha256_file(path: str) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_sha256(scorer: str, spec: WeightSpec, value: str, path: str) -> str:
    """The file of a pinned weight must have the published sha256: checked for the default
    location, for URLs and for any local file carrying the original name (a renamed local file
    is the user's own choice, e.g. the tiny test weights)."""
    if spec.sha256 is None:
        return path
    original = Path(spec.default).name
    named = Path(value.split("?")[0]).name.replace("%2B", "+") == original
    if value == spec.default or named or value.startswith(("http://", "https://")):
        got = _sha256_file(path)
        if got != spec.sha256:
            raise _fail(
                scorer, spec, value, f"sha256 {got} of {path} is not the published {spec.sha256}"
            )
    return path


def resolve_weight(scorer: str, spec: WeightSpec, value: str | None = None) -> str:
    """Like :func:`_resolve_weight`, then the sha256 check of pinned files."""
    value = value or os.environ.get(spec.env) or spec.default
    path = _resolve_weight(scorer, spec, value)
    return _check_sha256(scorer, spec, value, path) if spec.kind == "file" else path


def _resolve_weight(scorer: str, spec: WeightSpec, value: str | None = None) -> str:
    """Turn a configured location into a local path (file/folder) or an architecture name.

    Order: ``value`` (keyword / CLI flag), then ``$spec.env``, then ``spec.default``.
    Raises :class:`WeightsNotFoundError` (one message naming the fix) if it cannot be had.
    """
    value = value or os.environ.get(spec.env) or spec.default
    if spec.kind == "option":
        choices = spec.probe.split(",")
        if value not in choices:
            raise ValueError(
                f"{scorer}: --{scorer}_{spec.key} / {spec.env} must be one of {choices}, "
                f"got {value!r}"
            )
        return value
    if spec.kind == "arch":
        # a registered name (checked when the model is built) or a model-config JSON file
        if value.endswith(".json") and not os.path.isfile(os.path.expanduser(value)):
            raise _fail(scorer, spec, value, "no such local file")
        return os.path.expanduser(value) if value.endswith(".json") else value
    expanded = os.path.expanduser(value)
    if os.path.exists(expanded):
        if spec.kind == "file" and not os.path.isfile(expanded):
            raise _fail(scorer, spec, value, "it is a folder, a file is needed")
        return expanded
    if value.startswith(("http://", "https://")):
        try:
            return _download_url(value)
        except Exception as err:  # noqa: BLE001 - every failure means the same fix
            raise _fail(scorer, spec, value, f"download failed: {err}") from None
    if _looks_local(value):
        raise _fail(scorer, spec, value, "no such local path")
    from huggingface_hub import hf_hub_download

    parts = value.strip("/").split("/")
    try:
        if spec.kind == "dir":
            if len(parts) > 2:
                raise _fail(scorer, spec, value, "a hub model id is 'owner/name'")
            # Fetch one small file now so that an offline hub fails here, before any model
            # is built; from_pretrained then fetches the rest (or reads the cache).
            hf_hub_download(value, spec.probe)
            return value
        if len(parts) < 3:
            raise _fail(scorer, spec, value, "a hub file is 'owner/repo/path/in/repo'")
        revision = spec.revision if value == spec.default else None
        return hf_hub_download("/".join(parts[:2]), "/".join(parts[2:]), revision=revision)
    except WeightsNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - offline, missing repo, missing file: same fix
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        raise _fail(scorer, spec, value, f"hub download failed, {reason}") from None


def resolve_weights(name: str, **overrides: str | None) -> dict[str, str]:
    """Resolve every weight of scorer ``name``; keywords as in :data:`WEIGHT_SPECS`."""
    specs = WEIGHT_SPECS[name]
    unknown = set(overrides) - {s.key for s in specs}
    if unknown:
        raise TypeError(
            f"{name}: unknown weight keyword(s) {sorted(unknown)}; known: {[s.key for s in specs]}"
        )
    return {s.key: resolve_weight(name, s, overrides.get(s.key)) for s in specs}


def _open_clip_arch(arch: str) -> str:
    """Return a registered open_clip model name; a JSON path is registered under its stem."""
    import open_clip

    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(
                f"open_clip model config {arch!r} not found (set SDPO_OPENCLIP_ARCH or "
                f"--hpsv2_arch / --clip_arch to an architecture name such as ViT-H-14 or a JSON file)"
            )
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ValueError(
            f"unknown open_clip architecture {arch!r} (SDPO_OPENCLIP_ARCH, --hpsv2_arch, --clip_arch)"
        )
    return arch


def _to_pil_rgb(images):
    return [im.convert("RGB") for im in images]


class Scorer:
    """Base class: ``score(images, prompts) -> Tensor[N]`` in chunks of ``batch_size``.

    Subclasses implement ``_score_batch(images, prompts) -> Tensor[B]`` on ``self.device``.
    """

    name = ""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 16):
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _score_batch(self, images, prompts) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, images: Sequence, prompts: Sequence[str]) -> torch.Tensor:
        """Scores of N (image, prompt) pairs: PIL images, str prompts -> float32 CPU tensor [N]."""
        images, prompts = list(images), list(prompts)
        if len(images) != len(prompts):
            raise ValueError(f"{self.name}: {len(images)} images but {len(prompts)} prompts")
        out = []
        for start in range(0, len(images), self.batch_size):
            chunk = slice(start, start + self.batch_size)
            out.append(self._score_batch(images[chunk], prompts[chunk]).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class PickScoreScorer(Scorer):
    """PickScore: cos(image_embed, text_embed) of PickScore_v1 (no logit_scale)."""

    name = "pickscore"

    def __init__(self, device="cpu", batch_size=16, **weights):
        super().__init__(device, batch_size)
        paths = resolve_weights(self.name, **weights)
        from transformers import CLIPModel, CLIPProcessor

        self.processor = CLIPProcessor.from_pretrained(paths["processor"])
        self.model = CLIPModel.from_pretrained(paths["model"]).eval().to(self.device)

    def _score_batch(self, images, prompts):
        pixels = self.processor(images=_to_pil_rgb(images), return_tensors="pt")["pixel_values"]
        text = self.processor(
            text=list(prompts),
            padding="max_length",
            truncation=True,
            max_length=CLIP_MAX_TOKENS,
            return_tensors="pt",
        )
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text_embeds = self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
        )
        image_embeds = _as_tensor(image_embeds)
        text_embeds = _as_tensor(text_embeds)
        return _cosine(image_embeds, text_embeds)


def _as_tensor(features):
    # transformers 5 may return a model output with the projected features in pooler_output.
    if isinstance(features, torch.Tensor):
        return features
    return features.pooler_output


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of [N, D] x [N, D] -> [N] (each side L2-normalised first)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a * b).sum(-1)


class _OpenClipCosine(Scorer):
    """open_clip model + val transform + tokenizer; score = cosine of normalised features."""

    def _build(self, arch: str):
        import open_clip

        name = _open_clip_arch(arch)
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
        self.tokenizer = open_clip.get_tokenizer(name)
        self.preprocess = preprocess
        return model

    def _score_batch(self, images, prompts):
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        tokens = self.tokenizer(list(prompts)).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True)
        text_features = self.model.encode_text(tokens, normalize=True)
        return _cosine(image_features, text_features)


class HPSv2Scorer(_OpenClipCosine):
    """HPS v2.0: open_clip ViT-H-14 with the HPS checkpoint's ``state_dict`` (strict)."""

    name = "hpsv2"

    def __init__(self, device="cpu", batch_size=16, **weights):
        super().__init__(device, batch_size)
        paths = resolve_weights(self.name, **weights)
        model = self._build(paths["arch"])  # sets open_clip's own val transform
        if paths["preprocess"] == "package":
            self.preprocess = _hps_val_transform(model.visual.image_size)
        checkpoint = _torch_load(paths["checkpoint"])
        state_dict = checkpoint["state_dict"] if "state_dict" in checkpoint else checkpoint
        _load_strict(model, state_dict, f"HPSv2 checkpoint {paths['checkpoint']}")
        self.model = model.eval().to(self.device)


def _hps_val_transform(image_size):
    """The hpsv2 package's val preprocessing (its vendored open_clip
    ``image_transform(is_train=False)``), used only with ``preprocess="package"``.

    Unlike open_clip 3.x (PIL resize), it converts to a tensor first and resizes the tensor
    (bicubic, antialiased); scores move by 1e-4 to 3e-4. The official evaluation scores through
    open_clip's own PIL transform, which is the default.
    """
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms as T

    size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    return T.Compose(
        [
            lambda im: im.convert("RGB"),
            T.ToTensor(),
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD),
        ]
    )


class ClipScorer(_OpenClipCosine):
    """CLIP score: open_clip ViT-H-14 laion2B-s32B-b79K, cosine without logit scale."""

    name = "clip"

    def __init__(self, device="cpu", batch_size=16, **weights):
        super().__init__(device, batch_size)
        paths = resolve_weights(self.name, **weights)
        import open_clip

        model = self._build(paths["arch"])
        open_clip.load_checkpoint(model, paths["checkpoint"], strict=True)
        self.model = model.eval().to(self.device)


class AestheticMLP(torch.nn.Module):
    """LAION improved-aesthetic predictor head: 768->1024->128->64->16->1, dropout, no activations.

    Module indices match the released ``sac+logos+ava1-l14-linearMSE.pth`` keys
    (``layers.{0,2,4,6,7}.weight/bias``). Input: L2-normalised CLIP ViT-L/14 embeds [N, 768].
    """

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(input_size, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticsScorer(Scorer):
    """LAION aesthetics: MLP(normalise(CLIP-L/14 image embeds))."""

    name = "aesthetics"

    def __init__(self, device="cpu", batch_size=16, **weights):
        super().__init__(device, batch_size)
        paths = resolve_weights(self.name, **weights)
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.processor = CLIPImageProcessor.from_pretrained(paths["clip"])
        self.clip = CLIPVisionModelWithProjection.from_pretrained(paths["clip"])
        self.clip = self.clip.eval().to(self.device)
        self.mlp = AestheticMLP(self.clip.config.projection_dim)
        _load_strict(self.mlp, _torch_load(paths["mlp"]), f"aesthetic MLP {paths['mlp']}")
        self.mlp = self.mlp.eval().to(self.device)

    def _score_batch(self, images, prompts):
        pixels = self.processor(images=_to_pil_rgb(images), return_tensors="pt")["pixel_values"]
        embeds = self.clip(pixel_values=pixels.to(self.device)).image_embeds
        embeds = torch.nn.functional.normalize(embeds.float(), dim=-1)
        return self.mlp(embeds).squeeze(-1)


class ImageRewardScorer(Scorer):
    """ImageReward-v1.0 on the package's BLIP modules, batched.

    The BLIP ViT geometry is read from the checkpoint (width, depth, patch, image size; 64-dim
    heads as in every BLIP ViT), so ImageReward.pt gives the package's ViT-L/16 at 224 px and a
    tiny test checkpoint gives a tiny ViT through the same code. The state dict is loaded
    strictly (the package uses strict=False, which would silently ignore wrong keys).
    """

    name = "imagereward"

    def __init__(self, device="cpu", batch_size=16, **weights):
        super().__init__(device, batch_size)
        paths = resolve_weights(self.name, **weights)
        from eval.compat import import_imagereward_blip

        ir = import_imagereward_blip()
        from ImageReward.models.BLIP.med import BertConfig
        from transformers import BertTokenizer

        state_dict = _torch_load(paths["checkpoint"])
        geometry = _blip_vit_geometry(state_dict)
        self.tokenizer = BertTokenizer.from_pretrained(paths["tokenizer"])
        # the two tokens BLIP's init_tokenizer adds (they shift no id of a normal prompt)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})

        config = BertConfig.from_json_file(paths["med_config"])
        model = build_imagereward_net(config, geometry)
        _load_strict(
            model,
            state_dict,
            f"ImageReward checkpoint {paths['checkpoint']}",
            ignorable=("position_ids",),
        )
        self.model = model.eval().to(self.device)
        self.preprocess = ir._transform(geometry["image_size"])

    def _score_batch(self, images, prompts):
        text = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=IMAGEREWARD_MAX_TOKENS,
            return_tensors="pt",
        )
        pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        image_embeds = self.model.blip.visual_encoder(pixels)
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=self.device)
        out = self.model.blip.text_encoder(
            text["input_ids"].to(self.device),
            attention_mask=text["attention_mask"].to(self.device),
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=image_atts,
            return_dict=True,
        )
        cls = out.last_hidden_state[:, 0, :].float()
        raw = self.model.mlp(cls).squeeze(-1)
        return (raw - IMAGEREWARD_MEAN) / IMAGEREWARD_STD


def build_imagereward_net(config, geometry: dict) -> torch.nn.Module:
    """The ImageReward module tree (``blip.{visual_encoder,text_encoder,vision_proj,text_proj}``,
    ``mlp``) with the package's own classes, so its state-dict keys are the package's.

    ``config``: BLIP's ``BertConfig`` (med_config); ``geometry``: see :func:`_blip_vit_geometry`.
    """
    from eval.compat import import_imagereward_blip

    ir = import_imagereward_blip()
    from ImageReward.models.BLIP.med import BertModel
    from ImageReward.models.BLIP.vit import VisionTransformer

    blip = torch.nn.Module()
    blip.visual_encoder = VisionTransformer(
        img_size=geometry["image_size"],
        patch_size=geometry["patch_size"],
        embed_dim=geometry["width"],
        depth=geometry["depth"],
        num_heads=geometry["width"] // 64,
    )
    config.encoder_width = geometry["width"]
    blip.text_encoder = BertModel(config=config, add_pooling_layer=False)
    blip.vision_proj = torch.nn.Linear(geometry["width"], geometry["proj_dim"])
    blip.text_proj = torch.nn.Linear(config.hidden_size, geometry["proj_dim"])
    model = torch.nn.Module()
    model.blip = blip
    model.mlp = ir.MLP(config.hidden_size)
    return model


def _blip_vit_geometry(state_dict: dict) -> dict:
    """ViT hyper-parameters implied by an ImageReward state dict (see ImageRewardScorer)."""
    prefix = "blip.visual_encoder."
    try:
        width = state_dict[prefix + "cls_token"].shape[-1]
        patch = state_dict[prefix + "patch_embed.proj.weight"].shape[-1]
        num_tokens = state_dict[prefix + "pos_embed"].shape[1]
        proj_dim = state_dict["blip.vision_proj.weight"].shape[0]
    except KeyError as err:
        raise ValueError(f"not an ImageReward checkpoint: key {err} missing") from None
    blocks = {
        k[len(prefix) :].split(".")[1] for k in state_dict if k.startswith(prefix + "blocks.")
    }
    side = round((num_tokens - 1) ** 0.5)
    return dict(
        width=width, patch_size=patch, image_size=side * patch, depth=len(blocks), proj_dim=proj_dim
    )


def _torch_load(path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - old pickles (e.g. with numpy scalars) need full unpickling
        return torch.load(path, map_location="cpu", weights_only=False)


def _load_strict(module: torch.nn.Module, state_dict: dict, what: str, ignorable=()) -> None:
    """load_state_dict(strict) with one error listing every missing / unexpected key.

    Keys ending in one of ``ignorable`` (deterministic buffers such as BERT's ``position_ids``)
    may be missing or extra.
    """
    result = module.load_state_dict(state_dict, strict=False)

    def bad(keys):
        return [k for k in keys if not k.endswith(tuple(ignorable))] if ignorable else list(keys)

    missing, unexpected = bad(result.missing_keys), bad(result.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"{what} does not match the model: missing keys {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}, unexpected keys "
            f"{unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}"
        )


SCORERS: dict[str, type[Scorer]] = {
    "pickscore": PickScoreScorer,
    "hpsv2": HPSv2Scorer,
    "clip": ClipScorer,
    "aesthetics": AestheticsScorer,
    "imagereward": ImageRewardScorer,
}


def get_scorer(
    name: str, device: str | torch.device = "cpu", batch_size: int = 16, **weights: str | None
) -> Scorer:
    """Build scorer ``name`` (a key of :data:`SCORERS`); ``weights`` as in :data:`WEIGHT_SPECS`."""
    if name not in SCORERS:
        raise KeyError(f"unknown metric {name!r}; choose from {sorted(SCORERS)}")
    return SCORERS[name](device=device, batch_size=batch_size, **weights)
