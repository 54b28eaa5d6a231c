"""The launch form, generated from the run config's JSON schema.

The form is the run config's own description (sections, defaults, bounds,
help text), so a field added to :class:`~trainer.config.RunConfig` appears in
the browser with no template change. Field names are dotted paths
(``gan.lr_g``), the same paths pydantic reports in ``loc``, which is how a
422 finds its way back to the input that caused it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from trainer.config import RunConfig

#: Sections in the order a user thinks about a run, with the heading shown over each.
SECTION_TITLES: dict[str, str] = {
    "": "Run",
    "data": "Data",
    "model": "Model",
    "gan": "GAN",
    "vae": "VAE",
    "train": "Training",
    "intervals": "Intervals",
}

#: Fields most runs leave at their defaults: folded under "More options" so the form fits a laptop screen.
ADVANCED: frozenset[str] = frozenset({
    "data.image_size", "data.channels",
    "gan.beta1", "gan.beta2", "gan.g_adam_eps", "gan.d_optimizer", "gan.momentum", "gan.gp_weight",
    "gan.collapse_ratio", "gan.collapse_patience",
    "vae.mc_samples", "train.resources",
    "intervals.flush_ms", "intervals.flush_steps", "intervals.telemetry_budget", "intervals.keep_checkpoints",
    "intervals.keep_samples",
})


@dataclass(frozen=True)
class FormField:
    """One input of the launch form."""

    name: str  # dotted path, e.g. "gan.lr_g"
    label: str
    help: str
    input: str  # "select", "number" or "text"
    kind: str  # "integer", "number" or "string": how a submitted string is converted back
    options: tuple[str, ...] = ()
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    default: Any = None

    @property
    def advanced(self) -> bool:
        return self.name in ADVANCED

    @property
    def step(self) -> str:
        return "1" if self.kind == "integer" else "any"

    @property
    def bounds(self) -> str:
        """Human-readable range, e.g. "0 < x ≤ 1"."""
        low = "" if self.minimum is None else f"{_fmt(self.minimum)} {'<' if self.exclusive_min else '≤'} "
        high = "" if self.maximum is None else f" {'<' if self.exclusive_max else '≤'} {_fmt(self.maximum)}"
        return f"{low}x{high}" if low or high else ""


@dataclass
class FormSection:
    key: str
    title: str
    fields: list[FormField] = field(default_factory=list)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _resolve(schema: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    ref = node.get("$ref")
    if isinstance(ref, str):
        resolved: Mapping[str, Any] = schema["$defs"][ref.rsplit("/", 1)[-1]]
        return resolved
    return node


def _field(name: str, spec: Mapping[str, Any]) -> FormField:
    optional = False
    variants = spec.get("anyOf")
    if isinstance(variants, list):
        optional = any(v.get("type") == "null" for v in variants)
        spec = {**spec, **next(v for v in variants if v.get("type") != "null")}
    kind = str(spec.get("type", "string"))
    enum = spec.get("enum")
    label = str(spec.get("title", name.rsplit(".", 1)[-1]))
    common: dict[str, Any] = {"name": name, "label": label, "help": str(spec.get("description", "")),
                              "kind": kind, "optional": optional, "default": spec.get("default")}
    if enum:
        return FormField(input="select", options=tuple(str(v) for v in enum), **common)
    if kind in ("integer", "number"):
        low = spec.get("exclusiveMinimum", spec.get("minimum"))
        high = spec.get("exclusiveMaximum", spec.get("maximum"))
        return FormField(input="number", minimum=low, maximum=high, exclusive_min="exclusiveMinimum" in spec,
                         exclusive_max="exclusiveMaximum" in spec, **common)
    return FormField(input="text", **common)


def form_sections() -> list[FormSection]:
    """Every field of :class:`RunConfig`, grouped by section, in declaration order."""
    schema = RunConfig.model_json_schema()
    sections = {key: FormSection(key, title) for key, title in SECTION_TITLES.items()}
    for key, node in schema["properties"].items():
        resolved = _resolve(schema, node)
        if resolved.get("type") == "object" and "properties" in resolved:
            section = sections.setdefault(key, FormSection(key, key.title()))
            for sub, spec in resolved["properties"].items():
                section.fields.append(_field(f"{key}.{sub}", spec))
        else:
            sections[""].fields.append(_field(key, node))
    return [s for s in sections.values() if s.fields]


def flat_values(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"gan.lr_g": 0.001, ...}`` from a nested config dict."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(flat_values(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _convert(spec: FormField, raw: str) -> Any:
    """A submitted string as the type the schema wants; left as text when it is not one, for pydantic to name."""
    text = raw.strip()
    if spec.input == "select" and spec.kind == "integer":
        return int(text) if text.lstrip("-").isdigit() else text
    try:
        if spec.kind == "integer":
            return int(text)
        if spec.kind == "number":
            return float(text)
    except ValueError:
        return text
    return raw


def nested_config(form: Iterable[tuple[str, str]], fields: Iterable[FormField]) -> dict[str, Any]:
    """A nested run-config dict from the form's dotted fields; unknown names are kept so pydantic refuses them.

    An empty input means "the default": it is left out rather than sent as "".
    """
    by_name = {f.name: f for f in fields}
    out: dict[str, Any] = {}
    for name, raw in form:
        spec = by_name.get(name)
        if spec is None or raw.strip() == "":
            if spec is None and name not in ("twin",):
                out.setdefault("__unknown__", []).append(name)
            continue
        node = out
        *parents, leaf = name.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _convert(spec, raw)
    unknown = out.pop("__unknown__", [])
    for name in unknown:
        out[name] = "?"  # the model refuses unknown keys and names them: the same error an API client gets
    return out


def errors_by_field(exc: ValidationError, prefix: tuple[str | int, ...] = ()) -> dict[str, str]:
    """pydantic errors keyed by the dotted input name they belong to ("" for the whole form).

    A model-level check (e.g. "conv needs image data") has the section as its
    ``loc``; it is shown at the top of that section.
    """
    out: dict[str, str] = {}
    for err in exc.errors(include_url=False, include_input=False, include_context=False):
        loc = [str(part) for part in (*prefix, *err["loc"])]
        name = ".".join(loc)
        message = str(err["msg"]).removeprefix("Value error, ")
        out[name] = f"{out[name]}; {message}" if name in out else message
    return out
