"""Loading a saved denoiser state dict (``unet.pth`` / ``.safetensors``) strictly.

Training (``--unet_init``) and evaluation (``--unet_path``) load checkpoints through these two
functions, so both give the same one-line errors: a file that is not a state dict, or one whose
keys or shapes do not match the base model's denoiser (another family, another model).
"""

from __future__ import annotations

import pickle
from pathlib import Path


def load_state_dict_file(path: str | Path) -> dict:
    """A state dict from a ``torch.save`` file or a ``.safetensors`` file, with a DDP
    (``module.``) or ``torch.compile`` (``_orig_mod.``) prefix stripped."""
    import torch

    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        IndexError,  # what the unpickler raises on a text file
        KeyError,
        AttributeError,
        TypeError,
    ) as err:
        # torch's own message advises weights_only=False, which would execute the file: say
        # plainly that it is not a state dict instead.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path} is not a PyTorch state_dict file ({type(err).__name__}: {first})"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state_dict (got {type(state).__name__})")
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def mismatch(module, state: dict) -> str | None:
    """A one-line description of how ``state`` differs from ``module``'s keys and shapes, or
    None when it loads strictly."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(
        k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape)
    )
    if not (missing or unexpected or shapes):
        return None
    return (
        f"{len(missing)} missing keys (e.g. {missing[:3]}), {len(unexpected)} unexpected keys "
        f"(e.g. {unexpected[:3]}), {len(shapes)} shape mismatches (e.g. {shapes[:3]})"
    )


def load_strict(module, state: dict, source: str, *, flag: str = "") -> None:
    """Load ``state`` into ``module`` requiring exactly its keys and shapes; a ``ValueError``
    naming ``source`` (and ``flag``) otherwise."""
    problem = mismatch(module, state)
    if problem:
        where = f"{flag} {source}" if flag else str(source)
        raise ValueError(
            f"{where} does not match the base model's {type(module).__name__}: {problem}. "
            "Is it a state_dict of this base model (the same family and size)?"
        )
    module.load_state_dict(state, strict=True)
