"""Typed errors: every message names the object, what was expected, and the fix."""


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
