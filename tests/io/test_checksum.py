"""The shard checksum the writer builds as it streams equals the one --resume computes from the file."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from streammerge.io.checksum import ShardDigest, file_digest
from streammerge.io.header import read_header


def _digest_streamed(path, band_rows: int) -> str:
    """Feed the file's tensors band by band, as the writer does."""
    header = read_header(path)
    raw = path.read_bytes()
    offsets = {n: t.begin for n, t in header.tensors.items()}
    d = ShardDigest(raw[: header.data_start], offsets)
    for name, t in header.tensors.items():
        step = max(1, t.row_bytes * band_rows)
        for off in range(0, t.end - t.begin, step):
            d.update(name, off, raw[t.begin + off: min(t.end, t.begin + off + step)])
    return d.hexdigest()


def test_streamed_digest_matches_file_and_any_banding(tmp_path):
    g = torch.Generator().manual_seed(0)
    f = tmp_path / "s.safetensors"
    save_file({"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).bfloat16(),
               "empty": torch.zeros(0, 4)}, str(f))
    want = file_digest(f)
    assert want.startswith("crc32-sha256:")
    assert _digest_streamed(f, 1) == _digest_streamed(f, 3) == want


def test_one_flipped_byte_changes_the_digest(tmp_path):
    f = tmp_path / "s.safetensors"
    save_file({"a": torch.arange(64, dtype=torch.float32).reshape(8, 8)}, str(f))
    before = file_digest(f)
    data = bytearray(f.read_bytes())
    data[-3] ^= 1
    f.write_bytes(bytes(data))
    assert file_digest(f) != before


def test_out_of_order_bytes_are_refused(tmp_path):
    d = ShardDigest(b"h", {"a": 0})
    d.update("a", 0, b"1234")
    try:
        d.update("a", 8, b"5678")
    except RuntimeError as e:
        assert "expected the bytes from 4" in str(e)
    else:
        raise AssertionError("a gap in a tensor's bytes must be refused")


def test_digest_is_zlibs_crc32_whichever_implementation_runs(tmp_path):
    """A manifest written where ISA-L's CRC-32 runs must verify where only zlib's does, and back."""
    import hashlib
    import zlib

    import numpy as np

    raw = np.random.default_rng(1).integers(0, 256, size=3_000_001, dtype=np.uint8)
    d = ShardDigest(b"head", {"t": 0})
    for lo in range(0, raw.size, 777_777):
        d.update("t", lo, raw[lo:lo + 777_777])
    h = hashlib.sha256(f"header:{zlib.crc32(b'head'):08x}\n".encode())
    h.update(f"t:{zlib.crc32(raw.tobytes()):08x}\n".encode())
    assert d.hexdigest() == "crc32-sha256:" + h.hexdigest()
