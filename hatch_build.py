"""Build hook: a wheel holds everything ``gradwatch serve`` needs, so an installed wheel needs no checkout and no Node.

For a wheel (not an editable install, which serves the checkout's own files) it adds, under ``app/web/bundle/``:

- ``templates/`` and ``static/``, copied from the source tree (a checkout or the sdist);
- ``docs/*.md``, which the app shows at ``/guide/{name}`` (app/web/guide.py);
- ``vendor/htmx.min.js``, fetched from the npm registry at build time by ``npm ci`` against the committed
  package.json and package-lock.json (version and integrity hash pinned there), in a scratch folder: the source
  tree's own node_modules/ is neither used nor touched, and nothing third-party is ever committed.

So building a wheel needs Node 18+ and npm on PATH; installing and running it does not.
``app/web/assets.py`` serves from the bundle when it exists, else from the checkout.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

#: Where the files go inside the wheel; app/web/assets.py looks for them there.
BUNDLE = "app/web/bundle"
#: The one file of the htmx.org npm package the dashboard loads.
HTMX = Path("node_modules", "htmx.org", "dist", "htmx.min.js")
#: The npm pins, copied into the scratch folder.
NPM_FILES = ("package.json", "package-lock.json")


class BundleBrowserFiles(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if version == "editable":
            return  # the checkout's templates/, static/ and node_modules/ are served where they are
        root = Path(self.root)
        self._scratch = Path(tempfile.mkdtemp(prefix="gradwatch-npm-"))
        force = build_data["force_include"]
        for folder in ("templates", "static"):
            for path in sorted((root / folder).rglob("*")):
                relative = path.relative_to(root).as_posix()
                # static/vendor/ is a git-ignored leftover of an older set-up, never served.
                if path.is_file() and not relative.startswith("static/vendor/") and "__pycache__" not in relative:
                    force[str(path)] = f"{BUNDLE}/{relative}"
        for path in sorted((root / "docs").glob("*.md")):
            if path.is_file():
                force[str(path)] = f"{BUNDLE}/docs/{path.name}"
        force[str(self._fetch_htmx(root))] = f"{BUNDLE}/vendor/htmx.min.js"

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        scratch = getattr(self, "_scratch", None)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    def _fetch_htmx(self, root: Path) -> Path:
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError(
                "building a gradwatch wheel needs Node 18+ and npm on PATH: htmx, pinned in package-lock.json, is "
                "fetched from the npm registry into the wheel (installing the wheel needs neither)"
            )
        for name in NPM_FILES:
            shutil.copy2(root / name, self._scratch / name)
        # --ignore-scripts: nothing of the package runs here; the lock's integrity hash is checked by npm ci.
        command = [npm, "ci", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund", "--prefer-offline"]
        done = subprocess.run(command, cwd=self._scratch, capture_output=True, text=True)
        htmx = self._scratch / HTMX
        if done.returncode != 0 or not htmx.is_file() or htmx.stat().st_size == 0:
            raise RuntimeError(f"`npm ci` did not provide {HTMX} (exit {done.returncode}):\n{done.stdout}{done.stderr}")
        return htmx
