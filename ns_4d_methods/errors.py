"""The one error type for bad user input: a one-line message and a non-zero exit, no traceback."""

from __future__ import annotations


class InputError(SystemExit):
    """Bad user input (a file, a field, a flag) that ends the command.

    It derives from ``SystemExit`` so that ``ns-train``/``ns-render`` print just the message and exit with status 1
    instead of a traceback; library callers and tests can still catch it by type. The message names the file or the
    field and what was expected.
    """

    def __init__(self, message: str) -> None:
        message = " ".join(message.split())  # one line, whatever the caller formatted
        super().__init__(f"error: {message}")
        self.message = message

    def __str__(self) -> str:
        return self.message
