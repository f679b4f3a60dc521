"""Prompt token ids equal the official slow CLIP tokenizer's: the family's tokenization (the fast
transformers ``CLIPTokenizer`` after :func:`sdpo.text.clean_caption`) against open_clip's
``SimpleTokenizer`` (the original CLIP tokenizer: ftfy, HTML unescape, whitespace clean) with
the real CLIP vocabulary open_clip bundles."""

from __future__ import annotations

import json

import pytest

from sdpo.families.base import ModelFamily
from sdpo.text import clean_caption

EOT = 49407


@pytest.fixture(scope="module")
def tokenizers():
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    reference = SimpleTokenizer()
    # The same BPE as a transformers CLIPTokenizer (open_clip names the special tokens otherwise).
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in reference.encoder.items()}
    merges = [tuple(m) for m, _ in sorted(reference.bpe_ranks.items(), key=lambda kv: kv[1])]
    fast = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    return reference, fast


def _upto_eot(ids) -> list[int]:
    ids = list(ids)
    return ids[: ids.index(EOT) + 1]


def _compare(tokenizers, prompts):
    """(prompts whose ids differ without cleaning, ... with the family's tokenization)."""
    reference, fast = tokenizers
    want = [_upto_eot(r) for r in reference(prompts, context_length=77).tolist()]
    raw = fast(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    ours = ModelFamily.tokenize(fast, prompts, "cpu").tolist()
    return (
        [p for p, w, r in zip(prompts, want, raw) if _upto_eot(r) != w],
        [p for p, w, r in zip(prompts, want, ours) if _upto_eot(r) != w],
    )


HARD = [
    "salt &amp;amp; pepper",  # double-escaped HTML
    "a corgi\u2019s head",  # curly apostrophe
    "architect\uff0czaha\uff0crealistic",  # full-width commas
    "caf\u00c3\u00a9 at night",  # mojibake of "café"
    "  two\t spaces\n and a tab  ",
    "A cartoon bird holding a sign saying; \u201cwhat\u2019s good?\u201d",
    "word " * 100,  # truncated to 77 tokens, ending with the end token
]


def test_hard_captions_match_the_slow_tokenizer(tokenizers):
    raw_bad, ours_bad = _compare(tokenizers, HARD)
    assert ours_bad == []
    assert len(raw_bad) >= 4  # the fast tokenizer alone gets these wrong
    assert clean_caption("salt &amp;amp; pepper") == "salt & pepper"


def test_paper_prompt_sets_match_the_slow_tokenizer(tokenizers, paper_prompts):
    for name in ("papv2", "hpsv2", "partiprompts"):
        prompts = [e["prompt"] for e in json.loads((paper_prompts / f"{name}.json").read_text())]
        _, ours_bad = _compare(tokenizers, prompts)
        assert ours_bad == [], (name, ours_bad[:3])
