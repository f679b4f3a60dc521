"""Generate the evaluation images of a prompt set with an SD1.5 or SDXL pipeline (diffusers).

    python -m eval.generate --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --unet_path runs/x/checkpoint-2000/unet.pth --prompts papv2 --outdir runs/x/eval
    accelerate launch -m eval.generate ...        # the missing images shared over the GPUs

Semantics of the reference evaluation (reference/formulas.md, "Generation semantics"), all
defaults here:

* ``EulerDiscreteScheduler`` built from the base model's scheduler config, 50 steps.
* Guidance ``eps = cond + cfg * (cond - uncond)`` with an EMPTY negative prompt. diffusers writes
  ``uncond + g * (cond - uncond)``, so ``--cfg 7.5`` is run as ``guidance_scale = cfg + 1 = 8.5``.
* One initial noise for every prompt: ``randn(1, 4, H/f, W/f)`` (``f`` = the VAE's downsampling)
  from a generator seeded with ``--seed``, drawn on the GPU when running on CUDA (as the reference)
  and on the CPU otherwise, in the UNet's dtype; the pipeline multiplies it by
  ``init_noise_sigma``. A batch repeats this one noise, so batching does not change the images
  (up to floating-point rounding).
* UNet and text encoders in ``--dtype`` (bf16), the VAE in fp32, decoded one image at a time.
  SDXL uses the ``madebyollin/sdxl-vae-fp16-fix`` VAE and 1024x1024 (SD1.5: the base VAE,
  512x512); the SDXL pipeline's size conditioning is ``time_ids = [H, W, 0, 0, H, W]``.
* ``--unet_path``: a ``unet.pth`` (plain UNet ``state_dict``, torch.save; ``.safetensors`` too)
  loaded STRICTLY into the base model's UNet, or a diffusers UNet folder (or a folder holding
  ``unet/`` or ``unet.pth``); omitted = the base model's UNet.

Outputs, named as the reference: ``{outdir}/{set}_seed{S}_{H}x{W}_{steps}s_{cfg}cfg.json`` (the
manifest: a JSON list, one entry per prompt with ``prompt``, ``gen_image_path`` (relative to the
manifest's folder), ``raw_image_path``, ``metadata``) and the images
``{outdir}/{same stem}/{index}_{H}x{W}.png``. Every PNG is written atomically; a rerun skips the
images that exist (resume) and rewrites the manifest, without loading any model when nothing is
missing.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from eval.prompts import PromptSetError, load_prompt_entries, set_name
from sdpo import io
from sdpo.cli import arg, parse
from sdpo.families import FAMILIES, ModelSource, detect_family, get_family, read_configs

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# Run settings a resumed run must share with the images already written (the rest of the
# settings are in the file names).
PROVENANCE_KEYS = (
    "base_model",
    "family",
    "unet_path",
    "unet_sha256",
    "vae",
    "dtype",
    "prompts_sha256",
)
# Weight files of a diffusers model folder that make up its content hash.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".json")


class GenerationError(RuntimeError):
    """Bad input to the generation (raised before any model is loaded where possible)."""


@dataclass
class GenerateConfig:
    """Options of ``python -m eval.generate`` (see ``--help``)."""

    prompts: str = arg(
        help="prompt set name (papv2, hpsv2, partiprompts, smoke) or a .json/.txt prompt file",
        required=True,
    )
    outdir: str = arg(help="output folder of manifest and image folder", required=True)
    pretrained_model_name_or_path: str | None = arg(
        None,
        "base pipeline (hub id or folder); default: the model family's base model "
        f"({', '.join(f'{f.name}: {f.default_base}' for f in FAMILIES.values())})",
    )
    sdxl: bool | None = arg(
        None,
        "SDXL pipeline (default: the family is detected from the base model's configs; "
        "--no-sdxl forces SD1.5)",
        flags=["--sdxl", "--no-sdxl"],
    )
    vae: str = arg(
        "auto",
        "VAE: 'auto' (the family's evaluation VAE: the fp16-fix VAE for SDXL, the base "
        "model's otherwise), 'base', or a hub id / folder",
    )
    unet_path: str | None = arg(
        None,
        "unet.pth (state_dict, loaded strictly into the base model's denoiser), a diffusers "
        "UNet / transformer folder, or LoRA weights (a diffusers LoRA .safetensors, or a folder "
        "holding pytorch_lora_weights.safetensors) loaded with the pipeline's load_lora_weights;"
        " default: the base model's",
    )
    seed: int = arg(0, "seed of the one shared initial noise")
    size: int | None = arg(None, "image side (default: the family's, 512 / SDXL 1024)")
    height: int | None = arg(None, "image height (default --size)")
    width: int | None = arg(None, "image width (default --size)")
    steps: int | None = arg(
        None, "Euler steps (default: the family's; 50, SD3.5 40, FLUX 28; see sdpo.families)"
    )
    cfg: float | None = arg(
        None,
        "guidance as cond + cfg*(cond - uncond), i.e. diffusers guidance_scale = cfg + 1 "
        "(FLUX: its embedded guidance); default: the family's (7.5, SD3.5 3.5, FLUX 2.5)",
    )
    batch_size: int = arg(1, "prompts per pipeline call")
    limit: int | None = arg(
        None, "only the first N prompts (the manifest then lists those; same file name)"
    )
    dtype: str = arg("bf16", "UNet/text encoder dtype (VAE: fp32)", choices=list(DTYPES))
    device: str | None = arg(None, "e.g. cuda:0 or cpu (default: accelerate's)")
    prompts_dir: str | None = arg(None, "folder where set names are looked up")
    print_manifest_path: bool = arg(
        False, "check the inputs, print the manifest path this command writes, and exit"
    )


def parse_args(argv: list[str] | None = None) -> GenerateConfig:
    return parse(
        GenerateConfig,
        argv,
        prog="python -m eval.generate",
        description="Generate one image per prompt with a diffusion pipeline (reference semantics).",
    )


# ----------------------------------------------------------------------------------------------
# Input checks (no model loading)


def resolve_family(cfg: GenerateConfig):
    """``(base model, family)`` from the flags and the base model's configs.

    The family is detected from the configs (:func:`sdpo.families.detect_family`); only when they
    cannot be read (a hub id not in the local cache, offline) do the flags decide."""
    flagged = None if cfg.sdxl is None else get_family("sdxl" if cfg.sdxl else "sd15")
    base = cfg.pretrained_model_name_or_path or (flagged or get_family("sd15")).default_base
    local = Path(base).expanduser()
    if local.is_dir() and not (local / "model_index.json").is_file():
        raise GenerationError(f"{base} is a folder without model_index.json (not a pipeline)")
    try:
        configs = read_configs(ModelSource(base))
    except ValueError:
        if local.is_dir():
            raise
        return base, flagged or get_family("sd15")  # offline, not cached: loading will report
    try:
        family = detect_family(configs, base)
    except ValueError as err:
        raise GenerationError(str(err)) from None
    if flagged is not None and flagged is not family:
        flag = "--sdxl" if cfg.sdxl else "--no-sdxl"
        raise GenerationError(
            f"{base} is a {family.name} pipeline ({configs.index.get('_class_name')}) but {flag}"
        )
    return base, family


def _is_lora_file(path: Path) -> bool:
    """Whether a .safetensors file holds LoRA adapters (diffusers / peft key names), read from its
    JSON header alone (no torch import)."""
    if path.suffix != ".safetensors":
        return False
    try:
        with path.open("rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            keys = json.loads(fh.read(size)) if 0 < size < 1 << 27 else {}
    except (OSError, ValueError):
        return False
    return any(".lora" in k for k in keys if k != "__metadata__")


def resolve_unet_path(unet_path: str | None) -> tuple[str, str | None]:
    """('base'|'state_dict'|'folder'|'lora', path): what --unet_path points at."""
    if not unet_path:
        return "base", None
    p = Path(unet_path)
    if p.is_file():
        return ("lora" if _is_lora_file(p) else "state_dict"), str(p)
    if p.is_dir():
        if (p / "config.json").is_file():
            return "folder", str(p)
        if (p / "unet" / "config.json").is_file():
            return "folder", str(p / "unet")
        for name in ("unet.pth", "unet.safetensors"):
            if (p / name).is_file():
                return "state_dict", str(p / name)
        if (p / LORA_WEIGHT_NAME).is_file():
            return "lora", str(p / LORA_WEIGHT_NAME)
        raise GenerationError(
            f"--unet_path {p} is a folder with neither a UNet config.json, unet/config.json, "
            f"unet.pth nor {LORA_WEIGHT_NAME}"
        )
    raise GenerationError(f"--unet_path not found: {p}")


def output_stem(set_label: str, seed: int, height: int, width: int, steps: int, cfg: float):
    """The reference's name: ``{set}_seed{S}_{H}x{W}_{steps}s_{cfg}cfg`` (cfg as Python float)."""
    return f"{set_label}_seed{seed}_{height}x{width}_{steps}s_{float(cfg)}cfg"


def image_name(index: int, height: int, width: int) -> str:
    return f"{index}_{height}x{width}.png"


@dataclass
class Plan:
    """Everything decided before loading models."""

    base: str
    family: object  # sdpo.families.ModelFamily
    unet_kind: str
    unet_file: str | None
    vae: str | None  # None: the base model's VAE
    height: int
    width: int
    entries: list[dict]
    manifest: Path
    image_dir: Path
    provenance: dict
    created: list[Path] = field(default_factory=list)  # folders this run made (innermost last)


def weights_sha256(unet_kind: str, unet_file: str | None) -> str | None:
    """Content hash of the denoiser weights given by ``--unet_path`` (None: the base model's).

    A file: sha256 of its bytes. A folder: sha256 over the sorted (name, sha256) of its weight and
    config files. Recorded in the manifest and the image folder, so that a ``unet.pth`` replaced
    at the same path is not served from the images of the old weights."""
    if unet_kind == "base" or not unet_file:
        return None
    path = Path(unet_file)
    if path.is_file():
        return _sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES):
        h.update(f"{f.name}\0{_sha256_file(f)}\n".encode())
    return h.hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def make_plan(cfg: GenerateConfig, *, hash_weights: bool = True) -> Plan:
    """Check every input and decide names; raises GenerationError/PromptSetError (no models).

    ``hash_weights=False`` skips reading the weights (only the names are wanted)."""
    for name in ("steps", "batch_size"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise GenerationError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise GenerationError(f"--limit must be >= 1, got {cfg.limit}")
    if cfg.dtype not in DTYPES:
        raise GenerationError(f"--dtype must be one of {list(DTYPES)}, got {cfg.dtype}")
    entries = load_prompt_entries(cfg.prompts, cfg.prompts_dir)
    # Hash of the whole set (before --limit), so that a resumed run may change --limit.
    prompts_sha = hashlib.sha256(
        json.dumps([e["prompt"] for e in entries], ensure_ascii=False).encode()
    ).hexdigest()
    if cfg.limit is not None:
        entries = entries[: cfg.limit]
    base, family = resolve_family(cfg)
    if not family.text_to_image:
        raise GenerationError(
            f"{base} is a {family.name} model ({family.description}): it refines an image and "
            "cannot generate from a prompt alone; evaluate the base model it refines"
        )
    # Per-family sampling defaults (recorded in the manifest's provenance and file name).
    if cfg.steps is None:
        cfg.steps = family.eval_steps
    if cfg.cfg is None:
        cfg.cfg = family.eval_cfg
    sdxl = family.name == "sdxl"
    unet_kind, unet_file = resolve_unet_path(cfg.unet_path)
    size = cfg.size or family.default_resolution
    height, width = cfg.height or size, cfg.width or size
    for side, v in (("height", height), ("width", width)):
        if v < 8 or v % 8:
            raise GenerationError(f"image {side} must be a positive multiple of 8, got {v}")
    if cfg.vae in ("auto", "", None):
        vae = family.eval_vae
    elif cfg.vae in ("base", "none"):
        vae = None
    else:
        vae = cfg.vae
    stem = output_stem(set_name(cfg.prompts), cfg.seed, height, width, cfg.steps, cfg.cfg)
    outdir = Path(cfg.outdir)
    provenance = {
        "base_model": base,
        "family": family.name,
        "sdxl": sdxl,
        "unet_path": str(Path(unet_file).resolve()) if unet_file else None,
        "unet_sha256": weights_sha256(unet_kind, unet_file) if hash_weights else None,
        "vae": vae or "base",
        "dtype": cfg.dtype,
        "prompts_sha256": prompts_sha,
        "seed": cfg.seed,
        "height": height,
        "width": width,
        "steps": cfg.steps,
        "cfg": cfg.cfg,
        "guidance_scale": cfg.cfg + 1.0,
        "scheduler": family.eval_scheduler_class_name,
        "negative_prompt": "",
    }
    return Plan(
        base=base,
        family=family,
        unet_kind=unet_kind,
        unet_file=unet_file,
        vae=vae,
        height=height,
        width=width,
        entries=entries,
        manifest=outdir / f"{stem}.json",
        image_dir=outdir / stem,
        provenance=provenance,
    )


# ----------------------------------------------------------------------------------------------
# Files


def _write_json(path: Path, obj) -> None:
    io.write_json(path, obj, indent=2, ensure_ascii=False)


def _save_png(image, path: Path, prompt: str) -> None:
    """The PNG, atomically, with its prompt: EXIF ImageDescription as the reference writes it
    (ASCII only), and a UTF-8 PNG text chunk "prompt" that keeps any character."""
    from PIL import ExifTags, Image, PngImagePlugin

    exif = Image.Exif()
    exif[ExifTags.Base.ImageDescription] = prompt
    text = PngImagePlugin.PngInfo()
    text.add_itxt("prompt", prompt)
    io.save_image(image, path, format="PNG", exif=exif, pnginfo=text)


def check_resumable(plan: Plan) -> None:
    """Images already in the folder must come from the same run settings (base model, UNet, VAE,
    dtype, prompts): otherwise resuming would mix two models' images. Read-only (any process)."""
    record = plan.image_dir / "generation_config.json"
    if not record.is_file() or not any(plan.image_dir.glob("*.png")):
        return
    old = json.loads(record.read_text())
    # a record written before weight hashes existed says nothing about them: not a difference
    keys = [k for k in PROVENANCE_KEYS if k != "unet_sha256" or "unet_sha256" in old]
    diff = [k for k in keys if old.get(k) != plan.provenance.get(k)]
    if diff:
        details = "; ".join(f"{k}: {old.get(k)!r} -> {plan.provenance.get(k)!r}" for k in diff)
        what = (
            "the weights at --unet_path changed since those images were generated; "
            if diff == ["unet_sha256"]
            else ""
        )
        raise GenerationError(
            f"{plan.image_dir} holds images of a different run ({what}{details}). To regenerate "
            f"with these settings, delete {plan.image_dir} and {plan.manifest} (and its "
            ".scores.jsonl / .summary.json) and rerun the same command, or use another --outdir"
        )


def discard_if_empty(plan: Plan) -> None:
    """After a failure before any image was written: remove the image folder this run created
    (no empty folder is left behind, e.g. when the weights do not fit the model)."""
    d = plan.image_dir
    if not d.is_dir() or any(d.glob("*.png")):
        return
    (d / "generation_config.json").unlink(missing_ok=True)
    io.remove_stale(d)
    # the image folder, and the folders above it that this run created, if now empty
    for folder in [d, *[c for c in reversed(plan.created) if c != d]]:
        try:
            folder.rmdir()
        except OSError:
            break  # something else is in there: not ours to delete


def prepare_output(plan: Plan) -> None:
    """Main process: create the image folder, drop leftovers of interrupted writes, record the
    run settings."""
    missing = [d for d in (plan.image_dir, *plan.image_dir.parents) if not d.exists()]
    plan.created = missing[::-1]
    plan.image_dir.mkdir(parents=True, exist_ok=True)
    io.remove_stale(plan.image_dir)
    _write_json(plan.image_dir / "generation_config.json", plan.provenance)


def missing_indices(plan: Plan) -> list[int]:
    return [
        i
        for i in range(len(plan.entries))
        if not (plan.image_dir / image_name(i, plan.height, plan.width)).is_file()
    ]


def write_manifest(plan: Plan) -> Path:
    """The reference manifest over all prompts; every image must exist."""
    rows, absent = [], []
    for i, entry in enumerate(plan.entries):
        name = image_name(i, plan.height, plan.width)
        if not (plan.image_dir / name).is_file():
            absent.append(i)
        metadata = dict(entry.get("metadata") or {})
        metadata.update(index=i, **plan.provenance)
        rows.append(
            {
                "prompt": entry["prompt"],
                "gen_image_path": f"{plan.image_dir.name}/{name}",  # relative to the manifest
                "raw_image_path": entry.get("raw_image_path", ""),
                "metadata": metadata,
            }
        )
    if absent:
        raise GenerationError(
            f"{len(absent)} image(s) missing in {plan.image_dir} (e.g. indices {absent[:5]}); "
            "rerun the same command to generate them"
        )
    _write_json(plan.manifest, rows)
    return plan.manifest


# ----------------------------------------------------------------------------------------------
# Models


def load_unet_strict(unet, path: str) -> None:
    """Load ``path`` into ``unet`` requiring the exact same keys and shapes (one clear error)."""
    from sdpo.families.weights import load_state_dict_file, load_strict

    try:
        load_strict(unet, load_state_dict_file(path), path)
    except ValueError as err:
        raise GenerationError(str(err)) from None


def _dtype_kwarg(dtype) -> dict:
    """``dtype=`` on diffusers releases that renamed ``torch_dtype`` (deprecated there)."""
    try:
        from diffusers.utils.deprecation_utils import _TORCH_DTYPE_DEPRECATION_MESSAGE  # noqa: F401

        return {"dtype": dtype}
    except ImportError:
        return {"torch_dtype": dtype}


def _from_pretrained(cls, name: str, what: str, **kw):
    try:
        return cls.from_pretrained(name, **kw)
    except (OSError, ValueError) as e:
        raise GenerationError(
            f"could not load the {what} from '{name}' ({type(e).__name__}: {e}). Download it "
            f"first (`hf download {name}`) or pass a local folder"
        ) from e


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' (and sdpo.lora's) file name


def load_pipeline(plan: Plan, dtype_name: str, device):
    """The family's diffusers pipeline of ``plan`` with the reference components, on ``device``."""
    import diffusers
    import torch

    family = plan.family
    dtype = getattr(torch, DTYPES[dtype_name])
    denoiser_cls = family.denoiser_class()
    sub = family.denoiser_subfolder
    if plan.unet_kind == "folder":
        unet = _from_pretrained(denoiser_cls, plan.unet_file, sub, **_dtype_kwarg(dtype))
    else:
        unet = _from_pretrained(
            denoiser_cls, plan.base, f"base {sub}", subfolder=sub, **_dtype_kwarg(dtype)
        )
        if plan.unet_kind == "state_dict":
            load_unet_strict(unet, plan.unet_file)
    if plan.vae is None:
        vae_kw = dict(subfolder="vae")
        vae_src = plan.base
    else:
        vae_src = plan.vae
        vae_kw = dict(subfolder="vae") if (Path(vae_src) / "vae" / "config.json").is_file() else {}
    vae_kw.update(_dtype_kwarg(torch.float32))
    vae = _from_pretrained(diffusers.AutoencoderKL, vae_src, "VAE", **vae_kw)
    scheduler_cls = getattr(diffusers, family.eval_scheduler_class_name)
    scheduler = _from_pretrained(
        scheduler_cls, plan.base, "scheduler config", subfolder="scheduler"
    )
    pipe = _from_pretrained(
        family.pipeline_class(), plan.base, "base pipeline", **{sub: unet}, vae=vae,
        scheduler=scheduler, **_dtype_kwarg(dtype), **family.pipeline_kwargs(),
    )  # fmt: skip
    if plan.unet_kind == "lora":
        lora = Path(plan.unet_file)
        try:
            pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        except (OSError, ValueError, KeyError) as e:
            raise GenerationError(f"could not load the LoRA weights {lora}: {e}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def family_of_pipeline(pipe):
    """The registered family whose diffusers pipeline class ``pipe`` is (callers without a plan:
    the bench)."""
    name = type(pipe).__name__
    for family in FAMILIES.values():
        if family.pipeline_class_name == name:
            return family
    raise GenerationError(f"no model family generates with {name}")


def shared_noise(pipe, height: int, width: int, seed: int, device, family=None):
    """The reference's one initial noise ``randn(1, C, H/f, W/f)``, shape [1, C, H/f, W/f], in
    the layout the family's pipeline takes (FLUX: packed, ``[1, h/2·w/2, 4C]``).

    Drawn on the GPU when running on CUDA (the reference's generator device) and on the CPU
    otherwise, directly in the denoiser's dtype as the reference does.
    """
    import torch

    family = family or family_of_pipeline(pipe)
    denoiser = getattr(pipe, family.denoiser_subfolder)
    gen_device = torch.device(device) if torch.device(device).type == "cuda" else "cpu"
    gen = torch.Generator(device=gen_device).manual_seed(seed)
    return family.initial_noise(
        denoiser.config, pipe.vae_scale_factor, height, width, gen, gen_device, denoiser.dtype
    )


def generate_batch(pipe, prompts: list[str], noise, plan: Plan, cfg: GenerateConfig):
    """PIL images of ``prompts``, all started from ``noise`` [1, C, h, w]."""
    import numpy as np
    import torch
    from PIL import Image

    latents = noise.to(pipe.device).expand(len(prompts), *noise.shape[1:]).clone()
    out = pipe(
        prompt=prompts,
        negative_prompt=[""] * len(prompts),  # the reference encodes "" (no zeroed SDXL uncond)
        height=plan.height,
        width=plan.width,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.cfg + 1.0,  # cond + cfg*(cond-uncond) == uncond + (cfg+1)*(cond-uncond)
        latents=latents,  # the pipeline multiplies by init_noise_sigma
        output_type="latent",
    )
    vae = pipe.vae
    images = []
    family = getattr(plan, "family", None) or family_of_pipeline(pipe)
    latents = family.output_latents(out.images, plan.height, plan.width, pipe.vae_scale_factor)
    with torch.no_grad():
        for lat in latents:  # one at a time: fp32 decodes of 1024^2 are memory-hungry
            x = lat[None].to(device=vae.device, dtype=torch.float32) / vae.config.scaling_factor
            if getattr(vae.config, "shift_factor", None) is not None:
                x = x + vae.config.shift_factor
            x = vae.decode(x, return_dict=False)[0]
            x = (x / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
            images.append(Image.fromarray((x * 255).round().astype(np.uint8)))
    return images


# ----------------------------------------------------------------------------------------------
# Driver


def run(cfg: GenerateConfig, state) -> Path:
    """Generate this process's share of the missing images, then (main) write the manifest.

    ``state`` is an ``accelerate.PartialState`` (or an object with ``process_index``,
    ``num_processes``, ``is_main_process``, ``device`` and ``wait_for_everyone()``).
    """
    plan = make_plan(cfg)
    check_resumable(plan)
    if state.is_main_process:
        prepare_output(plan)
    try:
        return _run_planned(plan, cfg, state)
    except BaseException:
        if state.is_main_process:
            discard_if_empty(plan)
        raise


def _run_planned(plan: Plan, cfg: GenerateConfig, state) -> Path:
    from tqdm.auto import tqdm

    state.wait_for_everyone()
    todo = missing_indices(plan)
    # Every process must list the missing images before anyone writes new ones.
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    if state.is_main_process:
        print(
            f"{plan.manifest.stem}: {len(plan.entries)} prompts, {len(todo)} to generate "
            f"over {state.num_processes} process(es)",
            flush=True,
        )
    if mine:
        device = cfg.device or state.device
        pipe = load_pipeline(plan, cfg.dtype, device)
        noise = shared_noise(pipe, plan.height, plan.width, cfg.seed, device, plan.family)
        bar = tqdm(total=len(mine), desc="generate", disable=not state.is_main_process)
        for start in range(0, len(mine), cfg.batch_size):
            idx = mine[start : start + cfg.batch_size]
            prompts = [plan.entries[i]["prompt"] for i in idx]
            for i, image in zip(idx, generate_batch(pipe, prompts, noise, plan, cfg)):
                path = plan.image_dir / image_name(i, plan.height, plan.width)
                _save_png(image, path, plan.entries[i]["prompt"])
            bar.update(len(idx))
        bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        write_manifest(plan)
        print(f"manifest: {plan.manifest}", flush=True)
    return plan.manifest


def main(cfg: GenerateConfig) -> Path:
    if cfg.print_manifest_path:  # for scripts: the name without generating (nor importing torch)
        manifest = make_plan(cfg, hash_weights=False).manifest
        print(manifest, flush=True)
        return manifest
    from accelerate import PartialState

    # cpu=True lets several CPU processes (torchrun / accelerate launch --cpu) form a gloo group.
    return run(cfg, PartialState(cpu=cfg.device == "cpu"))


if __name__ == "__main__":
    _cfg = parse_args()
    try:
        main(_cfg)
    except (GenerationError, PromptSetError) as e:
        sys.exit(f"error: {e}")
