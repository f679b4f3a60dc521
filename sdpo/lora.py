"""LoRA training mode (peft): low-rank adapters on the UNet's attention projections.

The policy is the base UNet with adapters; the REFERENCE is the same UNet with its adapters
switched off (:class:`AdapterDisabledReference`), so no second UNet is held in memory. With the
adapters off every LoRA layer computes exactly its frozen base layer, so the reference equals the
starting UNet bit for bit, for every method (Diffusion-DPO / DSPO / DMPO, with or without the
safeguard). At initialisation peft sets ``lora_B = 0``, so the policy also starts equal to the
reference, as in full fine-tuning.

Outputs: the adapter weights in the diffusers LoRA format (``pytorch_lora_weights.safetensors``,
loadable with ``pipe.load_lora_weights(folder)``) and a merged plain UNet ``state_dict``
(``W + (alpha / r) * B @ A`` folded into each wrapped layer) saved as ``unet.pth``, so evaluation
loads it strictly into the base UNet exactly as a fully fine-tuned checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def parse_target_modules(text: str | list | tuple) -> list[str]:
    """``"to_q,to_k"`` -> ``["to_q", "to_k"]`` (a list is returned as a list)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    modules = [m.strip() for m in items if m.strip()]
    if not modules:
        raise ValueError("--lora_target_modules: give at least one module name")
    return modules


def add_lora(
    unet: torch.nn.Module,
    rank: int,
    alpha: float | None = None,
    target_modules=DEFAULT_TARGET_MODULES,
    *,
    init: str | bool = True,
) -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and inject LoRA adapters (adapter name ``"default"``) in place.

    Args:
        rank: LoRA rank r (> 0). alpha: scale numerator (``alpha / r`` multiplies ``B @ A``);
            None means alpha = r (scale 1).
        target_modules: module-name suffixes to wrap (attention q/k/v/out projections by default).
        init: peft's ``init_lora_weights`` (True: ``B = 0``, so the policy starts at the base).
    Returns: the trainable adapter parameters (the only ones with ``requires_grad``).
    Raises ``ValueError`` when no module matches ``target_modules``.
    """
    from peft import LoraConfig

    if rank <= 0:
        raise ValueError(f"--lora_rank must be > 0 to add adapters, got {rank}")
    targets = parse_target_modules(target_modules)
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(alpha if alpha is not None else rank),
        init_lora_weights=init,
        target_modules=targets,
    )
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise ValueError(
            f"--lora_target_modules {targets}: no matching module in the UNet ({err})"
        ) from err
    params = [p for p in unet.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"--lora_target_modules {targets}: no adapter parameter was created")
    return params


def has_lora(unet: torch.nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) for m in _unwrap(unet).modules())


@contextlib.contextmanager
def adapters_disabled(unet: torch.nn.Module):
    """Inside the block every LoRA layer computes only its base layer (peft's disabled-adapter
    mode); adapters are re-enabled on exit, also on error, so a later backward recomputation
    (gradient checkpointing) sees the policy again."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in _unwrap(unet).modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterDisabledReference:
    """Stands in for the frozen reference UNet: ``ref(x, t, **cond)`` runs the policy's own UNet
    with its adapters off (the base weights), so the reference costs no extra memory.

    Call it under ``torch.no_grad()`` as a reference UNet (``sdpo.step`` does)."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = _unwrap(unet)

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.unet):
            return self.unet(*args, **kwargs)

    @property
    def dtype(self):
        return self.unet.dtype


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in the diffusers LoRA naming (``unet.…lora.down/up.weight``)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(_unwrap(unet)))


@torch.no_grad()
def merged_unet_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A plain UNet ``state_dict`` (the base model's keys) with every active adapter folded in:
    ``W' = W + (alpha / r) · B @ A`` per wrapped layer. Only the merged weights are new tensors;
    the module itself is unchanged."""
    from peft.tuners.lora import LoraLayer

    model = _unwrap(unet)
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            adapters = [a for a in module.active_adapters if a in module.lora_A]
            if adapters:
                deltas[f"{name}.weight"] = sum(module.get_delta_weight(a) for a in adapters)
    merged = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key:
            continue
        key = key.replace(".base_layer.", ".")
        if key in deltas:
            value = (value.float() + deltas[key].float()).to(value.dtype)
        merged[key] = value
    return merged


def save_lora_weights(unet: torch.nn.Module, output_dir: str | os.PathLike, family) -> Path:
    """Write ``output_dir/pytorch_lora_weights.safetensors`` (diffusers LoRA format of the
    ``family``'s pipeline, the adapter config in its metadata) atomically; returns the path."""
    from sdpo import io

    model = _unwrap(unet)
    # The adapter config (rank, alpha, targets) travels in the file's metadata: without it a loader
    # assumes alpha = rank and rescales the update.
    config = model.peft_config["default"].to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    path = Path(output_dir) / LORA_WEIGHT_NAME

    def write(tmp: Path) -> None:
        # diffusers writes a fixed file name into a folder: write it beside, then move it.
        with tempfile.TemporaryDirectory(dir=tmp.parent) as folder:
            # The keyword names the denoiser: unet_lora_layers, or transformer_lora_layers for
            # the SD3 / FLUX pipelines (the family's lora_layers_prefix).
            prefix = family.lora_layers_prefix
            family.pipeline_class().save_lora_weights(
                folder,
                **{
                    f"{prefix}_lora_layers": lora_state_dict(model),
                    f"{prefix}_lora_adapter_metadata": config,
                },
                safe_serialization=True,
            )
            os.replace(Path(folder) / LORA_WEIGHT_NAME, tmp)

    return io.atomic_write(path, write)


def save_lora_if_any(unet: torch.nn.Module, output_dir, family) -> Path | None:
    """:func:`save_lora_weights` when ``unet`` has adapters (checkpoints, final outputs)."""
    return save_lora_weights(unet, output_dir, family) if has_lora(unet) else None


def save_lora(unet: torch.nn.Module, output_dir: str | os.PathLike, family) -> dict:
    """Write the LoRA file (:func:`save_lora_weights`) and ``output_dir/unet.pth`` (the merged
    plain state_dict), each atomically. Returns their paths."""
    from sdpo import io

    root = Path(output_dir)
    lora_path = save_lora_weights(unet, root, family)
    merged = merged_unet_state_dict(unet)
    unet_path = io.save_torch(
        {k: v.detach().cpu().contiguous() for k, v in merged.items()}, root / "unet.pth"
    )
    return {"lora": lora_path, "unet_pth": unet_path}


def _unwrap(model):
    """Strip DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model
