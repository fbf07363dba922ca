"""The training loop's micro-batch stream: every row once per epoch, and a branched run's position."""

import pytest

from gptoss_tune.train.stream import MicroBatchStream


def _ids(stream, indices):
    return [r["id"] for i in indices for r in stream.rows_of(i)]


def test_each_epoch_visits_every_row_once_in_a_seeded_order():
    rows = [{"id": i} for i in range(10)]
    s = MicroBatchStream(rows, 3, seed=5)
    assert s.per_epoch == 4
    e0, e1 = _ids(s, range(0, 4)), _ids(s, range(4, 8))
    assert sorted(e0) == sorted(e1) == list(range(10)) and e0 != e1
    assert _ids(MicroBatchStream(rows, 3, seed=5), range(8)) == e0 + e1  # a pure function of (rows, size, seed)


@pytest.mark.parametrize("old,new", [(3, 2), (2, 3), (4, 4), (1, 7)])
@pytest.mark.parametrize("consumed", [0, 2, 5, 9])
def test_branching_with_another_batch_size_neither_repeats_nor_skips_a_whole_batch(old, new, consumed):
    rows = [{"id": i} for i in range(10)]
    before, after = MicroBatchStream(rows, old, seed=1), MicroBatchStream(rows, new, seed=1)
    start = after.position_from(consumed, old)
    epoch = consumed // before.per_epoch
    assert start // after.per_epoch == epoch or start == (epoch + 1) * after.per_epoch  # same epoch (or its very end)
    seen = _ids(before, range(epoch * before.per_epoch, consumed))
    rest = _ids(after, range(start, (epoch + 1) * after.per_epoch))
    assert not set(seen) & set(rest), "a row seen twice in one epoch"
    assert len(seen) + len(rest) > len(rows) - new, "a whole batch of rows skipped"
    if old == new:
        assert start == consumed
