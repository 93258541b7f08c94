"""What a model reference in a config means: a local path, or a hub repository at a revision.

Pure string work (no network, no huggingface_hub), so the config layer can normalise references and
the planner can tell a hub name from a mistyped path before anything is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# the hub's rules for a repo id: `name` or `org/name`, letters, digits, '-', '_', '.'; no '--' or '..'
_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")


@dataclass(frozen=True)
class RepoRef:
    """A hub repository and the revision asked for (None: the default branch)."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_ref(ref: str) -> RepoRef | None:
    """`org/name` or `org/name@revision` as a RepoRef; None when `ref` cannot be a hub name (then it is a
    path). Whether a local path of that name exists is the caller's question: a path wins."""
    repo, _, revision = ref.partition("@")
    if not _REPO_ID.match(repo) or "--" in repo or ".." in repo:
        return None
    if "@" in ref and not _REVISION.match(revision):
        return None
    return RepoRef(repo, revision or None)


def is_local(ref: str, config_dir: Path | None) -> bool:
    """A reference that names an existing file or folder (from the working directory or the config's)."""
    try:
        p = Path(ref).expanduser()
        return p.exists() or (not p.is_absolute() and config_dir is not None and (config_dir / p).exists())
    except (OSError, ValueError, RuntimeError):
        return False


def normalize_model_field(value: Any) -> Any:
    """mergekit's dict form of a model reference (`{model: {path, revision}, lora, override_architecture}`)
    as the string form `path@revision`; a LoRA or an architecture override is refused by name, since
    streammerge does not apply them yet. Anything else is returned for the field's own validation."""
    if not isinstance(value, dict):
        return value
    allowed = {"model", "lora", "override_architecture"}
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise ValueError(f"a model reference mapping takes the keys {sorted(allowed)}, not {unknown}")
    if value.get("lora") is not None:
        raise ValueError("LoRA adapters in a model reference ('lora:') are not supported yet; merge the adapter "
                         "into its model first (peft's merge_and_unload) and name the merged folder")
    if value.get("override_architecture") is not None:
        raise ValueError("'override_architecture' in a model reference is not supported; streammerge reads the "
                         "architecture from the model's config.json")
    inner = value.get("model")
    if isinstance(inner, str):
        return inner
    if not isinstance(inner, dict) or not isinstance(inner.get("path"), str):
        raise ValueError("a model reference mapping needs model: {path: ORG/NAME or a folder, revision: REV}")
    extra = sorted(set(map(str, inner)) - {"path", "revision"})
    if extra:
        raise ValueError(f"model.model takes the keys ['path', 'revision'], not {extra}")
    revision = inner.get("revision")
    if revision is None:
        return inner["path"]
    if not isinstance(revision, str) or not _REVISION.match(revision):
        raise ValueError(f"model.model.revision {revision!r}: give a branch, tag or commit hash")
    return f"{inner['path']}@{revision}"
