import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from streammerge.errors import CheckpointError
from streammerge.io.header import parse_header_bytes, read_header
from streammerge.io.reader import RowReader


def _raw(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def _write(tmp_path, raw: bytes):
    p = tmp_path / "x.safetensors"
    p.write_bytes(raw)
    return p


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.ones(5, dtype=torch.bfloat16),
               "empty": torch.zeros(0, 3, dtype=torch.float16), "scalar": torch.tensor(2.5, dtype=torch.float64)}
    p = tmp_path / "m.safetensors"
    save_file(tensors, p)
    h = read_header(p)
    assert set(h.tensors) == set(tensors)
    assert h.tensors["empty"].nbytes == 0 and h.tensors["scalar"].shape == ()
    with RowReader() as r:
        assert torch.equal(r.read_rows(h.tensors["a"], 1, 3), tensors["a"][1:3])
        assert torch.equal(r.read_rows(h.tensors["b"], 0, 1), tensors["b"])
        assert r.read_rows(h.tensors["empty"], 0, 0).shape == (0, 3)
        assert r.read_rows(h.tensors["scalar"], 0, 1).item() == 2.5


def test_unaligned_offsets_read_correctly(tmp_path):
    a = torch.tensor([1, 2, 3], dtype=torch.int8)
    b = torch.tensor([1.5, -2.0], dtype=torch.float32)
    data = a.numpy().tobytes() + b.numpy().tobytes()
    p = _write(tmp_path, _raw({"a": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
                               "b": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}, data))
    h = read_header(p)
    with RowReader() as r:
        assert torch.equal(r.read_rows(h.tensors["b"], 0, 1), b)


@pytest.mark.parametrize("raw, needle", [
    (b"\x01\x02", "too short"),
    (struct.pack("<Q", 1000) + b"{}", "runs past the end of the file"),
    (struct.pack("<Q", 200 * 1024 * 1024) + b"{}", "exceeds the"),
    (struct.pack("<Q", 3) + b"{{{", "not valid JSON"),
    (struct.pack("<Q", 2) + b"[]", "must be a JSON object"),
    (_raw({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\0"), "unknown dtype 'Q7'"),
    (_raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4), "needs 8"),
    (_raw({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "file truncated"),
    (_raw({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "non-negative integers"),
    (_raw({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "not ordered"),
    (_raw({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
])
def test_damaged_headers_raise_checkpoint_errors_naming_the_file(tmp_path, raw, needle):
    p = _write(tmp_path, raw)
    with pytest.raises(CheckpointError) as e:
        read_header(p)
    assert needle in str(e.value)
    assert str(p) in str(e.value)


def test_parse_is_pure_on_bytes():
    raw = _raw({"t": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}, b"\0" * 8)
    from pathlib import Path

    h = parse_header_bytes(Path("mem"), raw, len(raw))
    assert h.tensors["t"].rows == 2 and h.tensors["t"].row_bytes == 4
