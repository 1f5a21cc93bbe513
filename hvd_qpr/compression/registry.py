"""Names of compressors, in one place: ``from_name("qsgd", bits=4)``."""

from __future__ import annotations

from collections.abc import Callable

from hvd_qpr.compression.base import Compressor

_FACTORIES: dict[str, Callable[..., Compressor]] = {}


def register(name: str) -> Callable[[Callable[..., Compressor]], Callable[..., Compressor]]:
    """Decorator naming a compressor factory (a class or a function returning a compressor).

    Example:
        >>> @register("mine")
        ... def mine(**kwargs):
        ...     return MyCompressor(**kwargs)
    """

    def add(factory: Callable[..., Compressor]) -> Callable[..., Compressor]:
        if name in _FACTORIES:
            raise ValueError(f"a compressor named {name!r} is already registered")
        _FACTORIES[name] = factory
        return factory

    return add


def names() -> list[str]:
    """Registered compressor names, sorted."""
    return sorted(_FACTORIES)


def from_name(name: str, **kwargs: object) -> Compressor:
    """The compressor registered as name, built with kwargs.

    Raises:
        ValueError: unknown name (the message lists the registered ones).

    Example:
        >>> from_name("qsgd", bits=2).bits
        2
    """
    if name not in _FACTORIES:
        raise ValueError(f"unknown compressor {name!r}; registered compressors: {names()}")
    return _FACTORIES[name](**kwargs)
