"""Atomic, prunable, exactly-resumable checkpoints and the final UNet outputs.

Layout of ``output_dir``::

    checkpoint-N/            accelerate state (model, optimizer, scheduler, RNG of every process)
        unet.pth             plain UNet state_dict (torch.save), what the evaluation loads
        trainer_state.json   global_step, epoch, batches_in_epoch, seed, counters
    unet.pth                 final UNet state_dict (LoRA runs: merged weights)
    unet/                    final UNet as a diffusers folder (safetensors)
    pytorch_lora_weights.safetensors   LoRA runs only (also in each checkpoint)
    train_log.jsonl          one JSON object per optimizer step

A checkpoint is written into ``checkpoint-N.tmp`` and renamed only when complete, so a kill during
a save never leaves a broken ``checkpoint-N`` (a stale ``.tmp`` is ignored and removed later).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from sdpo import io

logger = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir`` as ``(step, path)``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``'latest'`` -> newest complete checkpoint or None (fresh start); a path -> that path."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1][1] if found else None
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume_from_checkpoint: {str(path)!r} is not a complete checkpoint")
    return path


def read_state(checkpoint: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def prune(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoints so that at most ``keep`` remain; returns the deleted ones."""
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        shutil.rmtree(p)
        logger.info("pruned %s", p)
    return doomed


def save_checkpoint(
    accelerator, unet, family, output_dir, step: int, state: dict, total_limit=None
):
    """Save ``checkpoint-<step>`` atomically (collective: every process must call it).

    Prunes to ``total_limit - 1`` old checkpoints first, so ``total_limit`` remain after the save.
    """
    root = Path(output_dir)
    final, tmp = root / f"checkpoint-{step}", root / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        if total_limit is not None:
            prune(root, total_limit - 1)
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed earlier
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    unet_state = _eval_state(accelerator, unet)  # collective (gathers under DeepSpeed)
    if accelerator.is_main_process:
        io.save_torch(unet_state, tmp / "unet.pth")
        _save_lora(accelerator, unet, family, tmp)
        io.write_json(tmp / STATE_FILE, {**state, "global_step": step})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        logger.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def _eval_state(accelerator, unet) -> dict:
    """The plain UNet state_dict evaluation loads (LoRA: merged), on every process."""
    from sdpo.perf import unet_state_for_eval

    return unet_state_for_eval(accelerator, unet)


def _save_lora(accelerator, unet, family, folder: Path) -> None:
    """LoRA runs also keep the adapters alone (diffusers' pytorch_lora_weights.safetensors)."""
    from sdpo.lora import save_lora_if_any

    save_lora_if_any(accelerator.unwrap_model(unet, keep_torch_compile=False), folder, family)


def load_checkpoint(accelerator, checkpoint) -> dict:
    """Restore model, optimizer, scheduler and RNG states; return the trainer state dict."""
    accelerator.load_state(str(checkpoint))
    state = read_state(checkpoint)
    logger.info("resumed from %s at step %d", checkpoint, state["global_step"])
    return state


def truncate_log(output_dir, step: int) -> None:
    """Drop ``train_log.jsonl`` lines after ``step`` (a resumed run rewrites them)."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
    io.write_text(path, "".join(ln + "\n" for ln in kept))


def save_final(accelerator, unet, family, output_dir) -> dict:
    """Write ``output_dir/unet.pth`` and ``output_dir/unet/`` (collective); returns their paths."""
    root = Path(output_dir)
    unet_state = _eval_state(accelerator, unet)
    paths = {"unet_pth": root / "unet.pth", "unet_dir": root / "unet"}
    if accelerator.is_main_process:
        io.save_torch(unet_state, paths["unet_pth"])
        _save_lora(accelerator, unet, family, root)
        model = accelerator.unwrap_model(unet, keep_torch_compile=False)
        # A plain denoiser of the same config (LoRA: the merged weights), as diffusers loads it.
        plain = type(model).from_config(model.config)
        plain.load_state_dict(unet_state, strict=True)
        with io.atomic_dir(paths["unet_dir"]) as tmp_dir:
            plain.save_pretrained(tmp_dir, safe_serialization=True)
    accelerator.wait_for_everyone()
    return paths
