"""A CLIP-format tokenizer (vocab.json + merges.txt) in which every word of the world is one token.

CLIP's BPE starts from byte symbols (the last one of a word marked ``</w>``) and applies merges in
rank order. We add, for each word, the merges that join it left to right; where an earlier
word's merges split a later word differently, we add merges for the pieces it actually splits
into, until every word is a single token. Words outside the world still tokenize (byte symbols). Two
merges may spell the same token; the later id wins in vocab.json, leaving an unused id (harmless:
the shipped text encoder was trained with that vocabulary size).
"""

from __future__ import annotations

from pathlib import Path

from coerase_jax.models.clip import load_tokenizer
from coerase_jax.models.presets import write_byte_tokenizer


def _chain(pieces: list[str]) -> list[tuple[str, str]]:
    merges, left = [], pieces[0]
    for right in pieces[1:]:
        merges.append((left, right))
        left += right
    return merges


def write_world_tokenizer(folder: Path, words: list[str], max_rounds: int = 8) -> int:
    """Writes the tokenizer into ``folder``; returns its vocabulary size."""
    merges: list[tuple[str, str]] = []
    for word in words:
        if len(word) > 1:
            merges += [m for m in _chain(list(word[:-1]) + [word[-1] + "</w>"]) if m not in merges]
    for _ in range(max_rounds):
        vocab_size = write_byte_tokenizer(folder, merges)
        tokenizer = load_tokenizer(str(folder))
        split = {w: tokenizer.tokenize(w) for w in words}
        split = {w: pieces for w, pieces in split.items() if len(pieces) > 1}
        if not split:
            return vocab_size
        for pieces in split.values():
            merges += [m for m in _chain(pieces) if m not in merges]
    raise RuntimeError(f"words still split after {max_rounds} rounds: {sorted(split)}")
