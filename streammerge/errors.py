"""Typed errors: every message names the object, what was expected, and the fix.

Names, paths and values in a message come from files and flags we did not write (a hostile header can
hold megabytes in one tensor name), so every message part from outside goes through `clip` or `short`.
"""


def clip(text: str, limit: int = 80) -> str:
    """A name, path or value cut to `limit` characters for a message, unquoted."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short(value: object, limit: int = 80) -> str:
    """`repr(value)` cut to `limit` characters for a message (quoted, where `clip` is not)."""
    return clip(repr(value), limit)


class StreammergeError(Exception):
    """Base of every error streammerge raises on purpose."""


class ConfigError(StreammergeError):
    """The merge config is invalid; the message carries the key path."""


class CheckpointError(StreammergeError):
    """An input checkpoint is missing, damaged or inconsistent."""


class BudgetError(StreammergeError):
    """The memory budget cannot hold the smallest unit of work."""


class OutputError(StreammergeError):
    """The output folder cannot be written as asked."""


class ResumeError(StreammergeError):
    """A --resume manifest does not match this run."""


class ProblemsError(StreammergeError):
    """Several problems found at once (by `streammerge check` or the checks `run` makes first)."""

    def __init__(self, problems: list[StreammergeError]):
        self.problems = problems
        lines = "\n".join(f"  {i}. {str(p).replace(chr(10), chr(10) + '     ')}" for i, p in enumerate(problems, 1))
        super().__init__(f"{len(problems)} problems found:\n{lines}")


class HubError(CheckpointError):
    """A hub repository cannot be reached, read or downloaded; the message never holds a token."""
