"""Device-resident splits and seeded, disjoint, resumable per-rank shards."""

from __future__ import annotations

import pytest
import torch

from cifarray.data.cifar import load_cifar100
from cifarray.data.loader import ShardedBatches, prepare
from cifarray.errors import UserError


def test_ranks_draw_disjoint_shards_covering_the_epoch():
    world, n, batch = 4, 1000, 40
    samplers = [ShardedBatches(n, batch, rank=r, world=world, seed=3) for r in range(world)]
    epoch = [torch.cat([s.next() for _ in range(s.batches_per_epoch)]) for s in samplers]
    seen = torch.cat(epoch)
    assert len(seen) == len(set(seen.tolist())) == n  # disjoint, and the whole epoch (1000 / 4 / 10)
    assert all(len(s.next()) == batch // world for s in samplers)


def test_order_is_seeded_changes_per_epoch_and_resumes():
    a = ShardedBatches(100, 10, seed=1)
    first = [a.next() for _ in range(15)]  # crosses into epoch 2
    assert not torch.equal(first[0], first[10])
    b = ShardedBatches(100, 10, seed=1)
    for _ in range(7):
        b.next()
    state = b.state_dict()
    c = ShardedBatches(100, 10, seed=1)
    c.load_state_dict(state)
    assert all(torch.equal(c.next(), first[i]) for i in range(7, 15))
    assert not torch.equal(ShardedBatches(100, 10, seed=2).next(), first[0])


def test_batch_errors():
    with pytest.raises(UserError, match="divisible by the number of workers"):
        ShardedBatches(100, 10, world=3)
    with pytest.raises(UserError, match="exceeds the 50 training images"):
        ShardedBatches(50, 64)


def test_prepare_keeps_test_apart_and_normalises_on_train(synth_dir):
    data = load_cifar100(synth_dir, verify=False)
    p = prepare(data, val_size=500, seed=0)
    assert len(p.train) == 2500 and len(p.val) == 500 and len(p.test) == len(data.test)
    assert p.train.images.dtype == torch.uint8 and p.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(p.test.images, torch.from_numpy(data.test.images))
    mean = p.train.images.double().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor(p.mean, dtype=torch.float64), atol=1e-6)
