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


class ProblemsError(StreammergeError):
    """Several problems found at once (by `streammerge check` or the checks `run` makes first)."""

    def __init__(self, problems: list[StreammergeError]):
        self.problems = problems
        lines = "\n".join(f"  {i}. {str(p).replace(chr(10), chr(10) + '     ')}" for i, p in enumerate(problems, 1))
        super().__init__(f"{len(problems)} problems found:\n{lines}")
