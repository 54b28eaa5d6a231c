"""Where the browser's files come from: our own static folder and the JS libraries installed at set-up.

Nothing third-party is committed: plotly.min.js is the file the plotly Python
package ships, htmx is the file ``npm ci`` put under node_modules. Both are
served by the app itself (no CDN), so the dashboard works air-gapped.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = ROOT / "templates"
STATIC_DIR = ROOT / "static"
#: Our own CSS and JS, under this URL prefix (the prefix /static/docs belongs to the offline API docs).
ASSETS_URL = "/assets"


def vendor_files() -> dict[str, Path]:
    """The third-party browser files by the name the pages load them under."""
    return {
        "plotly.min.js": Path(str(files("plotly") / "package_data" / "plotly.min.js")),
        "htmx.min.js": ROOT / "node_modules" / "htmx.org" / "dist" / "htmx.min.js",
    }


def missing_vendor_files() -> list[str]:
    return [f"{name} (expected at {path})" for name, path in vendor_files().items() if not path.is_file()]


def vendor_router() -> APIRouter:
    router = APIRouter(include_in_schema=False)
    known = vendor_files()

    @router.get(ASSETS_URL + "/vendor/{name}")
    async def vendor(name: str) -> FileResponse:
        path = known.get(name)
        if path is None or not path.is_file():
            hint = " (run `make install`: htmx comes from npm at set-up)" if name == "htmx.min.js" else ""
            raise HTTPException(404, f"no vendor file {name!r}{hint}")
        # Versioned by the installed package, so the browser may keep it for a day without asking again.
        return FileResponse(path, media_type="text/javascript", headers={"Cache-Control": "public, max-age=86400"})

    return router
