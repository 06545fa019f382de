"""SSL views for CleanCLIP's in-modal loss: AutoAugment for images, EDA for text.

Both are computed per row on the fly by the dataset, from the same row and with randomness it seeds, so a view can
never belong to another row (the peers precomputed EDA per dataset and misaligned rows on captions with no letters).
EDA needs no download: synonym replacement uses a small synonym table shipped in `data/synonyms.json`; random
insertion, swap and deletion always work.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any

from torchvision import transforms

WORD = re.compile(r"\w+(?:'\w+)?")


def ssl_image_transform(preprocess: Callable[[Any], Any]) -> transforms.Compose:
    """AutoAugment (ImageNet policy) on the PIL image, then the model's preprocess, as CleanCLIP does."""
    return transforms.Compose([transforms.AutoAugment(transforms.AutoAugmentPolicy.IMAGENET), preprocess])


@cache
def synonym_table() -> dict[str, tuple[str, ...]]:
    """Word -> synonyms from the shipped table, made symmetric (if b is a synonym of a, a is one of b)."""
    raw = json.loads(resources.files("cleansweep.data").joinpath("synonyms.json").read_text())
    table: dict[str, set[str]] = {}
    for word, synonyms in raw.items():
        group = {word, *synonyms}
        for w in group:
            table.setdefault(w, set()).update(group - {w})
    return {w: tuple(sorted(s)) for w, s in table.items()}


def _synonyms(word: str) -> tuple[str, ...]:
    return synonym_table().get(word.lower(), ())


def _replace(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Synonym replacement: up to n distinct words that have synonyms get a random synonym each."""
    out = list(words)
    positions = [i for i, w in enumerate(words) if _synonyms(w)]
    for i in rng.sample(positions, min(n, len(positions))):
        out[i] = rng.choice(_synonyms(words[i]))
    return out


def _insert(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Random insertion: n times, insert a synonym of a random word (or the word itself when it has none)."""
    out = list(words)
    for _ in range(n):
        word = rng.choice(out)
        out.insert(rng.randint(0, len(out)), rng.choice(_synonyms(word) or (word,)))
    return out


def _swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """Random swap: n times, swap two random positions."""
    out = list(words)
    for _ in range(n):
        i, j = rng.randrange(len(out)), rng.randrange(len(out))
        out[i], out[j] = out[j], out[i]
    return out


def _delete(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Random deletion: each word dropped with probability p; one random word survives if all would go."""
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(words)]


def eda(caption: str, rng: random.Random, alpha: float = 0.1) -> str:
    """One EDA operation (Wei & Zou 2019) chosen at random: synonym replacement, insertion, swap or deletion.

    Words are the caption's alphanumeric tokens, lower-cased (punctuation dropped, as EDA does); each operation
    changes max(1, alpha * #words) words, deletion drops each word with probability alpha. Synonym replacement is
    only a choice when some word has a synonym in the shipped table.

    Args:
        caption: any text; empty, punctuation-only, digit-only and very long captions are fine.
        rng: the only source of randomness, so the result is a function of (caption, rng state).
        alpha: strength of the change.

    Returns:
        A non-empty string: the augmented caption, or the caption unchanged when it has no words ("." when blank).
    """
    words = WORD.findall(caption.lower())
    if not words:
        return caption if caption.strip() else "."
    n = max(1, int(alpha * len(words)))
    ops: list[Callable[[], list[str]]] = [lambda: _insert(words, n, rng), lambda: _swap(words, n, rng),
                                          lambda: _delete(words, alpha, rng)]
    if any(_synonyms(w) for w in words):
        ops.append(lambda: _replace(words, n, rng))
    return " ".join(rng.choice(ops)())
