import pytest

from cai_engine._native import BlockManager

BS = 4


def test_allocate_append_free_round_trip():
    bm = BlockManager(8, BS, prefix_caching=False)
    assert bm.allocate(1, list(range(6))) == 0
    table = bm.block_table(1)
    assert len(table) == 2 and bm.num_free == 6
    assert [bm.slot(1, p) for p in (0, 3, 4, 5)] == [table[0] * BS, table[0] * BS + 3, table[1] * BS, table[1] * BS + 1]
    slot = bm.append(1, 100)
    assert slot == table[1] * BS + 2 and bm.num_tokens(1) == 7
    bm.append(1, 101)
    slot = bm.append(1, 102)              # a ninth token opens a third block
    assert len(bm.block_table(1)) == 3 and slot == bm.block_table(1)[2] * BS
    bm.free(1)
    assert bm.num_free == 8 and not bm.has(1)


def test_fork_shares_full_blocks_and_copies_the_partial_one():
    bm = BlockManager(8, BS)
    bm.allocate(1, list(range(6)))
    parent = bm.block_table(1)
    copies = bm.fork(1, 2)
    child = bm.block_table(2)
    assert child[0] == parent[0] and bm.ref_count(parent[0]) == 2
    assert child[1] != parent[1] and copies == [(parent[1], child[1])]
    bm.append(2, 7)
    assert bm.block_table(1) == parent  # the parent never sees the child's tokens
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 8


def test_fork_of_block_aligned_sequence_shares_everything():
    bm = BlockManager(8, BS, prefix_caching=False)
    bm.allocate(1, [1, 2, 3, 4])
    assert bm.fork(1, 2) == []
    assert bm.block_table(1) == bm.block_table(2) and bm.ref_count(bm.block_table(1)[0]) == 2
    bm.append(1, 5)
    bm.append(2, 6)                      # each continues in a block of its own
    assert bm.block_table(1)[1] != bm.block_table(2)[1]
    bm.free(1)
    assert bm.ref_count(bm.block_table(2)[0]) == 1
    bm.free(2)
    assert bm.num_free == 8


def test_prefix_cache_hits_and_lru_eviction():
    bm = BlockManager(6, BS)
    prompt = list(range(10))                       # blocks [0-3] [4-7] and a partial [8, 9]
    assert bm.allocate(1, prompt) == 0
    assert bm.allocate(2, prompt + [42]) == 0      # nothing computed yet: nothing to share
    bm.free(2)
    bm.mark_computed(1, 10)
    assert bm.allocate(2, prompt + [42]) == 8      # two full blocks reused
    assert bm.block_table(2)[:2] == bm.block_table(1)[:2]
    assert bm.hit_tokens == 8 and bm.queried_tokens == 3 * 8
    bm.free(1)
    bm.free(2)
    assert bm.num_free == 6 and bm.num_cached_free == 2
    assert bm.allocate(3, prompt) == 8             # still cached after everyone left
    bm.free(3)
    assert bm.allocate(4, list(range(100, 124))) == 0   # needs all 6 blocks: evicts the cache
    bm.free(4)
    assert bm.allocate(5, prompt) == 0             # gone


def test_prefix_cache_requires_the_whole_chain():
    bm = BlockManager(16, BS)
    bm.allocate(1, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.mark_computed(1, 9)
    # same second block after a different first block: no hit (the hash chains through the prefix)
    assert bm.allocate(2, [0, 0, 0, 0, 5, 6, 7, 8, 9]) == 0
    # the whole prompt cached still recomputes its last block so the last token gets logits
    assert bm.allocate(3, [1, 2, 3, 4, 5, 6, 7, 8]) == 4


def test_reset_prefix_cache_and_accounting():
    bm = BlockManager(4, BS)
    bm.allocate(1, list(range(9)))
    bm.mark_computed(1, 9)
    bm.free(1)
    assert bm.num_cached_free == 2
    bm.reset_prefix_cache()
    assert bm.num_cached_free == 0 and bm.num_free == 4
    assert bm.allocate(2, list(range(9))) == 0


def test_errors():
    bm = BlockManager(2, BS)
    with pytest.raises(ValueError, match="empty"):
        bm.allocate(1, [])
    assert not bm.can_allocate(list(range(9)))
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(1, list(range(9)))
    bm.allocate(1, list(range(8)))
    assert not bm.can_append(1)
    with pytest.raises(IndexError, match="unknown sequence 7"):
        bm.block_table(7)
    with pytest.raises(ValueError, match="already has blocks"):
        bm.allocate(1, [1])
    with pytest.raises(ValueError, match="must be positive"):
        BlockManager(0, 4)
