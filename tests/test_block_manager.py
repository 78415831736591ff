"""Block manager on CPU: allocation, refcounts, prefix cache with LRU reuse, rewind, errors."""
import pytest

from backend.config import SamplingParams
from backend.engine.block_manager import BlockManager, NoFreeBlocksError
from backend.engine.sequence import Sequence


def seq(tokens):
    return Sequence("r", tokens, SamplingParams())


def computed(bm, s, n):
    bm.allocate(s, n)
    s.num_computed_tokens = n
    bm.commit(s)


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    a, b = seq(list(range(10))), seq(list(range(5)))
    bm.allocate(a, 10)
    bm.allocate(b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2 and bm.num_free_blocks == 3
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8 and bm.block_ids_in_use() == []


def test_full_pool_raises_a_clear_error():
    bm = BlockManager(2, 4)
    with pytest.raises(NoFreeBlocksError, match="need 3 KV blocks, 2 free"):
        bm.allocate(seq(list(range(12))), 12)


def test_prefix_cache_shares_blocks_and_counts_hits():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq(list(range(13)))
    computed(bm, a, 13)
    b = seq(list(range(12)) + [99, 98])
    assert bm.match_prefix(b) == 12                       # three full shared blocks
    assert b.block_table == a.block_table[:3]
    assert all(bm.blocks[i].ref_count == 2 for i in b.block_table)
    c = seq(list(range(8)))                                 # its last block holds its last token: never shared
    assert bm.match_prefix(c) == 4
    assert bm.num_prefix_hits == 4


def test_freed_cached_blocks_are_reused_lru_then_evicted():
    bm = BlockManager(4, 4, enable_prefix_caching=True)
    a = seq(list(range(9)))
    computed(bm, a, 9)
    bm.free(a)
    assert bm.num_free_blocks == 4 and len(bm.evictable) == 2
    b = seq(list(range(9)))
    assert bm.match_prefix(b) == 8                         # still cached after its owner finished
    bm.free(b)
    c = seq([50 + i for i in range(16)])
    bm.allocate(c, 16)                                     # needs every block: cached ones are evicted
    assert bm.hash_to_block == {} and bm.num_free_blocks == 0


def test_different_prefix_does_not_match():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    computed(bm, seq([1, 2, 3, 4, 5, 6, 7, 8, 9]), 9)
    assert bm.match_prefix(seq([1, 2, 3, 5, 5, 6, 7, 8, 9])) == 0


def test_rewind_never_writes_into_a_shared_block():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = seq(list(range(12)))
    computed(bm, a, 12)
    b = seq(list(range(12)) + [7])
    bm.match_prefix(b)
    bm.rewind(b, 10)                                       # into the third (shared, hashed) block
    assert b.num_computed_tokens == 8 and len(b.block_table) == 2
    assert bm.blocks[a.block_table[2]].ref_count == 1


def test_double_free_is_caught():
    bm = BlockManager(2, 4)
    s = seq([1, 2])
    bm.allocate(s, 2)
    block = bm.blocks[s.block_table[0]]
    bm.free(s)
    with pytest.raises(AssertionError, match="released twice"):
        bm._release(block)


def test_zero_blocks_is_refused():
    with pytest.raises(ValueError, match="at least one block"):
        BlockManager(0, 4)
