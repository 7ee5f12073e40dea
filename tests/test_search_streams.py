"""Counter-based random streams: exact bits, distributions, disjoint stream keys, batch independence."""

from __future__ import annotations

import torch

from db3kd.search import KeyedGenerator, PairKeys, Stream, stream_key
from db3kd.search.streams import mix, mix_int, normal, rademacher, uniform


def test_tensor_mix_equals_the_python_reference_bit_for_bit():
    values = [0, 1, -1, 2**62, -(2**63), 2**63 - 1, 123456789, -987654321]
    got = mix(torch.tensor(values, dtype=torch.int64)).tolist()
    assert got == [mix_int(v) for v in values]


def test_distributions():
    keys = stream_key(Stream.MBD, 0, torch.arange(4))
    u = uniform(keys, 50_000)
    assert u.shape == (4, 50_000) and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    z = normal(keys, 50_000)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1.0) < 0.02
    s = rademacher(keys, 1000)
    assert set(s.unique().tolist()) == {-1.0, 1.0} and abs(float(s.mean())) < 0.05
    # different keys give different draws; the same key the same draw
    assert not torch.equal(z[0], z[1]) and torch.equal(normal(keys[2], 100), z[2, :100])


def test_stream_keys_are_disjoint_where_the_old_keys_collided():
    """Old keys: label construction sample * L + class, generation key * 1000 + iteration, the final
    step seed + 1. With an explicit stream id the same numbers give unrelated keys."""
    seed = 0
    fields = torch.arange(2000)
    label = stream_key(Stream.MBD, seed, fields // 10, fields % 10)
    walk = stream_key(Stream.GENERATION_WALK, seed, fields // 10, fields % 10)
    step = stream_key(Stream.GENERATION_STEP, seed, fields // 10, fields % 10)
    next_seed = stream_key(Stream.MBD, seed + 1, fields // 10, fields % 10)
    sets = [set(k.tolist()) for k in (label, walk, step, next_seed)]
    assert all(len(s) == 2000 for s in sets)  # no collision inside a stream either
    for i in range(4):
        for j in range(i + 1, 4):
            assert not sets[i] & sets[j], (i, j)


def test_pair_directions_do_not_depend_on_batch_mates():
    keys = PairKeys.of(Stream.MBD, 3, torch.arange(6), torch.arange(6) % 3)
    signs_all, block_all = keys.directions(None, 5, 7, 11)
    rows = torch.tensor([4, 1])
    signs_sub, block_sub = keys.directions(rows, 5, 7, 11)
    assert torch.equal(signs_sub, signs_all[rows]) and torch.equal(block_sub, block_all)
    assert torch.allclose(block_all.norm(dim=1), torch.ones(7))
    # another step draws new directions
    assert not torch.equal(keys.directions(None, 6, 7, 11)[1], block_all)


def test_keyed_generator_is_a_fixed_sequence():
    a, b = KeyedGenerator(stream_key(Stream.GENERATION_NOISE, 1, 0)), KeyedGenerator(stream_key(Stream.GENERATION_NOISE, 1, 0))
    first = [a.rand(3, 4), a.randn(5), a.randint(torch.tensor([[3], [7]]), (2, 6))]
    second = [b.rand(3, 4), b.randn(5), b.randint(torch.tensor([[3], [7]]), (2, 6))]
    assert all(torch.equal(x, y) for x, y in zip(first, second))
    ints = first[2]
    assert int(ints[0].max()) < 3 and int(ints[1].max()) < 7 and int(ints.min()) >= 0
    assert not torch.equal(a.rand(3, 4), first[0])  # the next call reads the next block
