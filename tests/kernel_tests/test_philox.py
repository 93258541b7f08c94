"""Philox 4x32-10: known answers, the counter layout, chunk invariance and statistics."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from streammerge.kernels.philox import (
    bernoulli_keep,
    philox4x32_10,
    philox_uniform,
    philox_words,
    stream_id,
)

# Random123's kat_vectors, "philox4x32 10" lines: counter (4 words), key (2 words) -> output.
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]
SEED, STREAM = 0x0123456789ABCDEF, 0xFEDCBA9876543210


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_known_answer_vectors(counter, key, expected):
    out = philox4x32_10(*counter, *key)
    assert tuple(int(w) for w in out) == expected


@pytest.mark.parametrize("small", [64, 0], ids=["python-ints", "tensor-rounds"])
def test_known_answer_through_both_streaming_paths(small, monkeypatch):
    import streammerge.kernels.philox as philox

    monkeypatch.setattr(philox, "_SMALL", small)
    # seed 0, stream 0, elements 0..3 are the four words of counter (0, 0, 0, 0).
    assert philox_words(0, 0, 0, 4).tolist() == list(KAT[0][2])
    assert philox_words(0, 0, 1, 2).tolist() == list(KAT[0][2][1:3])


def test_counter_layout_element_is_word_e_mod_4_of_block_e_div_4():
    starts = [0, 5, (1 << 34) + 3, (1 << 64) - 300]  # crosses q_hi != 0 and the top of the space
    for start, n in itertools.product(starts, [300, 9]):  # tensor rounds, then Python ints
        e = [start + i for i in range(n)]
        q = torch.tensor([x >> 2 for x in e])  # < 2**62: fits int64
        words = torch.stack(
            philox4x32_10(
                q & 0xFFFFFFFF,
                (q >> 32) & 0xFFFFFFFF,
                STREAM & 0xFFFFFFFF,
                STREAM >> 32,
                SEED & 0xFFFFFFFF,
                SEED >> 32,
            ),
            dim=1,
        )
        want = words[torch.arange(n), torch.tensor([x & 3 for x in e])]
        assert torch.equal(philox_words(SEED, STREAM, start, n), want)


def test_pinned_values_guard_the_layout():
    # Regression pins: any change here changes every DARE/DELLA mask ever drawn.
    assert stream_id(0, "model.embed_tokens.weight") == 3196873707191880140
    assert stream_id(3, "model.layers.0.mlp.up_proj.weight") == 4783600802193148897
    assert philox_words(42, 7, 0, 6).tolist() == [
        0x67EE6F2C, 0xE55410CC, 0x6C7ECA35, 0x557398D3, 0xE5DDE940, 0x600F6196,
    ]
    assert philox_uniform(42, 7, 0, 2).tolist() == [0x67EE6F * 2.0**-24, 0xE55410 * 2.0**-24]


def splits(total: int, sizes: list[int]) -> list[tuple[int, int]]:
    out, pos, i = [], 0, 0
    while pos < total:
        size = min(sizes[i % len(sizes)], total - pos)
        out.append((pos, size))
        pos, i = pos + size, i + 1
    return out


@pytest.mark.parametrize("sizes", [[1], [7], [3, 1, 11, 4, 250], [999], [65, 64]], ids=str)
def test_chunk_invariance(sizes):
    # Pieces of <= 64 elements take the Python-int path, larger ones the tensor rounds: both agree.
    start0, n = 13, 1000
    whole_w = philox_words(SEED, STREAM, start0, n)
    whole_u = philox_uniform(SEED, STREAM, start0, n)
    whole_k = bernoulli_keep(SEED, STREAM, start0, n, 0.37)
    parts = splits(n, sizes)
    got_w = torch.cat([philox_words(SEED, STREAM, start0 + a, c) for a, c in parts])
    got_u = torch.cat([philox_uniform(SEED, STREAM, start0 + a, c) for a, c in parts])
    got_k = torch.cat([bernoulli_keep(SEED, STREAM, start0 + a, c, 0.37) for a, c in parts])
    assert torch.equal(got_w, whole_w)
    assert torch.equal(got_u, whole_u)
    assert torch.equal(got_k, whole_k)


def test_chunk_invariance_across_internal_pieces(monkeypatch):
    import streammerge.kernels.philox as philox

    whole = philox_words(SEED, STREAM, 3, 5000)
    monkeypatch.setattr(philox, "_PIECE_BLOCKS", 5)
    assert torch.equal(philox_words(SEED, STREAM, 3, 5000), whole)


def test_streams_and_seeds_differ():
    base = philox_words(1, 2, 0, 256)
    assert (base != philox_words(1, 3, 0, 256)).float().mean() > 0.99
    assert (base != philox_words(2, 2, 0, 256)).float().mean() > 0.99
    assert (base != philox_words(1, 2 + (1 << 32), 0, 256)).float().mean() > 0.99  # high word
    assert (base != philox_words(1 + (1 << 32), 2, 0, 256)).float().mean() > 0.99
    assert stream_id(0, "a.weight") != stream_id(1, "a.weight")
    assert stream_id(0, "a.weight") != stream_id(0, "b.weight")


def test_uniform_range_and_resolution():
    u = philox_uniform(SEED, STREAM, 0, 100_000)
    assert u.dtype == torch.float32
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    scaled = u.double() * 2**24
    assert torch.equal(scaled, scaled.round())  # multiples of 2**-24, exactly
    assert abs(float(u.double().mean()) - 0.5) < 4 * math.sqrt(1 / 12 / u.numel())


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_kept_fraction_within_four_sigma(p):
    n = 1_000_000
    kept = int(bernoulli_keep(SEED, STREAM, 0, n, p).sum())
    assert abs(kept - p * n) < 4 * math.sqrt(n * p * (1 - p))


def test_keep_is_exactly_u_less_than_p():
    u = philox_uniform(SEED, STREAM, 0, 20_000).double()
    for p in (0.0, 1e-9, 0.3, 0.5, 1 - 2**-24, 1.0):
        assert torch.equal(bernoulli_keep(SEED, STREAM, 0, 20_000, p), u < p)
    assert not bernoulli_keep(SEED, STREAM, 0, 1000, 0.0).any()
    assert bernoulli_keep(SEED, STREAM, 0, 1000, 1.0).all()


def test_tensor_probabilities():
    n = 4000
    p = torch.linspace(0, 1, n)
    keep = bernoulli_keep(SEED, STREAM, 10, n, p)
    assert torch.equal(keep, philox_uniform(SEED, STREAM, 10, n) < p)
    assert not keep[0] and keep[-1]
    # Chunked tensor-p draws agree with the whole draw.
    parts = [bernoulli_keep(SEED, STREAM, 10 + a, 1000, p[a : a + 1000]) for a in range(0, n, 1000)]
    assert torch.equal(torch.cat(parts), keep)


def test_bad_arguments_are_rejected_with_the_value():
    with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*64\), got -1"):
        philox_uniform(-1, 0, 0, 4)
    with pytest.raises(ValueError, match="stream must be"):
        philox_words(0, 1 << 64, 0, 4)
    with pytest.raises(ValueError, match="p must be in"):
        bernoulli_keep(0, 0, 0, 4, 1.5)
    with pytest.raises(ValueError, match="non-negative"):
        philox_words(0, 0, -1, 4)
    with pytest.raises(ValueError, match="model_index"):
        stream_id(-1, "x")
    with pytest.raises(TypeError, match="tensor_name must be a str"):
        stream_id(0, b"x")  # type: ignore[arg-type]


def test_empty_range():
    assert philox_uniform(0, 0, 17, 0).shape == (0,)
    assert bernoulli_keep(0, 0, 17, 0, 0.5).shape == (0,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: CUDA Philox path untested")
def test_cuda_draws_the_same_bits():
    for start, n in [(0, 1000), (5, 70_001), ((1 << 40) + 1, 333)]:
        assert torch.equal(philox_words(SEED, STREAM, start, n, "cuda").cpu(), philox_words(SEED, STREAM, start, n))
        assert torch.equal(
            bernoulli_keep(SEED, STREAM, start, n, 0.3, "cuda").cpu(),
            bernoulli_keep(SEED, STREAM, start, n, 0.3),
        )

