"""Compatibility layer: lets the stale ``image-reward==1.5`` package run on transformers 5.x.

ImageReward's vendored BLIP (``ImageReward/models/BLIP/med.py``) was written against transformers
4.15. Since then transformers moved or removed a handful of helpers it relies on:

* ``transformers.modeling_utils.apply_chunking_to_forward`` (gone in 4.56): the feed-forward
  chunking helper. BLIP runs with ``chunk_size_feed_forward=0``, i.e. no chunking.
* ``transformers.modeling_utils.find_pruneable_heads_and_indices`` / ``prune_linear_layer``
  (gone from ``modeling_utils`` in 5.x): only used by head pruning, never while scoring.
* ``PreTrainedModel.init_weights`` (5.x needs ``all_tied_weights_keys``, set only by
  ``post_init``, which BLIP's ``BertModel.__init__`` never calls).
* ``ModuleUtilsMixin.invert_attention_mask`` / ``get_head_mask`` (removed in 5.x).
* ``PreTrainedTokenizerBase.additional_special_tokens_ids`` (removed in 5.x).

:func:`apply` restores exactly these with the transformers-4.x semantics; it is idempotent and
must run before ``ImageReward`` is imported. :func:`import_imagereward_blip` does both.
Nothing else of transformers is changed.
"""

from __future__ import annotations

import torch

_APPLIED = False


def _apply_chunking_to_forward(forward_fn, chunk_size, chunk_dim, *input_tensors):
    """transformers-4.x semantics: split inputs along ``chunk_dim`` in ``chunk_size`` pieces."""
    if chunk_size > 0:
        num_chunks = input_tensors[0].shape[chunk_dim] // chunk_size
        chunks = zip(*(t.chunk(num_chunks, dim=chunk_dim) for t in input_tensors))
        return torch.cat([forward_fn(*c) for c in chunks], dim=chunk_dim)
    return forward_fn(*input_tensors)


def _find_pruneable_heads_and_indices(heads, n_heads, head_size, already_pruned_heads):
    """Heads left to prune and the flat indices of the kept head dimensions (4.x semantics)."""
    mask = torch.ones(n_heads, head_size)
    heads = set(heads) - already_pruned_heads
    for head in heads:
        # heads already pruned shift the position of the later ones down
        head = head - sum(1 if h < head else 0 for h in already_pruned_heads)
        mask[head] = 0
    index = torch.arange(len(mask.view(-1)))[mask.view(-1).eq(1)].long()
    return heads, index


def _init_weights(self):
    """4.x ``init_weights`` for models that never call ``post_init``: plain module init."""
    self.apply(self._init_weights)


def _invert_attention_mask(self, encoder_attention_mask):
    """[B, L] or [B, L, L] keep-mask (1 = attend) -> additive mask broadcastable over heads."""
    if encoder_attention_mask.dim() == 3:
        extended = encoder_attention_mask[:, None, :, :]
    else:
        extended = encoder_attention_mask[:, None, None, :]
    extended = extended.to(dtype=self.dtype)
    return (1.0 - extended) * torch.finfo(self.dtype).min


def _get_head_mask(self, head_mask, num_hidden_layers, is_attention_chunked=False):
    """BLIP never masks heads; 4.x returned one ``None`` per layer for ``head_mask=None``."""
    if head_mask is not None:
        raise NotImplementedError("head masks are not supported by the ImageReward compat layer")
    return [None] * num_hidden_layers


def _additional_special_tokens_ids(self):
    # 5.x keeps what 4.x called additional special tokens in ``extra_special_tokens``
    extra = getattr(self, "extra_special_tokens", None)
    if extra is None:
        extra = self.special_tokens_map.get("additional_special_tokens", [])
    if isinstance(extra, dict):
        extra = list(extra.values())
    return self.convert_tokens_to_ids([str(t) for t in extra])


def apply() -> None:
    """Restore the helpers listed in the module docstring (idempotent)."""
    global _APPLIED
    if _APPLIED:
        return
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils
    from transformers import PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

    for name, value in (
        ("apply_chunking_to_forward", _apply_chunking_to_forward),
        ("find_pruneable_heads_and_indices", _find_pruneable_heads_and_indices),
        ("prune_linear_layer", pytorch_utils.prune_linear_layer),
    ):
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, value)
    if not hasattr(PreTrainedModel, "invert_attention_mask"):
        PreTrainedModel.invert_attention_mask = _invert_attention_mask
    if not hasattr(PreTrainedModel, "get_head_mask"):
        PreTrainedModel.get_head_mask = _get_head_mask
    if not hasattr(PreTrainedTokenizerBase, "additional_special_tokens_ids"):
        PreTrainedTokenizerBase.additional_special_tokens_ids = property(
            _additional_special_tokens_ids
        )
    _APPLIED = True


def import_imagereward_blip():
    """Apply the patches, import ImageReward and return its ``ImageReward`` module.

    Returns the module ``ImageReward.ImageReward`` (model class ``ImageReward``, ``MLP``,
    ``_transform``); BLIP's ``BertModel`` gets the 4.x ``init_weights`` (see module docstring).
    """
    apply()
    import importlib
    import importlib.util
    import sys
    import types

    if "ImageReward.ImageReward" not in sys.modules:
        # The package's __init__ also imports its ReFL trainer (diffusers, datasets, accelerate)
        # and the OpenAI `clip` package: ~4 s spent on code scoring never runs. Import only the
        # scoring modules under temporary stand-ins for the two package __init__s, then drop the
        # stand-ins so that a later `import ImageReward` runs the real __init__ (which reuses the
        # already imported submodules).
        spec = importlib.util.find_spec("ImageReward")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                "the image-reward package is not installed (see requirements-metrics.txt)"
            )
        root = spec.submodule_search_locations[0]
        stand_ins = {}
        for name, folder in (("ImageReward", root), ("ImageReward.models", f"{root}/models")):
            if name not in sys.modules:
                stub = types.ModuleType(name)
                stub.__path__ = [folder]
                stand_ins[name] = sys.modules[name] = stub
        try:
            importlib.import_module("ImageReward.ImageReward")
            importlib.import_module("ImageReward.models.BLIP.med")
            importlib.import_module("ImageReward.models.BLIP.vit")
        finally:
            for name, stub in stand_ins.items():
                if sys.modules.get(name) is stub:
                    del sys.modules[name]
    # (the real __init__ rebinds the attribute ``ImageReward.ImageReward`` to the class)
    ir_module = sys.modules["ImageReward.ImageReward"]
    med = sys.modules["ImageReward.models.BLIP.med"]

    # BLIP's BertModel calls self.init_weights() in __init__ without post_init (see docstring).
    med.BertPreTrainedModel.init_weights = _init_weights
    return ir_module
