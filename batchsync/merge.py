"""Merging two streams sorted by the same key, the way a database merge join does."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

L = TypeVar("L")
R = TypeVar("R")


class OrderError(RuntimeError):
    """A stream that should be sorted is not: merging it would invent or lose rows."""


def merge_sorted(
    left: Iterable[L], right: Iterable[R], left_key: Callable[[L], str], right_key: Callable[[R], str]
) -> Iterator[tuple[str, L | None, R | None]]:
    """Yield (key, left item or None, right item or None) in key order; keys are unique on each side."""
    lefts, rights = _checked(left, left_key), _checked(right, right_key)
    a, b = next(lefts, None), next(rights, None)
    while a is not None or b is not None:
        if b is None or (a is not None and a[0] < b[0]):
            assert a is not None
            yield a[0], a[1], None
            a = next(lefts, None)
        elif a is None or b[0] < a[0]:
            yield b[0], None, b[1]
            b = next(rights, None)
        else:
            yield a[0], a[1], b[1]
            a, b = next(lefts, None), next(rights, None)


def _checked(items: Iterable[L], key: Callable[[L], str]) -> Iterator[tuple[str, L]]:
    previous: str | None = None
    for item in items:
        current = key(item)
        if previous is not None and current <= previous:
            raise OrderError(f"stream out of order: {current!r} after {previous!r}")
        previous = current
        yield current, item
