"""The output folder's policy: when a run may use it, what `--overwrite` may delete, one run at a time.

A folder is a merge output only when it holds streammerge's manifest or mergekit's marker
(`mergekit_config.yml`). `--overwrite` then deletes only the files a merge writes, and unlinks a
symlink rather than what it points to: a user's notes and subfolders, and an input reached through a
link, survive. A folder holding nothing but streammerge's start-up files (a run stopped or refused
before its manifest existed) counts as empty.

The lock is `fcntl.flock` on `.streammerge/lock`, held from before anything is deleted until the index
is written, and released by the kernel when the process dies (SIGKILL included). The lock file is never
deleted: a run that unlinked it would let the next lock a new file while a third still holds the old.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError, ResumeError, clip
from .checkpoint import GENERATION_FILES, TOKENIZER_FILES

MANIFEST_DIR = ".streammerge"
MANIFEST = "manifest.json"
LOCK = "lock"
MERGEKIT_MARKER = "mergekit_config.yml"
_STARTUP_FILES = frozenset({LOCK, MANIFEST + ".partial"})
_MERGE_FILES = frozenset({"model.safetensors.index.json", "config.json", "README.md", MERGEKIT_MARKER,
                          *TOKENIZER_FILES, *GENERATION_FILES})
_SHARD_PATTERN = "model*.safetensors"
_RESUME_FIX = "run with --overwrite instead of --resume to start the merge again"


def manifest_path(out: Path) -> Path:
    return Path(out) / MANIFEST_DIR / MANIFEST


def _startup_only(out: Path) -> bool:
    """Only `.streammerge/` with nothing but a lock or a half-written manifest in it."""
    entries = list(out.iterdir())
    if [e.name for e in entries] != [MANIFEST_DIR] or entries[0].is_symlink() or not entries[0].is_dir():
        return False
    return all(e.name in _STARTUP_FILES for e in entries[0].iterdir())


def folder_state(out: Path) -> str:
    """'empty' (missing, empty or start-up files only), 'streammerge', 'mergekit' or 'foreign'."""
    if not out.exists() or not any(out.iterdir()) or _startup_only(out):
        return "empty"
    if manifest_path(out).is_file():
        return "streammerge"
    if (out / MERGEKIT_MARKER).is_file():
        return "mergekit"
    return "foreign"


def check_outside(out: Path, files: Iterable[str | os.PathLike]) -> None:
    """Refuse when a file the run reads (the config, an input shard) resolves inside the output folder:
    overwriting or resuming could delete or replace it."""
    out_abs = Path(out).resolve()
    for f in files:
        real = Path(f).resolve()
        if out_abs == real or out_abs in real.parents:
            via = f" (through a link, to {real})" if real != Path(f).absolute() else ""
            raise OutputError(f"{clip(str(f), 120)}{clip(via, 120)} is inside the output folder {out}, which this run may "
                              "overwrite; move it out, or choose an output folder that holds none of the run's inputs")


def merge_files(out: Path, planned: Iterable[str] = ()) -> list[Path]:
    """The entries of `out` a merge writes (shards, *.partial, index, config, tokenizer, card, markers)."""
    planned = set(planned)
    owned = []
    for e in sorted(out.iterdir()):
        name = e.name
        if name == MANIFEST_DIR or (e.is_dir() and not e.is_symlink()):
            continue  # a real subfolder is never ours; .streammerge is emptied by clear_output
        if (name in _MERGE_FILES or name in planned or name.endswith(".partial")
                or fnmatch.fnmatchcase(name, _SHARD_PATTERN)):
            owned.append(e)
    return owned


def clear_output(out: Path, planned: Iterable[str] = ()) -> list[str]:
    """Delete the files a merge wrote into `out` (links unlinked, never followed) and the contents of
    `.streammerge/` but its lock and manifest; call with the lock held, after writing the new run's
    manifest (it replaces the old one atomically, so the folder is never without a marker).
    Returns the names deleted."""
    gone = []
    for e in merge_files(out, planned):
        e.unlink()
        gone.append(e.name)
    state = out / MANIFEST_DIR
    if state.is_symlink():
        state.unlink()
        gone.append(MANIFEST_DIR)
    elif state.is_dir():
        for e in sorted(state.iterdir()):
            if e.name in (LOCK, MANIFEST) and e.is_file() and not e.is_symlink():
                continue
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)  # rmtree unlinks the links inside, never follows them
            else:
                e.unlink()
            gone.append(f"{MANIFEST_DIR}/{e.name}")
    return gone


def remove_partials(out: Path) -> None:
    """Unlink the in-progress files a stopped run left (`*.partial`, here and in `.streammerge/`): each
    is rewritten from scratch, and a stale one could be a link that writing would follow."""
    for d in (out, out / MANIFEST_DIR):
        if d.is_dir() and not d.is_symlink():
            for e in d.iterdir():
                if e.name.endswith(".partial") and (e.is_symlink() or not e.is_dir()):
                    e.unlink()


def check_folder(out: Path, overwrite: bool, resume: bool) -> str:
    """May this run write into `out`? Nothing is created or deleted here. Returns `folder_state(out)`."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"output {out} exists and is not a folder; choose a folder path")
    state = folder_state(out)
    if resume:
        if state in ("foreign", "mergekit"):
            raise ResumeError(f"--resume: {out} holds files but no {MANIFEST_DIR}/{MANIFEST}, so it was not started "
                              "by streammerge; run without --resume into an empty folder")
        return state
    if state == "empty":
        return state
    if not overwrite:
        raise OutputError(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                          "or --resume to continue an interrupted merge into it")
    if state == "foreign":
        raise OutputError(f"output folder {out} holds files but neither {MANIFEST_DIR}/{MANIFEST} (streammerge's) nor "
                          f"{MERGEKIT_MARKER} (mergekit's), so it is not a merge output; refusing to delete them with "
                          "--overwrite. Pick an empty or new folder")
    return state


def read_manifest(out: Path) -> dict:
    """The manifest of an interrupted run, checked: {'fingerprint': str, 'shards': {name: {'size', 'checksum'}}}."""
    path = manifest_path(out)
    try:
        doc = json.loads(path.read_bytes())
    except OSError as e:
        raise ResumeError(f"--resume: cannot read {path}: {e.strerror}; {_RESUME_FIX}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ResumeError(f"--resume: {path} is damaged (not JSON: {clip(str(e), 80)}); {_RESUME_FIX}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("fingerprint"), str) or not isinstance(doc.get("shards"), dict):
        raise ResumeError(f"--resume: {path} is damaged (expected an object with a 'fingerprint' string and a 'shards' "
                          f"object); {_RESUME_FIX}")
    for name, rec in doc["shards"].items():
        if (not isinstance(rec, dict) or type(rec.get("size")) is not int or rec["size"] < 0
                or not isinstance(rec.get("checksum", ""), str)):
            raise ResumeError(f"--resume: {path} is damaged (shard {clip(name, 60)!r}: expected "
                              f"{{\"size\": bytes, \"checksum\": text}}); {_RESUME_FIX}")
    return doc


class OutputLock:
    """The exclusive lock on an output folder; the holder's pid is written in the lock file."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / MANIFEST_DIR / LOCK
        self._fd = -1

    def acquire(self) -> OutputLock:
        """Take the lock without waiting; OutputError naming the holder's pid when another run has it."""
        state = self.path.parent
        if state.is_symlink():
            raise OutputError(f"{state} is a symbolic link; streammerge keeps its manifest and lock in a real folder "
                              "there: remove the link, or choose another output folder")
        state.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            what = "is a symbolic link" if e.errno == errno.ELOOP else f"cannot be opened ({e.strerror})"
            raise OutputError(f"lock file {self.path} {what}; remove it (when no merge is running) and run again") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_pid(fd)
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise OutputError(f"lock file {self.path}: cannot lock it ({e.strerror}); the filesystem may not "
                                  "support locks: choose an output folder on a local disk") from None
            raise OutputError(f"output folder {self.out} is in use by another streammerge run (pid {holder}); wait "
                              "for it to end or stop it, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor drops the flock
            self._fd = -1

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def check_report_path(path: str | os.PathLike) -> None:
    """Refuse a `--report` path that cannot be written, before the merge rather than after it."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"--report {p}: is a folder; name a file, such as {p / 'report.json'}")
    parent = p.absolute().parent
    if not parent.exists():
        raise OutputError(f"--report {p}: the folder {parent} does not exist; create it or name a file in an "
                          "existing folder")
    if not parent.is_dir():
        raise OutputError(f"--report {p}: {parent} is not a folder; name a file in an existing folder")
    if p.exists() and not p.is_file():
        raise OutputError(f"--report {p}: exists and is not a regular file; name a new or ordinary file")
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise OutputError(f"--report {p}: not writable; name a file in a folder you can write to")
