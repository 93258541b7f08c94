import pytest
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
    w = ShardWriter(ours, outs, {"format": "pt"}, checksum=False)
    # rows land out of order and in pieces: offsets are fixed by the header (the checksum needs them in order)
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
    w = ShardWriter(p, [OutTensor("t", "F32", (1001, 7))], checksum=False)
    order = list(range(0, 1001, 37))
    for lo in order[1::2] + order[0::2]:     # out of order, as chunks finish
        w.write("t", lo * 28, t[lo:lo + 37])
    w.commit()
    assert len(dropped) > 5
    assert torch.equal(load_file(p)["t"], t)


def _outs(tensors):
    codes = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}
    return data_offsets_in_order([OutTensor(n, codes[t.dtype], tuple(t.shape)) for n, t in tensors.items()])


def test_checksum_streamed_in_order_matches_the_file_and_safetensors(tmp_path):
    """Zero-size and 0-d tensors included: bytes as safetensors writes them, digest as --resume recomputes it."""
    from streammerge.io.checksum import file_digest

    tensors = {"w": torch.randn(5, 3), "s": torch.tensor(2.5), "e": torch.zeros(3, 0, dtype=torch.float16),
               "b": torch.randn(7).to(torch.bfloat16)}
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    ours = tmp_path / "ours.safetensors"
    w = ShardWriter(ours, _outs(tensors), {"format": "pt"})
    w.write("w", 0, tensors["w"][:2])
    w.write("w", 2 * 3 * 4, tensors["w"][2:])
    for n in ("s", "e", "b"):
        assert w.write(n, 0, tensors[n]) == tensors[n].numel() * tensors[n].element_size()
    w.commit()
    assert ours.read_bytes() == ref.read_bytes()
    assert w.digest.hexdigest() == file_digest(ours) == file_digest(ref)


def test_durable_commit_fsyncs_the_folder_after_the_rename(tmp_path, monkeypatch):
    from streammerge.io import writer

    calls = []
    monkeypatch.setattr(writer, "fsync_dir", lambda path: calls.append((path, (path / "x.safetensors").exists())))
    for durable in (True, False):
        w = ShardWriter(tmp_path / "x.safetensors", [OutTensor("t", "F32", (2,))], durable=durable)
        w.write("t", 0, torch.ones(2))
        w.commit()
    assert calls == [(tmp_path, True)]   # once, after the rename, and only when durable


def test_fsync_dir_syncs_a_directory_fd(tmp_path, monkeypatch):
    import os
    import stat

    from streammerge.io import writer

    synced = []
    real = os.fsync
    monkeypatch.setattr(writer.os, "fsync", lambda fd: (synced.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd)))
    w = ShardWriter(tmp_path / "x.safetensors", [OutTensor("t", "F32", (2,))])
    w.write("t", 0, torch.ones(2))
    w.commit()
    assert synced == [False, True]   # the file, then its folder


@pytest.mark.parametrize("where", ["header", "data", "fsync"])
def test_full_disk_is_an_output_error_with_the_bytes_still_needed(tmp_path, monkeypatch, where):
    import errno
    import os

    from streammerge.errors import OutputError
    from streammerge.io import writer

    def full(*a):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    p = tmp_path / "x.safetensors"
    t = OutTensor("t", "F32", (1000, 100))   # 400 KB: header and one 4 KB page at most are on disk
    if where == "header":
        monkeypatch.setattr(writer.os, "pwrite", full)
        with pytest.raises(OutputError) as info:
            ShardWriter(p, [t])
    else:
        w = ShardWriter(p, [t])
        monkeypatch.setattr(writer.os, "pwrite" if where == "data" else "fsync", full)
        with pytest.raises(OutputError) as info:
            w.write("t", 0, torch.ones(1000, 100)) if where == "data" else w.commit()
        w.abort()
    msg = str(info.value)
    size = 400_000 + len(writer.build_header([t])[0])
    need = int(msg.split("(need ")[1].split(" ")[0])
    if where != "fsync":
        assert size - 4096 * 2 <= need <= size, msg
    assert msg == f"No space left on device: {p} (need {need} more bytes); free space and run with --resume"
    assert not p.exists() and not (tmp_path / "x.safetensors.partial").exists()


def test_other_write_errors_pass_through(tmp_path, monkeypatch):
    import errno

    from streammerge.io import writer

    w = ShardWriter(tmp_path / "x.safetensors", [OutTensor("t", "F32", (2,))])

    def broken(*a):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer.os, "pwrite", broken)
    with pytest.raises(OSError, match="Input/output error"):
        w.write("t", 0, torch.ones(2))
    w.abort()
    assert not (tmp_path / "x.safetensors.partial").exists()


def test_data_order_is_safetensors_dtype_order_not_item_size(tmp_path):
    """Names chosen so that ordering by item size then name would differ from safetensors: BF16 "z" before
    F16 "a", F32 "y" before I32 "b", I64 "x" before F64 "c", and one tensor of every dtype we write."""
    tensors = {"z": torch.randn(3).to(torch.bfloat16), "a": torch.randn(5).to(torch.float16),
               "y": torch.randn(2, 2), "b": torch.arange(6, dtype=torch.int32), "c": torch.randn(3, dtype=torch.float64),
               "x": torch.arange(4, dtype=torch.int64), "i16": torch.arange(3, dtype=torch.int16),
               "e4": torch.randn(4).to(torch.float8_e4m3fn), "e5": torch.randn(4).to(torch.float8_e5m2),
               "a8": torch.arange(5, dtype=torch.int8), "u8": torch.arange(5, dtype=torch.uint8),
               "ok": torch.tensor([True, False, True]), "y2": torch.randn(3), "b0": torch.zeros(0, dtype=torch.int32)}
    ref = tmp_path / "ref.safetensors"
    save_file(tensors, ref, metadata={"format": "pt"})
    from streammerge.io.header import CODE_OF

    outs = data_offsets_in_order([OutTensor(n, CODE_OF[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    assert [t.name for t in outs][:8] == ["x", "c", "y", "y2", "b", "b0", "z", "a"]
    ours = tmp_path / "ours.safetensors"
    w = ShardWriter(ours, outs, {"format": "pt"})
    for t in outs:
        w.write(t.name, 0, tensors[t.name])
    w.commit()
    assert ours.read_bytes() == ref.read_bytes()
    assert list(read_header(ours).tensors) == [t.name for t in outs]
