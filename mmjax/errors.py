"""The errors users see: a `UserError` means "fix your config, data or paths".

The command line prints a `UserError` as one line (`mmjax: error: ...`, exit
status 2); any other exception is a bug and raises with its traceback
(`MMJAX_DEBUG=1` shows the traceback of a `UserError` too).

Subclasses live next to the code that raises them (`DataError` in
`mmjax.data.pipeline`, `CheckpointError` in `mmjax.train.checkpoint`, ...);
`ConfigError` is here so that any module, models included, can raise it.
"""


class UserError(Exception):
    """A problem the user must fix (config, data, paths, a busy workdir); the
    message names the key, file or cause."""


class ConfigError(UserError, ValueError):
    """A config problem; the message names the key or file."""


class ConvertError(UserError, ValueError):
    """A checkpoint that cannot be imported (architecture, shapes, missing tensors)."""


class MissingFieldError(UserError, KeyError):
    """Batches lack a field an evaluation needs (the message names it)."""
