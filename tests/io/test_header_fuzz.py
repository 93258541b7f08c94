"""Hostile headers, generated: whatever the bytes, `read_header` either returns offsets that lie inside
the file or raises CheckpointError naming the file; never another exception, never a hang. Whatever the
safetensors library itself loads (in dtypes we know), we load too, with the same tensors and bytes."""

from __future__ import annotations

import atexit
import contextlib
import json
import math
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from conftest import no_hang
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save

from streammerge.errors import CheckpointError
from streammerge.io.header import DTYPES, MAX_HEADER_BYTES, read_header

FUZZ = settings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
TORCH_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int8, torch.uint8, torch.int32,
                torch.int64, torch.bool]

_DIR = Path(tempfile.mkdtemp(prefix="streammerge-fuzz-"))  # one file rewritten per example (a fixture per
atexit.register(shutil.rmtree, _DIR, True)                   # example would trip hypothesis's health check)
_FILE = _DIR / "fuzz.safetensors"


def _valid(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save(tensors, metadata=metadata)


SAMPLES = [
    _valid({"model.embed_tokens.weight": torch.randn(8, 4, dtype=torch.float32).to(torch.bfloat16),
            "model.layers.0.mlp.up_proj.weight": torch.arange(12, dtype=torch.float16).reshape(3, 4),
            "model.norm.weight": torch.ones(4, dtype=torch.float32),
            "empty": torch.zeros(0, 4, dtype=torch.float16), "scalar": torch.tensor(2.5, dtype=torch.float64)},
           {"format": "pt"}),
    _valid({"a": torch.arange(5, dtype=torch.int8)}),
    _valid({}),
]


def _no_hang(seconds: float = 2.0):
    return no_hang(seconds, "read_header")


def _safetensors_view(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the reference implementation makes of the file, or None where it refuses it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():
                t = f.get_tensor(name)
                if t.dtype not in TORCH_DTYPES:
                    return None
                out[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes()
                             if t.numel() else b"")
            return out
    except Exception:  # the reference's own error types vary by version; a refusal is all we need
        return None


def _outcome(raw: bytes):
    """Read `raw` as a file; check every promise of the parser; returns the Header or None on refusal."""
    _FILE.write_bytes(raw)
    with _no_hang():
        try:
            h = read_header(_FILE)
        except CheckpointError as e:
            assert str(_FILE) in str(e)
            assert len(str(e)) < 2000, "a hostile header must not blow up the message"
            h = None
    reference = _safetensors_view(_FILE)
    if h is None:
        known = reference is not None and all(dt in TORCH_DTYPES for dt, _, _ in reference.values())
        assert not known, "safetensors loads this file but read_header refused it"
        return None
    (n,) = struct.unpack("<Q", raw[:8])
    assert h.file_size == len(raw) and h.data_start == 8 + n <= len(raw) and n <= MAX_HEADER_BYTES
    spans = []
    for name, t in h.tensors.items():
        assert t.name == name and t.dtype in DTYPES and t.file == _FILE
        assert h.data_start <= t.begin <= t.end <= len(raw)
        assert t.end - t.begin == math.prod(t.shape) * DTYPES[t.dtype][1]
        if t.end > t.begin:
            spans.append((t.begin, t.end))
    spans.sort()
    assert all(e0 <= b1 for (_, e0), (b1, _) in zip(spans, spans[1:])), "overlapping tensors accepted"
    if reference is not None:
        assert set(reference) == set(h.tensors)
        for name, (dtype, shape, data) in reference.items():
            t = h.tensors[name]
            assert (t.torch_dtype, t.shape) == (dtype, shape)
            assert raw[t.begin:t.end] == data
    return h


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join(doc, data: bytes, pad: int = 0) -> bytes:
    head = (json.dumps(doc) if not isinstance(doc, bytes) else doc.decode("utf-8", "replace")).encode() + b" " * pad
    return struct.pack("<Q", len(head)) + head + data


# -- the samples themselves and every truncation of them ---------------------------------------------

@pytest.mark.parametrize("raw", SAMPLES, ids=["mixed", "int8", "empty"])
def test_valid_samples_parse_and_every_truncation_is_refused(raw):
    h = _outcome(raw)
    assert h is not None and set(h.tensors) == set(_split(raw)[0]) - {"__metadata__"}
    for cut in range(len(raw)):  # every length class: inside the length field, the JSON, the data
        assert _outcome(raw[:cut]) is None, f"a file cut to {cut} of {len(raw)} bytes was accepted"


# -- generated damage --------------------------------------------------------------------------------

samples = st.sampled_from(SAMPLES)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)
big_ints = st.integers(-2**64, 2**64) | st.sampled_from([0, 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, -1])


@FUZZ
@given(raw=samples, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=8))
def test_byte_flips(raw, flips):
    data = bytearray(raw)
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    _outcome(bytes(data))


@FUZZ
@given(raw=samples, cut=st.integers(0, 10**6), extra=st.binary(max_size=16))
def test_truncated_or_extended(raw, cut, extra):
    _outcome(raw[: cut % (len(raw) + 1)] + extra)


@FUZZ
@given(raw=samples, length=big_ints.filter(lambda v: v >= 0) | st.integers(-40, 40) | st.sampled_from(
    [MAX_HEADER_BYTES, MAX_HEADER_BYTES + 1, 2**64 - 1]), relative=st.booleans())
def test_header_length_field(raw, length, relative):
    (n,) = struct.unpack("<Q", raw[:8])
    value = (n + length if relative else length) % 2**64
    _outcome(struct.pack("<Q", value) + raw[8:])


def _entry_edits(doc: dict, names: list[str]):
    """A strategy of functions that damage one tensor's entry."""
    if not names:
        return st.just(lambda d: None)
    name = st.sampled_from(names)
    other = st.sampled_from(names)

    def setter(key, values):
        return st.builds(lambda n, v: (lambda d: d[n].__setitem__(key, v)), name, values)

    return st.one_of(
        setter("data_offsets", st.lists(big_ints, min_size=0, max_size=3)),
        setter("data_offsets", json_values),
        st.builds(lambda a, b: (lambda d: d[b].__setitem__("data_offsets", list(d[a]["data_offsets"]))), name, other),
        st.builds(lambda a, k: (lambda d: d[a].__setitem__(
            "data_offsets", [d[a]["data_offsets"][0] + k, d[a]["data_offsets"][1] + k])), name, st.integers(-64, 64)),
        setter("dtype", st.sampled_from([*DTYPES, "U16", "F4", "C64", "f32", "", "BF16 "]) | json_values),
        setter("shape", st.lists(big_ints, max_size=4) | st.lists(st.integers(0, 2**40), min_size=60, max_size=300)
               | json_values),
        st.builds(lambda a: (lambda d: d[a].pop("shape")), name),
        st.builds(lambda a, v: (lambda d: d.__setitem__(a, v)), name, json_values),
        st.builds(lambda v: (lambda d: d.__setitem__("__metadata__", v)), json_values),
    )


@FUZZ
@given(data=st.data(), raw=samples, pad=st.integers(0, 9), keep=st.integers(-4, 4))
def test_json_edits(data, raw, pad, keep):
    doc, tail = _split(raw)
    names = [k for k in doc if k != "__metadata__"]
    for edit in data.draw(st.lists(_entry_edits(doc, names), min_size=1, max_size=3)):
        with contextlib.suppress(KeyError, TypeError, IndexError, AttributeError):
            edit(doc)  # an earlier edit may have removed what this one changes
    tail = tail[: len(tail) + keep] if keep < 0 else tail + b"\0" * keep
    _outcome(_join(doc, tail, pad))


@FUZZ
@given(doc=json_values, data=st.binary(max_size=32))
@example(doc=[], data=b"")
@example(doc="{}", data=b"")
def test_header_is_any_json(doc, data):
    _outcome(_join(doc, data))


@pytest.mark.parametrize("header, needle", [
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, ' + b"4" * 5000 + b"]}}", "not valid JSON"),
    (b'{"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype ['F32']"),
    (b'{"t": {"dtype": {"a": 1}, "shape": [1], "data_offsets": [0, 4]}}', "unknown dtype {'a': 1}"),
    (b'{"t": {"dtype": "F32", "shape": [' + b",".join([b"9" * 4000] * 3) + b'], "data_offsets": [0, 4]}}',
     "needs more than 2^"),
    (b'{"' + b"n" * 10_000 + b'": {"dtype": "F32", "shape": [1], "data_offsets": [0, 8]}}', "tensor 'nnnn"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_hostile_header_regressions(header, needle):
    """Headers that once escaped as RecursionError, TypeError or ValueError, or made a message as long as
    the header; and a non-UTF-8 one."""
    raw = struct.pack("<Q", len(header)) + header + b"\0" * 4
    _FILE.write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        read_header(_FILE)
    assert needle in str(e.value) and len(str(e.value)) < 1000
