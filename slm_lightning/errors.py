"""The exception every bad setting raises: one line naming the key as the user typed it."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and what is allowed.

    The CLI prints the message alone and exits with status 2.
    """
