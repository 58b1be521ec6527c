"""The training corpus: token sequences of every user, in memory or memory-mapped from shards.

Training needs three things of its data: each user's token span (to cut windows), a canonical
user order (so the batch order depends on the seed and the data, never on how the data was
stored), and gathering tokens at arbitrary positions. :class:`Corpus` gives those over one
in-memory :class:`~behaviorlm.sequence.tokenizer.EncodedSequences` or over the memory-mapped
shards of a prepared folder, so one training loop serves both and the two give the *same*
batches: users are ordered by their global rank (sorted user id), the order the in-memory
tokenizer produces.

What stays in memory is per user (two int64 offsets and a rank: 24 bytes a user, 72 MB for 3M
users), never per event: tokens are read from the memory maps batch by batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from behaviorlm.sequence.tokenizer import EncodedSequences

FIELDS = ("items", "actions", "gaps")


@dataclass
class Corpus:
    """Users' token spans over one or many parts; positions are global over the parts' tokens."""

    parts: list[EncodedSequences]
    starts: np.ndarray  # (n_users,) global position of each user's first token, canonical order
    ends: np.ndarray  # (n_users,) one past the user's last token
    bases: np.ndarray  # (n_parts + 1,) global position of each part's first token

    @classmethod
    def from_sequences(cls, seqs: EncodedSequences) -> Corpus:
        """One in-memory part, users in its own order (the tokenizer's: sorted by user id)."""
        offsets = np.asarray(seqs.offsets, np.int64)
        return cls([seqs], offsets[:-1].copy(), offsets[1:].copy(), np.array([0, offsets[-1]], np.int64))

    @classmethod
    def from_parts(cls, parts: list[EncodedSequences], ranks: list[np.ndarray]) -> Corpus:
        """Many parts (shards); ``ranks[p][u]`` is user ``u`` of part ``p``'s global rank."""
        sizes = [int(p.offsets[-1]) for p in parts]
        bases = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        lo = np.concatenate([np.asarray(p.offsets[:-1], np.int64) + b for p, b in zip(parts, bases, strict=False)])
        hi = np.concatenate([np.asarray(p.offsets[1:], np.int64) + b for p, b in zip(parts, bases, strict=False)])
        order = np.argsort(np.concatenate(ranks), kind="stable")
        return cls(parts, lo[order], hi[order], bases)

    @property
    def n_users(self) -> int:
        return len(self.starts)

    @property
    def n_tokens(self) -> int:
        return int(self.bases[-1])

    def take(self, field: str, idx: np.ndarray) -> np.ndarray:
        """Tokens of ``field`` at global positions ``idx`` (any shape), as int64."""
        if len(self.parts) == 1:
            return np.asarray(getattr(self.parts[0], field)[idx], np.int64)
        part = np.searchsorted(self.bases, idx, side="right") - 1
        out = np.empty(idx.shape, np.int64)
        for p in np.unique(part):
            mask = part == p
            out[mask] = getattr(self.parts[p], field)[idx[mask] - self.bases[p]]
        return out
