"""Atomic file writes: every output of the project goes through here.

A file is written under a temporary name in its own folder and renamed over the final name only
when complete (``os.replace`` is atomic on one filesystem), so a kill at any moment leaves either
the old file or the new one, never a truncated one. Temporary names are ``.{name}.tmp-{pid}``:
hidden, unique per process (two processes never share one), and found by :func:`remove_stale`.

This module imports nothing heavy (torch and safetensors only inside the functions that need
them), so evaluation and scripts can use it without the training stack.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_MARK = ".tmp-"


def tmp_path(path: str | os.PathLike) -> Path:
    """The temporary name a write of ``path`` goes through (same folder, hidden, per process)."""
    path = Path(path)
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` to produce the file at a temporary path, then rename it to ``path``.

    On any error the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | os.PathLike, obj, *, indent: int | None = 1, **kwargs) -> Path:
    """JSON (UTF-8, a trailing newline). ``kwargs`` go to :func:`json.dumps`."""
    return write_text(path, json.dumps(obj, indent=indent, **kwargs) + "\n")


def write_jsonl(path: str | os.PathLike, rows) -> Path:
    """One JSON object per line (the whole file rewritten atomically)."""
    return write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def save_torch(obj, path: str | os.PathLike) -> Path:
    """``torch.save`` of ``obj`` (a state dict, usually)."""
    import torch

    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """A safetensors file of contiguous CPU tensors."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def save_image(image, path: str | os.PathLike, **save_kwargs) -> Path:
    """A PIL image; the format comes from ``path``'s suffix unless ``format=`` is given."""
    fmt = save_kwargs.pop("format", None) or Path(path).suffix.lstrip(".").upper() or "PNG"
    fmt = "JPEG" if fmt == "JPG" else fmt
    return atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **save_kwargs))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, replace: bool = True) -> Iterator[Path]:
    """Build a folder under ``{path}.tmp`` and rename it to ``path`` when the block succeeds.

    A leftover ``.tmp`` folder of an earlier, killed attempt is removed first. With ``replace``
    an existing ``path`` is replaced (deleted, then the new folder renamed in its place)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        if not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            raise FileExistsError(path)
        shutil.rmtree(path)
    os.rename(tmp, path)


def remove_stale(folder: str | os.PathLike) -> int:
    """Delete temporary files of interrupted writes in ``folder``; returns how many."""
    count = 0
    for leftover in Path(folder).glob(f".*{TMP_MARK}*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)
            count += 1
    return count
