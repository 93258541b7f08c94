"""Loaded by every Ray worker of the test cluster (its folder is put on PYTHONPATH before `ray.init`):
when STREAMMERGE_TEST_KILL_DIR holds a file `arm`, the first worker to write a band of a shard takes it
(a rename: one worker wins) and SIGKILLs itself mid-shard, as a lost machine would."""

import os

_DIR = os.environ.get("STREAMMERGE_TEST_KILL_DIR")
if _DIR:
    import signal

    from streammerge.io import writer as _writer

    _write = _writer.ShardWriter.write

    def _write_then_maybe_die(self, name, byte_offset, chunk):
        n = _write(self, name, byte_offset, chunk)
        try:
            os.rename(os.path.join(_DIR, "arm"), os.path.join(_DIR, "fired"))
        except FileNotFoundError:
            return n
        with open(os.path.join(_DIR, "killed_in"), "w") as f:
            f.write(str(self.final_path))
        os.kill(os.getpid(), signal.SIGKILL)
        return n

    _writer.ShardWriter.write = _write_then_maybe_die
