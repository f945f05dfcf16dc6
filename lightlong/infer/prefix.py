"""Prefix reuse: cache snapshots at chunk boundaries, keyed by the tokens before them.

A request whose prompt starts with a stored prefix (a long document, a chat history)
restores that snapshot and prefills only the rest. Keys chain a hash per chunk (each
boundary's key hashes the previous key, the chunk's tokens and the content digests of the
images that start in it), so finding the longest stored prefix of an n-token prompt costs
O(n), and a prompt with other images at the same `<image>` tokens matches only before them.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

from lightlong.infer.cache import CacheSnapshot

Images = Sequence[tuple[int, bytes]]
"""(start position, content digest) of each image of a prompt."""


class PrefixCache:
    """Snapshots of single-row caches at multiples of `chunk_size` tokens, least recently
    used dropped first once they hold more than `max_bytes`.

    Args:
        chunk_size: boundary spacing in tokens (the engine's prefill chunk).
        max_bytes: budget for stored snapshots.
    """

    def __init__(self, chunk_size: int, max_bytes: int = 2 << 30):
        if chunk_size < 1 or max_bytes < 0:
            raise ValueError("chunk_size must be >= 1 and max_bytes >= 0")
        self.chunk_size, self.max_bytes = chunk_size, max_bytes
        self._entries: OrderedDict[bytes, CacheSnapshot] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = 0

    def _keys(self, tokens: Sequence[int], upto: int, images: Images = ()) -> list[bytes]:
        """Chained keys of the boundaries chunk_size, 2·chunk_size, … <= upto; a chunk's key
        also hashes the content digests of the images whose features start in it."""
        ids = np.asarray(tokens[:upto], dtype=np.int64)
        keys, key = [], b""
        C = self.chunk_size
        for a in range(0, upto - C + 1, C):
            seen = b"".join(digest for start, digest in images if a <= start < a + C)
            key = hashlib.blake2b(key + ids[a : a + C].tobytes() + seen, digest_size=16).digest()
            keys.append(key)
        return keys

    def lookup(
        self, tokens: Sequence[int], images: Images = ()
    ) -> tuple[int, CacheSnapshot | None]:
        """The longest stored prefix of tokens that leaves at least one token to run:
        (its length, its snapshot), or (0, None). `images`: (position of the first of its
        `<image>` tokens, content digest) of each image in the prompt, so that a prefix
        matches only with the same images."""
        keys = self._keys(tokens, len(tokens) - 1, images)
        for n in range(len(keys), 0, -1):
            snap = self._entries.get(keys[n - 1])
            if snap is not None:
                self._entries.move_to_end(keys[n - 1])
                self.hits += 1
                return n * self.chunk_size, snap
        self.misses += 1
        return 0, None

    def insert(self, tokens: Sequence[int], snapshot: CacheSnapshot, images: Images = ()) -> None:
        """Stores the snapshot taken after `tokens` (a multiple of chunk_size of them; images
        as for `lookup`)."""
        if len(tokens) % self.chunk_size or snapshot.length != len(tokens) or not tokens:
            raise ValueError(
                f"a snapshot is stored at a boundary: {len(tokens)} tokens must be a positive "
                f"multiple of chunk_size={self.chunk_size} and equal its length {snapshot.length}"
            )
        if snapshot.nbytes > self.max_bytes:
            return
        key = self._keys(tokens, len(tokens), images)[-1]
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        self._entries[key] = snapshot
        self.nbytes += snapshot.nbytes
        while self.nbytes > self.max_bytes:
            self.nbytes -= self._entries.popitem(last=False)[1].nbytes

    def __len__(self) -> int:
        return len(self._entries)
