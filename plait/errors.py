"""The one exception plait raises for bad configuration."""


class ConfigError(ValueError):
    """A configuration value that cannot work: the message names the value, the constraint and a fix.

    A subclass of ValueError, so code that already catches ValueError for bad arguments keeps working.
    """


class MemoryCapExceeded(MemoryError):
    """This rank's model states outgrew the memory cap the run was given (``plait train --mem-cap-gb``)."""


def divisors(n: int) -> str:
    """The divisors of ``n`` as a set literal, for messages that suggest a value that fits."""
    return "{" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + "}"


def require_divisor(axis: str, value: int, world: int, option: str) -> None:
    """ConfigError unless ``value`` ranks along ``axis`` divide the ``world``; names the ``option`` values that fit."""
    if world % value:
        raise ConfigError(
            f"{axis}={value} does not divide the world size {world}; use {option} in {divisors(world)}"
        )
