"""Caption cleaning before CLIP tokenization, as the slow CLIP tokenizer of the official code does.

The official scripts tokenize with transformers' *slow* ``CLIPTokenizer``, which first runs
``ftfy.fix_text`` (mojibake, odd Unicode), ``html.unescape`` twice (``&amp;`` -> ``&``) and
collapses whitespace, then lowercases. The fast tokenizer (the only ``CLIPTokenizer`` of
transformers 5) does NFC, whitespace and lowercase only, so a caption such as ``"salt &amp;
pepper"`` or one with mojibake gets other token ids. :func:`clean_caption` restores the slow
tokenizer's input; with it the fast tokenizer's ids equal open_clip's ``SimpleTokenizer`` (the
original CLIP tokenizer, same vocabulary) on the paper's prompt sets (``tests/test_robust_text.py``).
"""

from __future__ import annotations

import html
import re

_WHITESPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """``ftfy.fix_text``, HTML-unescape twice, strip, collapse whitespace (case is left to the
    tokenizer, which lowercases)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip()
