"""The one error type users see.

A `QTrainError` is a user mistake or an environment problem that the user can fix: its message names the
key, file or value and says what to do. The CLI prints it as one paragraph and exits with code 2, without a
traceback. Internal invariants use `assert` instead; a failed assert is a bug in qtrain, not in the input.
"""

from __future__ import annotations


class QTrainError(Exception):
    """A problem the user can fix; the message says what and how."""


class ConfigError(QTrainError):
    """The config file or an override is invalid; one line per problem, each with its dotted key."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        noun = "problem" if len(problems) == 1 else "problems"
        super().__init__(f"{source}: {len(problems)} {noun}:\n{lines}")


class DataError(QTrainError):
    """A training or eval file cannot be used; the message names the file and, where known, the line."""
