"""A character corpus that ships with Python itself: the standard library's source.

Real, learnable text with no download: the ``.py`` files beside ``os.py`` read in sorted
order, so every machine with the same Python version gets the same corpus.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_VOCAB = 128  # 7-bit ASCII; anything else maps to 0


def stdlib_text(n_chars: int = 2_000_000) -> str:
    """The first ``n_chars`` characters of the standard library's sources, sorted by path."""
    root = Path(os.__file__).parent
    pieces: list[str] = []
    total = 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(text)
        total += len(text)
        if total >= n_chars:
            break
    return "".join(pieces)[:n_chars]


def encode(text: str) -> torch.Tensor:
    """Characters to int64 token ids in [0, 128)."""
    data = torch.frombuffer(bytearray(text.encode("ascii", errors="replace")), dtype=torch.uint8)
    return data.to(torch.long).clamp_(max=_VOCAB - 1)


VOCAB_SIZE = _VOCAB


class CharBatches:
    """Random (input, next-char target) windows from the corpus, reproducible by seed."""

    def __init__(self, *, block_size: int, n_chars: int = 2_000_000, seed: int = 0) -> None:
        data = encode(stdlib_text(n_chars))
        split = int(0.9 * len(data))
        self.train, self.val = data[:split], data[split:]
        self.block_size = block_size
        self.generator = torch.Generator().manual_seed(seed)

    def get(self, batch_size: int, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        data = self.train if split == "train" else self.val
        starts = torch.randint(len(data) - self.block_size - 1, (batch_size,),
                               generator=self.generator)
        x = torch.stack([data[s : s + self.block_size] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + 1 + self.block_size] for s in starts.tolist()])
        return x, y
