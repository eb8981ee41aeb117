"""The one error type of the model layer (kept free of the `kd` package, which imports this one), and how
an exception becomes part of a one-line message."""

import re


class ModelError(ValueError):
    """A model name, weights file or image size that cannot work. The command line prints it as one
    line and exits with code 2, like every other bad input."""


def error_reason(err: BaseException, limit: int = 120) -> str:
    """The first line of an exception's message, without terminal colour codes (torch colours some), for a
    one-line error; the exception's type when it has no message."""
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip().splitlines()
    return lines[0][:limit] if lines else type(err).__name__
