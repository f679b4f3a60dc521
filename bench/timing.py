"""Timing and device helpers of the benchmarks: synchronised wall-clock timing, peak memory,
freeing a row's models, autocast as training's accelerator applies it, CPU threads."""

from __future__ import annotations

import contextlib
import datetime
import gc
import time

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def free(device) -> None:
    if is_cuda(device):  # (on a CPU, dropped references free the memory; gc costs seconds)
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if is_cuda(device) else None


def autocast_ctx(device, dtype):
    """What ``accelerator.autocast`` gives training: autocast in the mixed-precision dtype."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


class Autocast(torch.nn.Module):
    """Runs the wrapped denoiser under autocast (what ``accelerator.prepare`` does in training)."""

    def __init__(self, module, device, dtype):
        super().__init__()
        self.module, self.device, self.dtype = module, device, dtype

    def forward(self, *args, **kwargs):
        with autocast_ctx(self.device, self.dtype):
            return self.module(*args, **kwargs)


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def prepare_device(device) -> str:
    """Card name; TF32 on for CUDA (as ``--allow_tf32``)."""
    if is_cuda(device):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        return torch.cuda.get_device_name(device)
    return "CPU"


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run with ``n`` intra-op CPU threads (None: unchanged). The tiny models' matrices gain
    nothing from threads, and on a shared CPU spinning threads make them 10x slower."""
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
