"""Helpers of the `mmjax` commands: `--config.KEY=VALUE` overrides and one-line errors."""
from __future__ import annotations

import os
import sys

from mmjax.errors import UserError


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """`argv` -> (other arguments, `KEY=VALUE` of each `--config.KEY=VALUE`)."""
    rest, overrides = [], []
    for a in argv:
        if a.startswith("--config."):
            overrides.append(a[len("--config."):])
        else:
            rest.append(a)
    return rest, overrides


def fail(msg: str) -> int:
    """Prints `mmjax: error: <first line of msg>` (all of it under MMJAX_DEBUG); returns 2."""
    print(f"mmjax: error: {msg}".splitlines()[0] if os.environ.get("MMJAX_DEBUG") is None
          else f"mmjax: error: {msg}", file=sys.stderr)
    return 2


def error_text(e: BaseException) -> str:
    """The message of `e` as written (str() of a KeyError adds quotes around it)."""
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return e.args[0]
    return str(e)


def user_errors() -> tuple:
    """Exceptions that mean "fix your config / data / paths": shown as one line.

    Anything else is a bug and raises with its traceback. Set MMJAX_DEBUG=1 to
    get the full traceback of these too.
    """
    if os.environ.get("MMJAX_DEBUG"):
        return ()
    return (UserError, FileNotFoundError)
