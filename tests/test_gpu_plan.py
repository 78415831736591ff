"""CPU checks of the GPU path's planning: CUDA-graph batch buckets and query heads per attention CTA."""
from backend.engine.cuda_graph import batch_buckets
from backend.kernels.paged_attention import rep_tile


def test_batch_buckets_cover_every_batch_size_up_to_the_max():
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert batch_buckets(1) == [1]
    assert batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    for max_bs in (1, 3, 17, 100):
        b = batch_buckets(max_bs)
        assert b == sorted(set(b)) and b[-1] == max_bs
        assert all(any(x >= n for x in b) for n in range(1, max_bs + 1))


def test_rep_tile_divides_the_gqa_ratio():
    # Llama-2 (MHA), 9:3, Llama-3 (32:8), 64:8, Qwen 14:2, 5:1
    assert [rep_tile(r) for r in (1, 3, 4, 8, 7, 5)] == [1, 3, 4, 4, 7, 5]
    for r in range(1, 33):
        assert r % rep_tile(r) == 0 and rep_tile(r) <= 8
