"""The built wheel, installed with no checkout and no Node, serves the whole dashboard (SPEC §5, packaging).

Real end to end: ``python -m build`` makes the sdist and, from it, the wheel; a fresh venv gets torch and the
wheel; ``gradwatch serve`` starts from a user's folder that holds an ``app/`` package of their own.
"""

from __future__ import annotations

import json
import re
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.installed_wheel import ROOT, InstalledWheel, WheelServer, users_folder
from tests.live_server import TINY_GAN, config, wait_status

pytestmark = pytest.mark.xdist_group("wheel")

BUNDLE = "app/web/bundle"
HTMX_VERSION = json.loads((ROOT / "package.json").read_text())["dependencies"]["htmx.org"]


def _browser_files() -> list[str]:
    """Our own templates and static files, as the repository holds them."""
    return sorted(p.relative_to(ROOT).as_posix() for folder in ("templates", "static")
                  for p in (ROOT / folder).rglob("*") if p.is_file() and "vendor" not in p.parts)


def _docs() -> list[str]:
    """The docs the app shows at /guide/{name}."""
    return sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md"))


def test_the_sdist_holds_what_the_wheel_is_built_from_and_the_wheel_holds_what_the_server_serves(
    installed_wheel: InstalledWheel,
) -> None:
    with tarfile.open(installed_wheel.sdist) as sdist:
        in_sdist = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert {"package.json", "package-lock.json", "hatch_build.py", "pyproject.toml", "app/web/assets.py",
            *_browser_files(), *_docs()} <= in_sdist
    # No third-party code in the source release: htmx comes from npm when a wheel is built from it.
    assert not [name for name in in_sdist if "node_modules" in name or name.endswith(".min.js")]

    with zipfile.ZipFile(installed_wheel.wheel) as wheel:
        in_wheel = set(wheel.namelist())
        htmx = wheel.read(f"{BUNDLE}/vendor/htmx.min.js").decode()
    assert {f"{BUNDLE}/{name}" for name in _browser_files()} <= in_wheel
    assert {f"{BUNDLE}/{name}" for name in _docs()} <= in_wheel and "docs/maths.md" in _docs()
    assert {"app/cli.py", "app/worker.py", "trainer/__init__.py", "gradwatch/__init__.py"} <= in_wheel
    assert f'version:"{HTMX_VERSION}"' in htmx  # the version package.json pins, not whatever npm had cached
    assert not [name for name in in_wheel if name.startswith(("tests/", "bench/", "node_modules/"))]


def test_the_installed_wheel_serves_the_whole_dashboard_and_runs_a_run(
    installed_wheel: InstalledWheel, tmp_path: Path
) -> None:
    # Where the installed package is and what it finds (from a neutral folder: `python -c` in the user's folder
    # would import their app/, as it should).
    probe = ("import json, app, app.web.assets as a; print(json.dumps([app.__file__, a.BUNDLED, "
             "str(a.TEMPLATES_DIR), [m.name for m in a.missing_vendor_files()]]))")
    where, bundled, templates, missing = json.loads(installed_wheel.run("python", "-c", probe, cwd=tmp_path))
    assert Path(where).is_relative_to(installed_wheel.venv) and bundled and missing == []
    assert Path(templates).is_relative_to(installed_wheel.venv)

    folder = users_folder(tmp_path)
    with WheelServer(installed_wheel, tmp_path / "data", cwd=folder) as server, \
            httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        assert "will not work" not in "".join(server.log)  # no missing-library report at start

        home = http.get("/", headers={"accept": "text/html"})
        assert home.status_code == 200 and "text/html" in home.headers["content-type"]
        assert 'id="launch-form"' in home.text and "setup-missing" not in home.text
        htmx = http.get("/assets/vendor/htmx.min.js")
        assert htmx.status_code == 200 and "javascript" in htmx.headers["content-type"]
        assert len(htmx.content) > 20_000 and htmx.text.count("htmx") > 10
        assert f'version:"{HTMX_VERSION}"' in htmx.text
        css = http.get("/assets/css/app.css")
        assert css.status_code == 200 and css.content == (ROOT / "static/css/app.css").read_bytes()
        assert http.get("/docs").status_code == 200  # the offline API docs
        maths = http.get("/guide/maths", headers={"accept": "text/html"})  # the project's docs, from the bundle
        assert maths.status_code == 200 and "The maths gradwatch implements" in maths.text
        assert http.get("/guide/nope", headers={"accept": "text/html"}).status_code == 404

        created = http.post("/api/runs", json=config(TINY_GAN, name="from the wheel", train__steps=30))
        assert created.status_code == 201, created.text
        run_id = created.json()["id"]
        detail = wait_status(http, run_id, {"completed", "failed", "stopped", "interrupted"})
        assert detail["status"] == "completed", detail.get("error")
        run_page = http.get(f"/runs/{run_id}", headers={"accept": "text/html"})
        assert run_page.status_code == 200 and "from the wheel" in run_page.text
        compare = http.get("/compare", params={"runs": run_id}, headers={"accept": "text/html"})
        assert compare.status_code == 200 and f'data-run="{run_id}"' in compare.text

        # Every file the three pages load, ours and the two libraries, is served.
        refs = {ref for page in (home, run_page, compare)
                for ref in re.findall(r'(?:src|href)="(/assets/[^"]+)"', page.text)}
        assert {"/assets/vendor/htmx.min.js", "/assets/vendor/plotly.min.js", "/assets/js/run.js"} <= refs
        for ref in refs:
            assert http.get(ref).status_code == 200, ref
    assert not (folder / "SHADOWED").exists()  # the user's app/ never stood in for ours
