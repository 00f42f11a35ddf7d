"""Character error rate and word accuracy of OCR text against ground truth (ocreval's definitions).

Both texts are NFC-normalised and their whitespace collapsed to single spaces first, so line breaks
and layout spacing are not counted; case, diacritics and punctuation are.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

from rapidfuzz.distance import Levenshtein


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFC", text).split())


def cer(truth: str, hypothesis: str) -> float:
    """Edits (insert, delete, substitute) per character of the truth."""
    reference = normalise(truth)
    return Levenshtein.distance(reference, normalise(hypothesis)) / max(1, len(reference))


def word_accuracy(truth: str, hypothesis: str) -> float:
    """1 - word error rate (word-level edits per truth word), floored at 0."""
    reference = normalise(truth).split()
    edits = Levenshtein.distance(reference, normalise(hypothesis).split())
    return max(0.0, 1.0 - edits / max(1, len(reference)))


def bag_of_words_accuracy(truth: str, hypothesis: str) -> float:
    """Share of the truth's words (as a multiset) found anywhere in the hypothesis: blind to reading
    order, so two readings that differ only in where a block was placed score the same."""
    reference = Counter(normalise(truth).split())
    found = Counter(normalise(hypothesis).split())
    return sum((reference & found).values()) / max(1, sum(reference.values()))
