"""The one exception plait raises for bad configuration."""


class ConfigError(ValueError):
    """A configuration value that cannot work: the message names the value, the constraint and a fix.

    A subclass of ValueError, so code that already catches ValueError for bad arguments keeps working.
    """
