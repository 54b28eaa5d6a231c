"""What differs between runs' configs: the compare page's table, only the fields that are not the same everywhere.

Twins, sweeps and resumed runs share all but a field or two of several dozen; listing every field would hide the
one that explains the difference in the charts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.web.form import flat_values

#: Rows shown at most: a script's free-form config may hold thousands of fields.
MAX_ROWS = 200
MISSING = "—"


@dataclass(frozen=True)
class ConfigDiff:
    """``rows``: (dotted field, one cell per run), in field order; ``more``: differing fields left out."""

    rows: list[tuple[str, list[str]]]
    more: int = 0
    values: list[tuple[str, list[Any]]] = field(default_factory=list)  # the rows' values as they are (None: absent)

    def varied(self) -> list[dict[str, Any]]:
        """The differing fields but the run's name, with their values, for the parallel-coordinates view."""
        return [{"name": name, "values": values} for name, values in self.values if name != "name"]


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, allow_nan=True)


def _same(a: Any, b: Any) -> bool:
    """Equal as values: 1 and 1.0 are the same number, but True is not 1 and "1" is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return bool(a == b)


def config_diff(configs: Sequence[Mapping[str, Any]], limit: int = MAX_ROWS) -> ConfigDiff:
    """The fields whose values are not the same in every config (a field some configs lack counts as differing),
    each with its value per config as text ("—" where absent). Nested sections are flattened to dotted names."""
    flat = [flat_values(config) for config in configs]
    fields = list(dict.fromkeys(name for values in flat for name in values))
    differing = [name for name in fields
                 if any(name not in values for values in flat)
                 or not all(_same(flat[0][name], values[name]) for values in flat[1:])]
    shown = differing[:limit]
    rows = [(name, [_cell(values[name]) if name in values else MISSING for values in flat]) for name in shown]
    raw = [(name, [values.get(name) for values in flat]) for name in shown]
    return ConfigDiff(rows, max(0, len(differing) - limit), raw)
