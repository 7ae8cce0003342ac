"""The training data order: seeded, resumable, independent of the number of workers."""
import numpy as np
import pytest

from raylm.config import ConfigError
from raylm.data import BatchPlan, Cursor, PackedRows, rank_slice


def test_order_is_a_permutation_per_epoch_and_reshuffles():
    plan = BatchPlan(num_rows=20, batch_size=4, seed=7)
    epoch0 = np.concatenate([plan.next_global_batch() for _ in range(5)])
    assert sorted(epoch0.tolist()) == list(range(20))
    epoch1 = np.concatenate([plan.next_global_batch() for _ in range(5)])
    assert sorted(epoch1.tolist()) == list(range(20))
    assert epoch0.tolist() != epoch1.tolist()
    assert plan.cursor == Cursor(epoch=1, position=20)


def test_tail_shorter_than_a_batch_is_skipped():
    plan = BatchPlan(num_rows=10, batch_size=4, seed=0)
    batches = [plan.next_global_batch() for _ in range(3)]
    assert all(len(b) == 4 for b in batches)
    assert plan.cursor.epoch == 1  # the third batch came from epoch 1 (2 rows of epoch 0 were left)


def test_cursor_resumes_the_same_order():
    straight = BatchPlan(num_rows=33, batch_size=4, seed=3)
    seen = [straight.next_global_batch() for _ in range(20)]
    half = BatchPlan(num_rows=33, batch_size=4, seed=3)
    for _ in range(9):
        half.next_global_batch()
    resumed = BatchPlan(num_rows=33, batch_size=4, seed=3, cursor=half.cursor)
    rest = [resumed.next_global_batch() for _ in range(11)]
    assert all((a == b).all() for a, b in zip(seen[9:], rest))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_partition_the_global_batch(world):
    rows = np.arange(8) * 3
    parts = [rank_slice(rows, r, world) for r in range(world)]
    assert np.concatenate(parts).tolist() == rows.tolist()


def test_more_batch_than_rows_is_refused():
    with pytest.raises(ConfigError, match="lower --batch_size"):
        BatchPlan(num_rows=3, batch_size=4, seed=0)


def test_packed_rows_mask_padding(packed_data):
    rows = PackedRows(str(packed_data), "train")
    last = np.array([len(rows) - 1])
    ids, labels = rows.batch(last)
    length = int(rows.lengths[-1])
    assert ids.shape == (1, rows.max_length)
    assert (labels[0, length:] == -100).all() and (labels[0, :length] >= 0).all()
    assert rows.target_tokens(last) == length - 1
