"""lorakit.data.batches: batch order fixed by (seed, epoch), so a resumed run sees the same batches."""

from lorakit.data.batches import MicroBatches, iterate_batches


def collate(rows):
    return list(rows)


def test_iterate_in_order_or_seeded():
    data = list(range(10))
    assert list(iterate_batches(data, collate, 4, None)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    shuffled = [x for b in iterate_batches(data, collate, 4, 3) for x in b]
    assert sorted(shuffled) == data and shuffled != data
    assert shuffled == [x for b in iterate_batches(data, collate, 4, 3) for x in b]


def test_micro_batches_depend_only_on_seed_and_epoch():
    data = list(range(10))
    micro = MicroBatches(data, collate, 4, seed=7)
    assert micro.per_epoch == 3
    epoch0, epoch1 = [micro[k] for k in range(3)], [micro[k] for k in range(3, 6)]
    assert sorted(x for b in epoch0 for x in b) == data and epoch0 != epoch1
    fresh = MicroBatches(data, collate, 4, seed=7)
    assert fresh[4] == epoch1[1] and fresh[0] == epoch0[0]  # any k, in any order
