"""A small, lossless rule-based English sentence splitter for ``preprocess --split-sentences``.

Megatron-LM uses NLTK's punkt model; we avoid the dependency (and its data download).
Lossless means ``"".join(split_sentences(t)) == t``: the whitespace after a sentence stays
with that sentence, so tokens read back from the dataset decode to the original document.

A boundary is sentence punctuation (``.``, ``!``, ``?``, optionally followed by closing
quotes/brackets), then whitespace, then something that can start a sentence (capital
letter, digit, opening quote/bracket). Known abbreviations and single-letter initials
("e.g. The", "J. Smith") are not boundaries. Blank lines (paragraph breaks) always are.
"""
from __future__ import annotations

import re
from typing import List

_BOUNDARY = re.compile(r"[.!?][\"'\)\]\u201d\u2019]*\s+(?=[\"'\(\[\u201c\u2018]?[A-Z0-9])|\n\s*\n\s*")
_WORD_BEFORE = re.compile(r"(\w+)[.!?]?$")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc eg ie cf al fig figs no vol pp ed eds approx dept est inc ltd co corp".split()
)


def _is_abbreviation(text: str, punct_pos: int) -> bool:
    if text[punct_pos] != ".":
        return False
    m = _WORD_BEFORE.search(text, max(0, punct_pos - 20), punct_pos + 1)
    if m is None:
        return False
    word = m.group(1).lower()
    # "e.g." / "i.e.": the word before the last dot is a single letter preceded by a dot.
    return len(word) == 1 and word.isalpha() or word in _ABBREVIATIONS


def split_sentences(text: str) -> List[str]:
    """Split ``text`` into sentences whose concatenation is exactly ``text``."""
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group(0)[0] in ".!?" and _is_abbreviation(text, m.start()):
            continue
        if m.end() > start:
            out.append(text[start:m.end()])
            start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out
