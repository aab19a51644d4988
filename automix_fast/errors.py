"""User-facing errors: the CLI prints these as one line, without a traceback."""


class UserError(Exception):
    """A mistake in the user's input (flags, config, data, checkpoint), reported in one line."""


class ConfigError(UserError, ValueError):
    """A config field has an unknown name, a wrong type or an out-of-range value."""


class DataError(UserError):
    """The data directory or a file in it cannot be used."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not match the run."""
