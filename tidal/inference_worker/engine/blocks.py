"""The KV cache's bookkeeping (pure): a pool of fixed-size blocks with reference counts and a
prefix cache over FULL blocks.

A block's hash chains its parent's hash with its own token ids (blake2b), so equal hashes mean
equal whole prefixes, not just an equal block. A full block is published under its hash once
its tokens are computed; a later prompt that starts with the same tokens shares those blocks
(reference counts) instead of recomputing them. A block no sequence uses goes back to the free
queue but keeps its contents and hash until it is reused (least recently freed first), so a
finished conversation's prefix stays hittable while memory allows — vLLM's v1 design.

The runner owns the tensors; this module only says which block holds which positions.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

BlockHash = bytes
_ROOT = b"tidal-prefix-root"


def block_hashes(tokens: Sequence[int], block_size: int, start: int = 0,
                 parent: BlockHash | None = None) -> list[BlockHash]:  # fmt: skip
    """Chained hashes of the full blocks of ``tokens`` from block ``start`` on (``parent`` is
    the hash of block ``start - 1``, None for the first block)."""
    hashes: list[BlockHash] = []
    previous = parent if parent is not None else _ROOT
    for first in range(start * block_size, len(tokens) - block_size + 1, block_size):
        digest = hashlib.blake2b(previous, digest_size=16)
        digest.update(b",".join(str(t).encode() for t in tokens[first : first + block_size]))
        previous = digest.digest()
        hashes.append(previous)
    return hashes


class OutOfBlocksError(RuntimeError):
    """The pool cannot hold what was asked (the scheduler checks first; this is a bug guard)."""


@dataclass
class BlockPool:
    """``num_blocks`` blocks of ``block_size`` token slots each."""

    num_blocks: int
    block_size: int
    enable_prefix_cache: bool = True
    refs: list[int] = field(init=False)
    hash_of: dict[int, BlockHash] = field(init=False, default_factory=dict)
    cached: dict[BlockHash, int] = field(init=False, default_factory=dict)
    # Blocks nobody references, least recently freed first (an OrderedDict as an LRU set).
    free: OrderedDict[int, None] = field(init=False)

    def __post_init__(self) -> None:
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError(f"a pool needs blocks: {self.num_blocks} of {self.block_size}")
        self.refs = [0] * self.num_blocks
        self.free = OrderedDict.fromkeys(range(self.num_blocks))

    # ---------------------------------------------------------------- queries

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        """The share of blocks some sequence holds (vLLM's kv_cache_usage_perc)."""
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def lookup(self, hashes: Sequence[BlockHash]) -> list[int]:
        """The cached blocks holding the longest prefix of ``hashes`` (not yet referenced)."""
        if not self.enable_prefix_cache:
            return []
        found: list[int] = []
        for h in hashes:
            block = self.cached.get(h)
            if block is None:
                break
            found.append(block)
        return found

    # ---------------------------------------------------------------- changes

    def take(self, blocks: Sequence[int]) -> None:
        """Reference cached blocks found by :meth:`lookup` (a free one leaves the free queue)."""
        for block in blocks:
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1

    def allocate(self, count: int) -> list[int]:
        """``count`` fresh blocks, evicting the least recently freed cached ones."""
        if count > len(self.free):
            raise OutOfBlocksError(f"{count} blocks asked, {len(self.free)} free")
        out: list[int] = []
        for _ in range(count):
            block, _ = self.free.popitem(last=False)
            stale = self.hash_of.pop(block, None)
            if stale is not None and self.cached.get(stale) == block:
                del self.cached[stale]
            self.refs[block] = 1
            out.append(block)
        return out

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; tail blocks first, so that a sequence's last
        (least shareable) blocks are the first to be reused."""
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block] < 0:
                raise RuntimeError(f"block {block} released more often than taken")
            if self.refs[block] == 0:
                self.free[block] = None

    def publish(self, block: int, block_hash: BlockHash) -> None:
        """Make a full, computed block findable by its hash (the first holder of a hash wins:
        a duplicate computed concurrently stays private)."""
        if self.enable_prefix_cache and block_hash not in self.cached:
            self.cached[block_hash] = block
            self.hash_of[block] = block_hash
