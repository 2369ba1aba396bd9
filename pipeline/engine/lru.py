"""A bounded per-prompt cache: long-lived actors see unbounded streams of prompts."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

V = TypeVar("V")


class LruCache(Generic[V]):
    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, V] = OrderedDict()

    def get(self, key: str, compute: Callable[[str], V]) -> V:
        """The cached value of ``key``, computed once; the least recently used entry goes first."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = compute(key)
        self._items[key] = value
        if len(self._items) > self.size:
            self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items
