"""The dashboard's HTML: full pages, and the fragments htmx swaps into them.

Pages are rendered on the server (Jinja2, autoescaped); the live charts are
fed by ``static/js`` over the run websocket. Every action here goes through
the same :class:`~app.manager.RunManager` calls as the JSON API, so the
browser can do nothing an API client cannot, and is refused what they are.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, replace
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app.api.deps import ManagerDep, StoreDep
from app.api.runs import artifacts_of, update_meta
from app.api.schemas import RunMetaPatch
from app.manager import RunError, RunManager
from app.ray_backend import describe_node
from app.store import RUN_STATUSES, TERMINAL_STATUSES, RunRecord, Store
from app.web.diff import config_diff
from app.web.form import FormField, errors_by_field, flat_values, form_sections, nested_config
from trainer.config import TWO_D_DATASETS, RunConfig
from trainer.presets import get_preset

#: A launch form is a few kilobytes; anything much larger is not one.
MAX_FORM_BYTES = 64 * 1024
#: Runs overlaid on one compare page: one websocket and up to five lines each. Chosen from the compare-page benchmark
#: (bench/browser.py --compare, docs/benchmarks.md §8): one 16-step frame from every run costs the page 140 ms of
#: JS at 20 runs with WebGL (the bar: under 200 ms, the page still answering a hover or zoom within a fifth of a
#: second while every run streams), 238 ms at 50; 20 runs load in about 4 s.
MAX_COMPARE = 20
#: Runs whose data plane or sample grids the compare page shows side by side (each plane is a heat map and a
#: snapshot fetch per slider move); the line charts still show every run.
MAX_PLANES = 6
#: Past this many runs the compare page's charts drop their legends (one or two entries a run would crowd out the
#: lines): the run list above them, in columns, names every run in its colour and dash (static/js/compare.js).
LEGEND_RUNS = 8


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    blurb: str
    config: str  # name in trainer.presets
    twin: bool = False


PRESETS: tuple[Preset, ...] = (
    Preset("saturation-twin", "Saturation twin: watch the gradient collapse",
           "Ring of 8, launched twice with the same seed, saturating and non-saturating loss, side by side. "
           "D trains alone for the first 500 steps and wins. Within them the saturating run's generator gradient "
           "falls about 10,000-fold (its 'gradient collapse' alert lights up) and stays there: its generator never "
           "moves and captures 0 of 8 modes. The non-saturating run, same weights, same D, keeps a gradient of 1 "
           "and more, and learns the ring: 7–8 of 8 modes, over 90 % of samples on a mode by step 8,000 (about "
           "two minutes for both on a 2-core CPU). Press 'Flip to non_saturating' on the saturating run and watch "
           "it recover.",
           "ring8-saturating", twin=True),
    Preset("ring8-non-saturating", "Ring of 8, non-saturating",
           "The configuration that learns all eight modes.", "ring8-non-saturating"),
    Preset("grid-saturation-twin", "Grid twin: when the supports overlap",
           "The saturation twin's recipe on PacGAN's grid of 25 (spacing 2, std 0.05), both losses, same seed. D "
           "trains alone for 500 steps and wins, but less completely than on the ring (mean D(G(z)) about 0.01, "
           "not 0.00003): an untrained generator puts its samples on the centre mode, where real data is, so D "
           "cannot push all of them to 0, and the saturating gradient never collapses (the theory's collapse needs "
           "disjoint supports). Both halves learn most of the grid by step 8,000 (measured, seeds 0–2: saturating "
           "18–25 of 25 modes, non-saturating 17–22).",
           "grid25-saturating", twin=True),
    Preset("grid25-non-saturating", "Grid of 25, non-saturating",
           "PacGAN's 5×5 grid at its own scale: 20–25 of 25 modes and about 90 % of samples on a mode by step 8,000 "
           "(seeds 0–2).",
           "grid25-non-saturating"),
    Preset("digits-gan", "Digits GAN", "DCGAN-style nets on scikit-learn's 8×8 handwritten digits.", "digits-gan"),
    Preset("digits-vae", "Digits VAE", "A VAE on the same digits: ELBO, KL per dimension, active units.",
           "digits-vae"),
)
PRESETS_BY_KEY = {p.key: p for p in PRESETS}


def get_templates(request: Request) -> Jinja2Templates:
    templates: Jinja2Templates = request.app.state.templates
    return templates


TemplatesDep = Annotated[Jinja2Templates, Depends(get_templates)]

router = APIRouter(include_in_schema=False)


def _at(obj: Any, *path: str) -> Any:
    """``obj[path[0]][path[1]]…``, or None where a level is missing or not a dict (a script's config is free-form)."""
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    """``value`` if it is of ``kind`` (never a bool standing in for a number), else None."""
    return value if isinstance(value, kind) and not isinstance(value, bool) else None


def _run_config(rec: RunRecord) -> dict[str, Any]:
    """The run's config where it is a run config (a launched run, a synced ``gradwatch train`` folder), else {}.

    A script's config is whatever its script passed (any JSON): nothing in it is read as settings, unless it is
    exactly a complete run config (which is what a headless ``gradwatch train --out`` folder carries).
    """
    if not rec.external:
        return rec.config
    try:
        valid = RunConfig.model_validate(rec.config).model_dump(mode="json") == rec.config
    except (ValidationError, TypeError, ValueError):
        valid = False
    return rec.config if valid else {}


def _source(rec: RunRecord) -> dict[str, Any] | None:
    """What a script's run header shows of where it came from, every value a plain string (or None)."""
    if rec.source is None:
        return None
    src = rec.source

    def text(value: Any) -> str | None:
        return str(value) if value not in (None, "") and not isinstance(value, (dict, list)) else None

    git = src.get("git") if isinstance(src.get("git"), dict) else None
    commit = text(git.get("commit")) if git else None
    argv = src.get("argv") if isinstance(src.get("argv"), list) else []
    return {
        "origin": "sync" if src.get("origin") == "sync" else "script",
        "host": text(src.get("host")), "script": text(src.get("script")) or "script",
        "argv": shlex.join(str(a) for a in argv) if argv else None,
        "commit": commit, "short": commit[:8] if commit else None, "branch": text(git.get("branch")) if git else None,
        "dirty": bool(git.get("dirty")) if git else False,
        "python": text(src.get("python")), "gradwatch": text(src.get("gradwatch")), "project": text(src.get("project")),
        "pid": text(src.get("pid")), "folder": text(src.get("folder")),
    }


#: A script's config shown in its header: at most this many rows, each value cut to this many characters.
CONFIG_ROWS = 300
CONFIG_VALUE_CHARS = 300


def config_rows(config: Any) -> tuple[list[tuple[str, str]], bool]:
    """A free-form config as ``(dotted key, value as text)`` rows, nested dicts flattened; and whether it was cut.

    Strings are shown as they are, anything else as compact JSON. Text only: the template escapes it.
    """
    rows: list[tuple[str, str]] = []

    def walk(prefix: str, value: Any, depth: int) -> None:
        if len(rows) > CONFIG_ROWS:
            return
        if isinstance(value, dict) and value and depth < 6:
            for key, item in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), item, depth + 1)
            return
        shown = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
        if len(shown) > CONFIG_VALUE_CHARS:
            shown = shown[:CONFIG_VALUE_CHARS] + "…"
        rows.append((prefix or "(config)", shown))

    if isinstance(config, dict):
        for key, item in config.items():
            walk(str(key), item, 1)
    elif config is not None:
        walk("", config, 0)
    return rows[:CONFIG_ROWS], len(rows) > CONFIG_ROWS


def _allowed(rec: RunRecord) -> dict[str, bool]:
    """Which controls the run page shows: all for a launched run, only those its script registered for a script's."""
    controls = rec.controls
    show = {c: controls is None or c in controls for c in ("stop", "g_loss", "lr_g", "lr_d")}
    show["form"] = show["g_loss"] or show["lr_g"] or show["lr_d"]
    return show


def _where(rec: RunRecord) -> dict[str, str] | None:
    """Where a run on a Ray cluster is: what it waits for while Ray has no room for it, then its node."""
    placement = rec.placement or {}
    if placement.get("backend") != "ray":
        return None
    if rec.status == "queued" and placement.get("waiting_for"):
        return {"state": "waiting", "text": f"waiting for Ray: {placement['waiting_for']}"}
    if placement.get("node_id"):
        return {"state": "placed", "text": f"Ray node {describe_node(placement)}"}
    return None


def _row(rec: RunRecord, manager: RunManager) -> dict[str, Any]:
    cfg = _run_config(rec)
    steps = _typed(_at(cfg, "train", "steps"), int)
    source = _source(rec)
    return {
        "id": rec.id, "name": rec.name, "kind": rec.kind, "status": rec.status, "step": rec.step,
        "steps": steps if steps and steps > 0 else None, "dataset": _typed(_at(cfg, "data", "name"), str),
        "g_loss": _typed(_at(cfg, "gan", "g_loss"), str) if rec.kind == "gan" else None,
        "rate": manager.steps_per_s(rec.id), "device": rec.device or "—", "alert": rec.last_alert,
        # UTC here, marked so; static/js/time.js shows it in the browser's own time zone.
        "created": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(rec.created_at)), "created_at": rec.created_at,
        "ended": rec.status in TERMINAL_STATUSES, "error": rec.error,
        "external": rec.external, "source": source, "can_stop": _allowed(rec)["stop"], "where": _where(rec),
        "tags": rec.tags or [], "notes": rec.notes or "", "sweep_id": rec.sweep_id,
    }


def _form_context(values: dict[str, Any], *, errors: dict[str, str] | None = None, preset: str = "",
                  twin: bool = False) -> dict[str, Any]:
    errors = errors or {}
    kind = values.get("kind", "gan")
    # Open what a user edits most, the section of the chosen kind, and every section with an error in it.
    open_sections = {"", "data", "train", "gan" if kind == "gan" else "vae"}
    open_sections |= {name.split(".", 1)[0] if "." in name else name for name in errors}
    chosen = PRESETS_BY_KEY.get(preset)
    return {"sections": form_sections(), "values": values, "errors": errors, "presets": PRESETS,
            "preset": preset, "twin": twin, "open_sections": open_sections,
            "blurb": chosen.blurb if chosen else ""}


def _preset_values(key: str) -> tuple[dict[str, Any], bool]:
    preset = PRESETS_BY_KEY.get(key)
    if preset is None:
        raise RunError(404, f"no preset {key!r}; one of {', '.join(PRESETS_BY_KEY)}")
    return flat_values(get_preset(preset.config).model_dump(mode="json")), preset.twin


#: Rows per page of the runs table the user may choose; the first is not the default.
PAGE_SIZES = (25, 50, 100)
DEFAULT_PAGE_SIZE = 50
STATUS_FILTERS = ("active", *RUN_STATUSES)
KIND_FILTERS = ("gan", "vae", "custom")


@dataclass(frozen=True)
class TableQuery:
    """The runs table's filters, page and grouping: what the runs page's URL and its filter form carry."""

    q: str = ""
    status: str = ""
    kind: str = ""
    tag: str = ""
    sweep: str = ""
    page: int = 1
    per: int = DEFAULT_PAGE_SIZE
    group: bool = True

    def params(self, **changes: Any) -> dict[str, str]:
        """The query parameters that say this state (defaults left out), with ``changes`` applied."""
        state = {**self.__dict__, **changes}
        out = {k: str(state[k]) for k in ("q", "status", "kind", "tag", "sweep") if state[k]}
        if state["page"] != 1:
            out["page"] = str(state["page"])
        if state["per"] != DEFAULT_PAGE_SIZE:
            out["per"] = str(state["per"])
        if not state["group"]:
            out["group"] = "0"
        return out

    def url(self, **changes: Any) -> str:
        params = self.params(**changes)
        return "/?" + urlencode(params) if params else "/"


def table_query(request: Request) -> TableQuery:
    """The table state from a request's query; what is not understood is left at its default, never a 422 (a
    shared link with a stale filter still opens the runs page)."""
    q = request.query_params

    def text(name: str, limit: int) -> str:
        return q.get(name, "").strip()[:limit]

    def number(name: str, default: int) -> int:
        raw = q.get(name, "")
        return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 9 else default

    status, kind = text("status", 20), text("kind", 20)
    per = number("per", DEFAULT_PAGE_SIZE)
    return TableQuery(q=text("q", 200), status=status if status in STATUS_FILTERS else "",
                      kind=kind if kind in KIND_FILTERS else "", tag=text("tag", 40), sweep=text("sweep", 64),
                      page=max(1, number("page", 1)), per=per if per in PAGE_SIZES else DEFAULT_PAGE_SIZE,
                      group=q.get("group", "1") not in ("0", "off", "false"))


def _sweep_label(members: list[RunRecord]) -> str:
    """What varies across a sweep's runs, e.g. ``gan.g_loss: saturating, non_saturating``."""
    if len(members) < 2:
        return ""
    diff = config_diff([rec.config for rec in reversed(members)])  # oldest first: the order the sweep made them
    parts = []
    for name, values in diff.values:
        if name == "name":
            continue
        shown = list(dict.fromkeys(v if isinstance(v, str) else json.dumps(v) for v in values))
        parts.append(f"{name}: {', '.join(shown)}")
    return "; ".join(parts[:4]) + (f"; +{len(parts) - 4} more" if len(parts) > 4 else "")


def _sweep_group(sweep_id: str, members: list[RunRecord]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for rec in members:
        counts[rec.status] = counts.get(rec.status, 0) + 1
    ids = [rec.id for rec in reversed(members)]
    return {"id": sweep_id, "label": _sweep_label(members) or "sweep", "count": len(members),
            "statuses": sorted(counts.items(), key=lambda kv: RUN_STATUSES.index(kv[0])),
            "compare": f"/compare?runs={','.join(ids)}"}


async def _table_context(table: TableQuery, store: Store, manager: RunManager) -> dict[str, Any]:
    """One page of the runs table (filtered in SQL), and its sweep groups when grouping is on."""
    offset = (table.page - 1) * table.per
    records, total = await asyncio.to_thread(store.page_runs, table.q, table.status, table.kind, table.tag,
                                             table.sweep, table.per, offset)
    pages = max(1, -(-total // table.per))
    if not records and table.page > pages:  # past the end (runs were deleted, a filter narrowed): the last page
        table = replace(table, page=pages)
        offset = (pages - 1) * table.per
        records, total = await asyncio.to_thread(store.page_runs, table.q, table.status, table.kind, table.tag,
                                                 table.sweep, table.per, offset)
    rows = [_row(rec, manager) for rec in records]
    # Each sweep with a run on this page is shown as one block, where its newest run on the page is.
    blocks: list[dict[str, Any]] = []
    if table.group and not table.sweep:
        sweep_ids = [rec.sweep_id for rec in records if rec.sweep_id]
        sweeps = await asyncio.to_thread(store.sweep_runs, sweep_ids) if sweep_ids else {}
        by_sweep: dict[str, dict[str, Any]] = {}
        for row in rows:
            sweep_id = row["sweep_id"]
            if sweep_id and len(sweeps.get(sweep_id, [])) > 1:
                if sweep_id not in by_sweep:
                    by_sweep[sweep_id] = {"group": _sweep_group(sweep_id, sweeps[sweep_id]), "rows": []}
                    blocks.append(by_sweep[sweep_id])
                by_sweep[sweep_id]["rows"].append(row)
            else:
                blocks.append({"group": None, "rows": [row]})
    else:
        blocks = [{"group": None, "rows": rows}]
    first = offset + 1 if rows else 0
    window = range(max(1, table.page - 3), min(pages, table.page + 3) + 1)
    return {"runs": rows, "blocks": blocks, "table": table, "total": total, "first": first,
            "last": offset + len(rows), "pages": pages, "window": list(window), "page_sizes": PAGE_SIZES,
            "status_filters": STATUS_FILTERS, "kind_filters": KIND_FILTERS,
            "filtered": bool(table.q or table.status or table.kind or table.tag or table.sweep)}


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request, templates: TemplatesDep, store: StoreDep, manager: ManagerDep,
                    table: Annotated[TableQuery, Depends(table_query)],
                    preset: Annotated[str, Query(max_length=64)] = "saturation-twin") -> HTMLResponse:
    values, twin = _preset_values(preset)
    version = manager.changes.version  # read before the table: a change in between makes the page reload it
    return templates.TemplateResponse(request, "runs.html", {
        **_form_context(values, preset=preset, twin=twin), **await _table_context(table, store, manager),
        "changes_version": version})


@router.get("/ui/form", response_class=HTMLResponse)
async def launch_form(request: Request, templates: TemplatesDep,
                      preset: Annotated[str, Query(max_length=64)]) -> HTMLResponse:
    values, twin = _preset_values(preset)
    return templates.TemplateResponse(request, "partials/launch_form.html",
                                      _form_context(values, preset=preset, twin=twin))


#: A form of ours has about forty fields; many more is not one of ours.
MAX_FORM_FIELDS = 200


async def _form_pairs(request: Request) -> list[tuple[str, str]]:
    """The form's fields; 413 past MAX_FORM_BYTES (counted as it arrives, never read whole) or MAX_FORM_FIELDS."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise RunError(413, f"form body over {MAX_FORM_BYTES} bytes")
    try:
        return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True,
                         max_num_fields=MAX_FORM_FIELDS)
    except ValueError as exc:  # "Max number of fields exceeded"
        raise RunError(413, f"form has more than {MAX_FORM_FIELDS} fields") from exc


@router.post("/ui/runs", response_class=HTMLResponse)
async def launch(request: Request, templates: TemplatesDep, manager: ManagerDep) -> Response:
    """Validate the form like the API does; on success send the browser to the run (or the twin's compare page)."""
    pairs = await _form_pairs(request)
    fields: list[FormField] = [f for s in form_sections() for f in s.fields]
    twin = dict(pairs).get("twin") == "1"
    try:
        cfg = RunConfig.model_validate(nested_config(pairs, fields))
    except ValidationError as exc:
        values = dict(pairs)
        ctx = _form_context(values, errors=errors_by_field(exc), preset=values.get("preset", ""), twin=twin)
        return templates.TemplateResponse(request, "partials/launch_form.html", ctx, status_code=422)
    try:
        if twin and cfg.kind == "gan":
            twins = []
            for loss in ("saturating", "non_saturating"):
                label = f"{cfg.name} · g_loss={loss}" if cfg.name else f"g_loss={loss}"
                twins.append(cfg.with_overrides({"gan.g_loss": loss, "name": label[:200]}))
            runs = await manager.submit_many(twins, sweep_id=uuid.uuid4().hex[:12])  # both, or neither
            target = f"/compare?runs={','.join(rec.id for rec in runs)}"
        else:
            target = f"/runs/{(await manager.submit(cfg)).id}"
    except RunError as exc:  # the server refuses what the form itself allows (a full queue, a GPU it lacks): say why
        values = dict(pairs)
        ctx = _form_context(values, preset=values.get("preset", ""), twin=twin)
        ctx["refusal"] = exc.detail
        return templates.TemplateResponse(request, "partials/launch_form.html", ctx, status_code=exc.status)
    return Response(status_code=201, headers={"HX-Redirect": target})


@router.get("/ui/runs-table", response_class=HTMLResponse)
async def runs_table(request: Request, templates: TemplatesDep, store: StoreDep, manager: ManagerDep,
                     table: Annotated[TableQuery, Depends(table_query)],
                     notice: str | None = None, status_code: int = 200) -> HTMLResponse:
    context = {**await _table_context(table, store, manager), "notice": notice}
    return templates.TemplateResponse(request, "partials/runs_table.html", context, status_code=status_code)


async def _table_after(action: Awaitable[Any], request: Request, templates: Jinja2Templates, store: StoreDep,
                       manager: RunManager) -> HTMLResponse:
    """Run a table button's action; the answer is the refreshed table, with a refusal (409…) above it."""
    table = table_query(request)
    try:
        await action
    except RunError as exc:
        return await runs_table(request, templates, store, manager, table, exc.detail, exc.status)
    return await runs_table(request, templates, store, manager, table)


@router.post("/ui/table/runs/{run_id}/stop", response_class=HTMLResponse)
async def table_stop(run_id: str, request: Request, templates: TemplatesDep, store: StoreDep,
                     manager: ManagerDep) -> HTMLResponse:
    return await _table_after(manager.stop(run_id), request, templates, store, manager)


@router.delete("/ui/table/runs/{run_id}", response_class=HTMLResponse)
async def table_delete(run_id: str, request: Request, templates: TemplatesDep, store: StoreDep,
                       manager: ManagerDep) -> HTMLResponse:
    return await _table_after(manager.delete(run_id), request, templates, store, manager)


@router.get("/runs/{run_id}", response_class=HTMLResponse)
async def run_page(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    rec = await manager.get(run_id)
    samples, checkpoints = await asyncio.gather(asyncio.to_thread(artifacts_of, manager, run_id, "samples"),
                                                asyncio.to_thread(artifacts_of, manager, run_id, "checkpoints"))
    run = _row(rec, manager)
    cfg = _run_config(rec)
    boot = {"id": rec.id, "name": rec.name, "kind": rec.kind, "status": rec.status, "config": rec.config,
            "last_seq": rec.last_seq, "step": rec.step, "external": rec.external, "controls": rec.controls,
            "g_loss": run["g_loss"], "started_at": rec.started_at, "ended_at": rec.ended_at}
    rows, cut = config_rows(rec.config)
    return templates.TemplateResponse(request, "run.html", {
        "run": run, "rec": rec, "boot": boot, "samples": samples, "checkpoints": checkpoints,
        "is_2d": _at(cfg, "data", "name") in TWO_D_DATASETS, "show": _allowed(rec),
        "lr_g": _typed(_at(cfg, "gan", "lr_g"), (int, float)), "lr_d": _typed(_at(cfg, "gan", "lr_d"), (int, float)),
        "eval_every": _typed(_at(cfg, "intervals", "eval_every"), int), "config_rows": rows, "config_cut": cut,
    })


@router.get("/ui/runs/{run_id}/config", response_class=HTMLResponse)
async def script_config(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    """A script's config as key/value rows: the run page reloads it when the script changes its config."""
    rec = await manager.get(run_id)
    rows, cut = config_rows(rec.config)
    return templates.TemplateResponse(request, "partials/config_rows.html", {"config_rows": rows, "config_cut": cut})


@router.get("/ui/runs/{run_id}/downloads", response_class=HTMLResponse)
async def downloads(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    await manager.get(run_id)
    samples, checkpoints = await asyncio.gather(asyncio.to_thread(artifacts_of, manager, run_id, "samples"),
                                                asyncio.to_thread(artifacts_of, manager, run_id, "checkpoints"))
    return templates.TemplateResponse(request, "partials/downloads.html", {
        "run_id": run_id, "samples": samples, "checkpoints": checkpoints})


def _notice(templates: Jinja2Templates, request: Request, message: str, *, ok: bool,
            status_code: int = 200) -> HTMLResponse:
    return templates.TemplateResponse(request, "partials/notice.html", {"message": message, "ok": ok},
                                      status_code=status_code)


@router.post("/ui/runs/{run_id}/stop", response_class=HTMLResponse)
async def page_stop(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    try:
        await manager.stop(run_id)
    except RunError as exc:
        return _notice(templates, request, exc.detail, ok=False, status_code=exc.status)
    return _notice(templates, request, "Stopping: the worker writes a final checkpoint, then ends.", ok=True)


META_PARTS = ("name", "tags", "notes")


@router.post("/ui/runs/{run_id}/meta", response_class=HTMLResponse)
async def page_meta(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    """The run page's rename, tags and notes editors: one form each (``part``), answered with that part redrawn.

    The tags form sends every kept tag as ``tag`` and the new one as ``new_tag`` (blank: none). Refused input comes
    back in place with the message, as typed, and a 422.
    """
    pairs = await _form_pairs(request)
    form = dict(pairs)
    part = form.get("part", "")
    if part not in META_PARTS:
        raise RunError(422, f"part must be one of {', '.join(META_PARTS)}")
    rec = await manager.get(run_id)
    if part == "tags":
        typed = [value for name, value in pairs if name == "tag"]
        typed += [t for t in form.get("new_tag", "").split(",") if t.strip()]
        raw: dict[str, Any] = {"tags": typed}
    else:
        raw = {part: form.get(part, "")}
    try:
        patch = RunMetaPatch.model_validate(raw)
    except ValidationError as exc:
        message = "; ".join(str(err["msg"]).removeprefix("Value error, ") for err in exc.errors())
        shown = _row(rec, manager)
        if part == "tags":
            shown["tags"] = [value for name, value in pairs if name == "tag"]
        else:
            shown[part] = raw[part]
        return templates.TemplateResponse(request, "partials/run_meta.html",
                                          {"run": shown, "part": part, "error": message, "editing": True,
                                           "new_tag": form.get("new_tag", "")},
                                          status_code=422)
    updated = await update_meta(manager, run_id, patch)
    return templates.TemplateResponse(request, "partials/run_meta.html",
                                      {"run": _row(updated, manager), "part": part, "saved": True})


@router.post("/ui/runs/{run_id}/control", response_class=HTMLResponse)
async def page_control(run_id: str, request: Request, templates: TemplatesDep, manager: ManagerDep) -> HTMLResponse:
    """A live change from the run page's form; only the inputs the user filled in are sent."""
    changes: dict[str, Any] = {}
    for name, raw in await _form_pairs(request):
        if raw.strip() == "":
            continue
        if name in ("lr_g", "lr_d"):
            try:
                changes[name] = float(raw)
            except ValueError:
                changes[name] = raw
        else:
            changes[name] = raw
    try:
        applied = await manager.control(run_id, changes)
    except ValidationError as exc:
        message = "; ".join(f"{k or 'control'}: {v}" for k, v in errors_by_field(exc).items())
        return _notice(templates, request, message, ok=False, status_code=422)
    except RunError as exc:
        return _notice(templates, request, exc.detail, ok=False, status_code=exc.status)
    text = ", ".join(f"{k} = {v}" for k, v in applied.items())
    return _notice(templates, request, f"Sent: {text}. The chart marks the step where it takes effect.", ok=True)


@router.get("/compare", response_class=HTMLResponse)
async def compare_page(request: Request, templates: TemplatesDep, manager: ManagerDep,
                       runs: Annotated[str, Query(max_length=2000, description="Comma-separated run ids")] = ""
                       ) -> HTMLResponse:
    ids = list(dict.fromkeys(r for r in runs.split(",") if r))
    dropped = ids[MAX_COMPARE:]
    records = [await manager.get(run_id) for run_id in ids[:MAX_COMPARE]]
    rows = [_row(r, manager) for r in records]
    boot = [{"id": r.id, "name": r.name, "kind": r.kind, "status": r.status, "last_seq": r.last_seq,
             "g_loss": row["g_loss"], "external": r.external, "started_at": r.started_at, **_plane(r)}
            for r, row in zip(records, rows, strict=True)]
    diff = config_diff([r.config for r in records]) if len(records) > 1 else None
    varied = diff.varied() if diff is not None else []
    return templates.TemplateResponse(request, "compare.html", {
        "runs": rows, "boot": boot, "dropped": dropped, "diff": diff, "varied": varied, "twin": _twin(records, rows),
        "planes": any(b["plane"] for b in boot), "max_planes": MAX_PLANES, "many": len(rows) > LEGEND_RUNS,
        "planes_cut": any(b["plane"] for b in boot[MAX_PLANES:])})


def _plane(rec: RunRecord) -> dict[str, Any]:
    """What the compare page's side-by-side view shows of a run: its 2-D data plane ("field": the JSON snapshots),
    its sample grids ("image": the PNGs) or nothing (a VAE on 2-D points writes no samples to show); and how many
    grids its server keeps (intervals.keep_samples: the first and the newest ``keep``; a script keeps them all)."""
    cfg = _run_config(rec)
    two_d = _at(cfg, "data", "name") in TWO_D_DATASETS
    plane = "field" if two_d and rec.kind == "gan" else None if two_d else "image"
    keep = None if rec.external else _typed(_at(cfg, "intervals", "keep_samples"), int)
    return {"plane": plane, "keep": keep}


def _twin(records: list[RunRecord], rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A saturation twin: two GAN runs, one on each of the saturating and the non-saturating loss; else None.

    ``head_start``: the D-only steps both runs began with, where they have the same configs otherwise (a twin
    launched from the runs page differs only in g_loss and name), else None."""
    if len(records) != 2 or any(r.kind != "gan" for r in records):
        return None
    if {row["g_loss"] for row in rows} != {"saturating", "non_saturating"}:
        return None
    cfgs = [_run_config(r) for r in records]
    diff = config_diff(cfgs)
    same = all(name in ("name", "gan.g_loss") for name, _ in diff.rows)
    head = _typed(_at(cfgs[0], "gan", "d_head_start"), int)
    return {"same": same, "head_start": head if same and head else None}
