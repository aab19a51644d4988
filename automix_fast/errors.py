"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, checkpoint), reported in one line."""


class ConfigError(UserError, ValueError):
    """A config field has an unknown name, a wrong type or an out-of-range value."""


class DataError(UserError):
    """The data directory or a file in it cannot be used."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not match the run."""


class OutputError(UserError, OSError):
    """A file of the run cannot be written (read-only folder, full disk, no permission).

    Also an OSError, so code that handles failed writes generically still sees one."""

    def __init__(self, message: str):
        super().__init__(message)
