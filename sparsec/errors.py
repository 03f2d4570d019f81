"""User-facing errors: every failure a user can cause is a SparsecError with a one-line message."""
from __future__ import annotations

import difflib


class SparsecError(Exception):
    """A failure caused by the user's input or environment; the CLI prints it without a traceback.

    ``exit_code`` is 1 for failures and 2 for usage / pipeline syntax errors.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(SparsecError):
    """Bad command-line usage or a bad pipeline / option (exit code 2)."""

    exit_code = 2


class PipelineSyntaxError(UsageError):
    """A pipeline spec that does not parse; carries the text and the 0-based column of the problem."""

    def __init__(self, message: str, text: str, column: int):
        self.text, self.column = text, column
        super().__init__(f"pipeline spec, column {column + 1}: {message}")

    def __str__(self) -> str:
        pad = "".join(c if c == "\t" else " " for c in self.text[:self.column])  # keep tabs so the caret lines up
        return f"{self.message}\n  {self.text}\n  {pad}^"


def did_you_mean(word: str, choices) -> str:
    """' (did you mean 'x'?)' for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
