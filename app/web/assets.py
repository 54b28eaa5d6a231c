"""Where the browser's files come from: our own templates and static folder, and the JS libraries installed at set-up.

Nothing third-party is committed: plotly.min.js is the file the plotly Python
package ships, htmx is the file ``npm ci`` put under node_modules. Both are
served by the app itself (no CDN), so the dashboard works air-gapped.

Two layouts: an installed wheel carries templates/, static/, docs/ and htmx in the
package itself, under ``app/web/bundle/`` (hatch_build.py puts them there when
the wheel is built); a checkout (editable install, ``make install``) has no
bundle and serves the repository's own templates/, static/ and node_modules/.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

ROOT = Path(__file__).resolve().parents[2]
#: The wheel's copy of the browser files; absent in a checkout.
BUNDLE = Path(str(files("app.web") / "bundle"))
BUNDLED = BUNDLE.is_dir()
TEMPLATES_DIR = (BUNDLE if BUNDLED else ROOT) / "templates"
STATIC_DIR = (BUNDLE if BUNDLED else ROOT) / "static"
#: The repository's docs/*.md, shown read-only at /guide/{name} (app/web/guide.py).
DOCS_DIR = (BUNDLE if BUNDLED else ROOT) / "docs"
#: htmx: bundled by the wheel's build from npm, or where `npm ci` puts it in a checkout.
HTMX_FILE = BUNDLE / "vendor" / "htmx.min.js" if BUNDLED else ROOT / "node_modules/htmx.org/dist/htmx.min.js"
#: Our own CSS and JS, under this URL prefix (the prefix /static/docs belongs to the offline API docs).
ASSETS_URL = "/assets"


def vendor_files() -> dict[str, Path]:
    """The third-party browser files by the name the pages load them under."""
    return {
        "plotly.min.js": Path(str(files("plotly") / "package_data" / "plotly.min.js")),
        "htmx.min.js": HTMX_FILE,
    }


@dataclass(frozen=True)
class MissingAsset:
    """A browser library the pages load that is not installed, and the command that installs it."""

    name: str
    expected: Path
    needed_for: str
    fix: str


def missing_vendor_files() -> list[MissingAsset]:
    """What the pages will fail to load right now (checked on every call: installing it needs no restart)."""
    python = shlex.quote(sys.executable)
    # Every wheel is built with htmx inside (hatch_build.py), so one without it was damaged after installing.
    htmx_fix = (f"{python} -m pip install --force-reinstall --no-deps gradwatch-VERSION-py3-none-any.whl" if BUNDLED
                else f"cd {shlex.quote(str(ROOT))} && npm ci")
    needs = {
        "htmx.min.js": ("the launch form, the runs table and every button", htmx_fix),
        "plotly.min.js": ("every chart", f"{python} -m pip install plotly"),
    }
    return [MissingAsset(name, path, *needs[name]) for name, path in vendor_files().items() if not path.is_file()]


def setup_report(missing: list[MissingAsset]) -> str:
    """What ``gradwatch serve`` prints at start when the dashboard cannot work: each file, its use, its fix."""
    if not missing:
        return ""
    lines = ["", "!! The dashboard will not work: browser libraries it serves itself are missing."]
    for asset in missing:
        lines += [f"!!   {asset.name} (needed for {asset.needed_for}), expected at {asset.expected}",
                  f"!!   fix: {asset.fix}   (in a clone, `make install` does it too)"]
    lines += ["!! Then reload the page; the server need not restart. The API works meanwhile.", ""]
    return "\n".join(lines)


def vendor_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)

    @router.get(ASSETS_URL + "/vendor/{name}")
    async def vendor(name: str) -> FileResponse:
        path = vendor_files().get(name)  # looked up per request: `npm ci` while serving needs no restart
        if path is None:
            raise HTTPException(404, f"no vendor file {name!r}")
        if not path.is_file():
            fix = next(a.fix for a in missing_vendor_files() if a.name == name)
            raise HTTPException(404, f"{name} is not installed; fix: {fix}")
        # Versioned by the installed package, so the browser may keep it for a day without asking again.
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})

    return router
