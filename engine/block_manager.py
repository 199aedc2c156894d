"""Paged KV blocks with prefix caching, and state slots for linear-attention layers.

Host-side bookkeeping only; the tensors live in the runner. A block is shared
by reference count. A full, computed block is keyed by a hash chain over the
token ids of every block up to it (plus the content ids of images overlapping
it), so two requests share a block only when everything the block's KV
depends on is equal. Freed blocks keep their hash and stay reusable until a
new allocation evicts them (least recently freed first; unhashed blocks first).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class BlockStats:
    num_total_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found cached


def block_hash(parent: bytes | None, token_ids: list[int], extra: tuple[str, ...]) -> bytes:
    """Hash-chain key of one full block."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent or b"root")
    digest.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    for key in extra:
        digest.update(b"|img:" + key.encode())
    return digest.digest()


class BlockManager:
    """Allocates KV blocks to sequences; prefix caching of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[bytes | None] = [None] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._hash_to_block: dict[bytes, int] = {}
        self._queries = 0
        self._hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def stats(self) -> BlockStats:
        return BlockStats(self.num_blocks, self.num_free_blocks, self._queries, self._hits)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extra(self, seq: Sequence, index: int) -> tuple[str, ...]:
        lo, hi = index * self.block_size, (index + 1) * self.block_size
        return tuple(key for start, end, key in seq.image_spans if start < hi and end > lo)

    def _chain(self, seq: Sequence, tokens: list[int], index: int) -> bytes:
        parent = seq.block_hashes[index - 1] if index > 0 else None
        lo = index * self.block_size
        return block_hash(parent, tokens[lo : lo + self.block_size], self._extra(seq, index))

    def _take(self, block: int) -> None:
        if self._ref_counts[block] == 0:
            del self._free[block]
        self._ref_counts[block] += 1

    def _match_prefix(self, seq: Sequence) -> None:
        """Point an empty block table at cached blocks of the sequence's prefix.

        At least one token is always left to compute (its logits are needed),
        so a fully cached prompt reuses all but its last block.
        """
        if not self.enable_prefix_caching:
            return
        tokens = seq.token_ids()
        self._queries += len(tokens)
        for index in range((len(tokens) - 1) // self.block_size):
            key = self._chain(seq, tokens, index)
            block = self._hash_to_block.get(key)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(key)
        cached = len(seq.block_table) * self.block_size
        self._hits += cached
        seq.num_computed_tokens = cached
        seq.num_cached_tokens = cached

    def allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Give `seq` blocks for `num_new_tokens` more tokens; False (and no change) if short.

        A sequence with an empty table first reuses cached prefix blocks, which
        advances its `num_computed_tokens`; callers size the chunk after that.
        """
        fresh = not seq.block_table
        if fresh:
            self._match_prefix(seq)
            num_new_tokens = min(num_new_tokens, seq.num_tokens - seq.num_computed_tokens)
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if need > len(self._free):
            if fresh:
                self.free(seq)
            return False
        for _ in range(max(0, need)):
            block, _ = self._free.popitem(last=False)
            old = self._hashes[block]
            if old is not None and self._hash_to_block.get(old) == block:
                del self._hash_to_block[old]
            self._hashes[block] = None
            self._ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        need = self.blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return need <= len(self._free)

    def commit(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full and computed."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        if full <= len(seq.block_hashes):
            return
        tokens = seq.token_ids()
        for index in range(len(seq.block_hashes), full):
            key = self._chain(seq, tokens, index)
            seq.block_hashes.append(key)
            block = seq.block_table[index]
            if key not in self._hash_to_block:
                self._hash_to_block[key] = block
                self._hashes[block] = key

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq` (tail first, so it is evicted first)."""
        for block in reversed(seq.block_table):
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                self._free[block] = None
                if self._hashes[block] is None:
                    self._free.move_to_end(block, last=False)
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_cached_tokens = 0


class StateSlotManager:
    """Fixed per-sequence state slots (conv + recurrent state) of linear-attention layers.

    A sequence holds one slot from admission until it finishes or is
    preempted (its state is then recomputed with the prompt).
    """

    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))
        self._owner: dict[int, int] = {}

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self, seq_id: int) -> int:
        if seq_id in self._owner:
            return self._owner[seq_id]
        if not self._free:
            raise RuntimeError("no free state slot (more running sequences than slots)")
        slot = self._free.pop()
        self._owner[seq_id] = slot
        return slot

    def slot_of(self, seq_id: int) -> int | None:
        return self._owner.get(seq_id)

    def free(self, seq_id: int) -> None:
        slot = self._owner.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)
