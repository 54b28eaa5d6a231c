"""A run's free-form config: what wandb users type (``config.lr``, ``config["lr"]``, ``config.update``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any


class Config(MutableMapping[str, Any]):
    """A run's free-form config: ``config["lr"]``, ``config.lr`` and ``config.update({...})`` as in wandb."""

    def __init__(self, data: Mapping[str, Any] | None = None, on_change: Callable[[], None] | None = None) -> None:
        object.__setattr__(self, "_data", dict(data or {}))
        object.__setattr__(self, "_on_change", on_change)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._data[key] = value
        if self._on_change is not None:
            self._on_change()

    def __delitem__(self, key: str) -> None:
        del self._data[key]
        if self._on_change is not None:
            self._on_change()

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._data[name]
        except KeyError:
            raise AttributeError(f"config has no {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def update(self, *args: Any, **kwargs: Any) -> None:
        self._data.update(*args, **kwargs)
        if self._on_change is not None:
            self._on_change()

    def as_dict(self) -> dict[str, Any]:
        return dict(self._data)

    def __repr__(self) -> str:
        return f"Config({self._data!r})"


def plain(value: Any, depth: int = 0) -> Any:
    """A config value as JSON can carry it (an argparse Namespace's Paths and enums become strings)."""
    if depth > 8:
        return str(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v, depth + 1) for v in value]
    if callable(getattr(value, "item", None)) and getattr(value, "shape", None) in ((), (1,)):
        return plain(value.item(), depth + 1)  # a one-element tensor or NumPy value
    if hasattr(value, "__dict__") and type(value).__name__ == "Namespace":
        return plain(vars(value), depth + 1)
    return str(value)
