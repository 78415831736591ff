"""Paged KV block manager: free list, refcounts, block tables, prefix caching with LRU reuse of freed blocks.

A full block whose tokens are all computed is registered under a chained hash (parent hash + its tokens).
Blocks with refcount 0 that carry a hash stay reusable in an LRU until a fresh block is needed.
A session pins its blocks simply by holding them (its sequence keeps its block table between turns).
"""
from __future__ import annotations

from collections import OrderedDict, deque
from typing import Dict, List, Optional, Tuple

from .sequence import Sequence


class NoFreeBlocksError(RuntimeError):
    pass


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "tokens")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: Optional[int] = None
        self.tokens: Optional[Tuple[int, ...]] = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque = deque(range(num_blocks))
        self.evictable: "OrderedDict[int, None]" = OrderedDict()   # block ids with ref 0 and a hash, LRU first
        self.hash_to_block: Dict[int, int] = {}
        self.num_prefix_hits = 0        # blocks reused from the prefix cache
        self.num_prefix_queries = 0     # full blocks looked up

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids) + len(self.evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Fresh blocks needed so that seq's table covers its first num_tokens tokens."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def _take_free(self) -> Block:
        if self.free_ids:
            block = self.blocks[self.free_ids.popleft()]
        elif self.evictable:
            block_id, _ = self.evictable.popitem(last=False)
            block = self.blocks[block_id]
            del self.hash_to_block[block.hash]
            block.hash = block.tokens = None
        else:
            raise NoFreeBlocksError("no free KV blocks")
        assert block.ref_count == 0
        block.ref_count = 1
        return block

    def _retain(self, block: Block) -> None:
        if block.ref_count == 0:
            self.evictable.pop(block.block_id, None)
        block.ref_count += 1

    def _release(self, block: Block) -> None:
        assert block.ref_count > 0, f"block {block.block_id} released twice"
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.hash is not None:
                self.evictable[block.block_id] = None
            else:
                self.free_ids.append(block.block_id)

    @staticmethod
    def _chain_hash(parent: Optional[int], tokens: Tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for seq's leading full blocks (never the block holding its last token, which must
        be computed to produce logits). Returns the number of tokens found."""
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        bs = self.block_size
        parent = None
        for i in range((len(seq) - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._chain_hash(parent, tokens)
            self.num_prefix_queries += 1
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].tokens != tokens:
                break
            self._retain(self.blocks[block_id])
            seq.block_table.append(block_id)
            self.num_prefix_hits += 1
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = len(seq.block_table) * bs
        return seq.num_computed_tokens

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover num_tokens tokens."""
        need = self.num_blocks_needed(seq, num_tokens)
        if need > self.num_free_blocks:
            raise NoFreeBlocksError(f"need {need} KV blocks, {self.num_free_blocks} free")
        for _ in range(need):
            seq.block_table.append(self._take_free().block_id)

    def commit(self, seq: Sequence) -> None:
        """Register seq's newly completed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = self.blocks[seq.block_table[seq.num_hashed_blocks - 1]].hash if seq.num_hashed_blocks else None
        for i in range(seq.num_hashed_blocks, full):
            block = self.blocks[seq.block_table[i]]
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._chain_hash(parent, tokens)
            if h not in self.hash_to_block and block.hash is None:
                block.hash, block.tokens = h, tokens
                self.hash_to_block[h] = block.block_id
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):   # the tail is least likely to be shared: evict it first
            self._release(self.blocks[block_id])
        seq.block_table = []
        seq.num_hashed_blocks = 0
        seq.num_computed_tokens = 0

    def rewind(self, seq: Sequence, num_tokens: int) -> None:
        """Forget K/V from token num_tokens on. A registered (possibly shared) block is never written again:
        computation restarts at its first token instead."""
        bs = self.block_size
        keep = min(seq.num_computed_tokens, num_tokens)
        if keep // bs < seq.num_hashed_blocks and keep % bs:
            keep -= keep % bs
        keep_blocks = self.blocks_for(keep)
        for block_id in seq.block_table[keep_blocks:]:
            self._release(self.blocks[block_id])
        del seq.block_table[keep_blocks:]
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, keep // bs)
        seq.num_computed_tokens = keep

    def block_ids_in_use(self) -> List[int]:
        return [b.block_id for b in self.blocks if b.ref_count > 0]
