import torch
from safetensors.torch import load_file, save_file

from streammerge.io.header import read_header
from streammerge.io.writer import OutTensor, ShardWriter, data_offsets_in_order


def test_writer_matches_safetensors_byte_for_byte(tmp_path):
    tensors = {"w": torch.randn(5, 3), "b": torch.randn(7).to(torch.bfloat16), "e": torch.zeros(0, 2, dtype=torch.float16),
               "h": torch.randn(2, 2, dtype=torch.float64)}
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    outs = data_offsets_in_order([OutTensor(n, {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                                                torch.float64: "F64"}[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    ours = tmp_path / "ours.safetensors"
    w = ShardWriter(ours, outs, {"format": "pt"})
    # rows land out of order and in pieces: offsets are fixed by the header
    w.write("w", 3 * 4 * 3, tensors["w"][3:])
    w.write("w", 0, tensors["w"][:3])
    for n in ("b", "e", "h"):
        w.write(n, 0, tensors[n])
    assert not ours.exists()
    w.commit()
    assert ours.read_bytes() == ref.read_bytes()
    assert not (tmp_path / "ours.safetensors.partial").exists()


def test_round_trip_through_our_reader(tmp_path):
    t = torch.randn(9, 4).to(torch.bfloat16)
    p = tmp_path / "x.safetensors"
    w = ShardWriter(p, [OutTensor("t", "BF16", (9, 4))])
    w.write("t", 0, t)
    w.commit()
    assert read_header(p).tensors["t"].shape == (9, 4)
    assert torch.equal(load_file(p)["t"], t)


def test_abort_leaves_no_final_file(tmp_path):
    p = tmp_path / "x.safetensors"
    w = ShardWriter(p, [OutTensor("t", "F32", (2,))])
    w.abort()
    assert not p.exists()


def test_drop_behind_keeps_every_byte(tmp_path, monkeypatch):
    """Pages dropped from the cache behind the writer (tiny window here) must not lose data, including
    pages shared by two chunks whose boundary is not page-aligned."""
    from streammerge.io import writer

    if not writer._DROP:
        import pytest

        pytest.skip("no sync_file_range / posix_fadvise on this platform")
    dropped = []
    real = writer.os.posix_fadvise
    monkeypatch.setattr(writer, "DROP_BEHIND_BYTES", 5000)
    monkeypatch.setattr(writer.os, "posix_fadvise", lambda fd, off, n, adv: (dropped.append((off, n)), real(fd, off, n, adv)))
    t = torch.randn(1001, 7)   # 28 bytes a row: chunk boundaries fall inside pages
    p = tmp_path / "x.safetensors"
    w = ShardWriter(p, [OutTensor("t", "F32", (1001, 7))])
    order = list(range(0, 1001, 37))
    for lo in order[1::2] + order[0::2]:     # out of order, as chunks finish
        w.write("t", lo * 28, t[lo:lo + 37])
    w.commit()
    assert len(dropped) > 5
    assert torch.equal(load_file(p)["t"], t)
