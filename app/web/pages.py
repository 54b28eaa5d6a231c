"""The dashboard's HTML: full pages, and the fragments htmx swaps into them.

Pages are rendered on the server (Jinja2, autoescaped); the live charts are
fed by ``static/js`` over the run websocket. Every action here goes through
the same :class:`~app.manager.RunManager` calls as the JSON API, so the
browser can do nothing an API client cannot, and is refused what they are.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from app.api.deps import ManagerDep, StoreDep
from app.api.runs import artifacts_of
from app.manager import RunError, RunManager
from app.store import TERMINAL_STATUSES, RunRecord
from app.web.form import FormField, errors_by_field, flat_values, form_sections, nested_config
from trainer.config import RunConfig
from trainer.presets import get_preset

#: A launch form is a few kilobytes; anything much larger is not one.
MAX_FORM_BYTES = 64 * 1024
#: Runs overlaid on one compare page: one websocket and a few traces each; beyond this the legend is unreadable.
MAX_COMPARE = 10


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


def _row(rec: RunRecord, manager: RunManager) -> dict[str, Any]:
    cfg = rec.config
    return {
        "id": rec.id, "name": rec.name, "kind": rec.kind, "status": rec.status, "step": rec.step,
        "steps": cfg.get("train", {}).get("steps"), "dataset": cfg.get("data", {}).get("name"),
        "g_loss": cfg.get("gan", {}).get("g_loss") if rec.kind == "gan" else None,
        "rate": manager.steps_per_s(rec.id), "device": rec.device or "—", "alert": rec.last_alert,
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.created_at)),
        "ended": rec.status in TERMINAL_STATUSES, "error": rec.error,
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


@router.get("/", response_class=HTMLResponse)
async def runs_page(request: Request, templates: TemplatesDep, store: StoreDep, manager: ManagerDep,
                    preset: Annotated[str, Query(max_length=64)] = "saturation-twin") -> HTMLResponse:
    values, twin = _preset_values(preset)
    runs = [_row(rec, manager) for rec in await asyncio.to_thread(store.list_runs)]
    return templates.TemplateResponse(request, "runs.html",
                                      {**_form_context(values, preset=preset, twin=twin), "runs": runs})


@router.get("/ui/form", response_class=HTMLResponse)
async def launch_form(request: Request, templates: TemplatesDep,
                      preset: Annotated[str, Query(max_length=64)]) -> HTMLResponse:
    values, twin = _preset_values(preset)
    return templates.TemplateResponse(request, "partials/launch_form.html",
                                      _form_context(values, preset=preset, twin=twin))


async def _form_pairs(request: Request) -> list[tuple[str, str]]:
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise RunError(413, f"form body over {MAX_FORM_BYTES} bytes")
    return parse_qsl(body.decode("utf-8", errors="replace"), keep_blank_values=True, max_num_fields=200)


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
    if twin and cfg.kind == "gan":
        sweep_id = uuid.uuid4().hex[:12]
        ids = []
        for loss in ("saturating", "non_saturating"):
            label = f"{cfg.name} · g_loss={loss}" if cfg.name else f"g_loss={loss}"
            twin_cfg = cfg.with_overrides({"gan.g_loss": loss, "name": label[:200]})
            ids.append((await manager.submit(twin_cfg, sweep_id=sweep_id)).id)
        target = f"/compare?runs={','.join(ids)}"
    else:
        target = f"/runs/{(await manager.submit(cfg)).id}"
    return Response(status_code=201, headers={"HX-Redirect": target})


@router.get("/ui/runs-table", response_class=HTMLResponse)
async def runs_table(request: Request, templates: TemplatesDep, store: StoreDep, manager: ManagerDep,
                     notice: str | None = None, status_code: int = 200) -> HTMLResponse:
    runs = [_row(rec, manager) for rec in await asyncio.to_thread(store.list_runs)]
    return templates.TemplateResponse(request, "partials/runs_table.html", {"runs": runs, "notice": notice},
                                      status_code=status_code)


async def _table_after(action: Awaitable[Any], request: Request, templates: Jinja2Templates, store: StoreDep,
                       manager: RunManager) -> HTMLResponse:
    """Run a table button's action; the answer is the refreshed table, with a refusal (409…) above it."""
    try:
        await action
    except RunError as exc:
        return await runs_table(request, templates, store, manager, exc.detail, exc.status)
    return await runs_table(request, templates, store, manager)


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
    boot = {"id": rec.id, "name": rec.name, "kind": rec.kind, "status": rec.status, "config": rec.config,
            "last_seq": rec.last_seq, "step": rec.step}
    return templates.TemplateResponse(request, "run.html", {
        "run": run, "rec": rec, "boot": boot, "samples": samples, "checkpoints": checkpoints,
        "is_2d": rec.config.get("data", {}).get("name") in ("ring8", "grid25", "spiral", "moons"),
    })


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
    boot = [{"id": r.id, "name": r.name, "kind": r.kind, "status": r.status, "last_seq": r.last_seq,
             "g_loss": r.config.get("gan", {}).get("g_loss")} for r in records]
    return templates.TemplateResponse(request, "compare.html", {"runs": [_row(r, manager) for r in records],
                                                                "boot": boot, "dropped": dropped})
