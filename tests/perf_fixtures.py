"""Shared helpers of the performance tests (arch, cache, LoRA, bench): tiny pipelines on CPU."""

from __future__ import annotations

from pathlib import Path


def patch_tiny_scheduler() -> None:
    """sdpo/tiny.py passes ``set_alpha_to_one`` to DDPMScheduler, which diffusers 0.42 rejects;
    build the same schedule from sdpo.arch's explicit config instead (until fixed there)."""
    import sdpo.tiny as tiny

    try:
        tiny._scheduler()
    except TypeError:
        from sdpo.arch import build_scheduler

        tiny._scheduler = build_scheduler


def tiny_sd15(path: Path, **kw) -> Path:
    from sdpo.tiny import build_tiny_sd15

    patch_tiny_scheduler()
    return build_tiny_sd15(path, **kw)


def tiny_sdxl(path: Path, **kw) -> Path:
    from sdpo.tiny import build_tiny_sdxl

    patch_tiny_scheduler()
    return build_tiny_sdxl(path, **kw)
