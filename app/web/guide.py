"""The repository's own docs (``docs/*.md``), read-only, as pages inside the dashboard: ``GET /guide/{name}``.

Only the Markdown files that exist in the docs folder can be named (an allow-list built from its listing; a name
is one plain word, never a path), and the file read must lie inside that folder once resolved, so ``../`` or a link
out of it reads nothing. Markdown is rendered by markdown-it-py with raw HTML off: a ``<script>`` written in a doc
shows as text. Maths stays as the docs write it (in code spans). Links between docs (``maths.md``) become links
between guide pages. A wheel carries the docs under ``app/web/bundle/docs`` (hatch_build.py), a checkout serves
its own ``docs/``.
"""

from __future__ import annotations

import asyncio
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from markdown_it import MarkdownIt
from markdown_it.token import Token

from app.manager import RunError
from app.web.assets import DOCS_DIR
from app.web.pages import TemplatesDep

router = APIRouter(include_in_schema=False)

#: A page name: one plain word of the docs folder's file names, no dots, no slashes.
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
#: A relative link to another doc, as the docs write them: ``maths.md``, ``docs/maths.md``, ``maths.md#3-the-shadow``.
_DOC_LINK = re.compile(r"^(?:\./|docs/)?([a-z0-9][a-z0-9_-]{0,63})\.md(#[A-Za-z0-9_-]*)?$")
#: A doc larger than this is not one of ours.
MAX_DOC_BYTES = 1 << 20


def allowed_pages(folder: Path | None = None) -> dict[str, Path]:
    """The docs that may be shown, by page name: the folder's own ``*.md`` files (no links, nothing nested)."""
    folder = DOCS_DIR if folder is None else folder
    if not folder.is_dir():
        return {}
    return {path.stem: path for path in sorted(folder.glob("*.md"))
            if _NAME.fullmatch(path.stem) and path.is_file() and not path.is_symlink()}


def slug(text: str) -> str:
    """A heading's anchor, as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def _anchor_headings(state: Any) -> None:
    """Give each heading an id (``#2-the-two-generator-losses``), so the app can link to a section."""
    tokens: list[Token] = state.tokens
    seen: dict[str, int] = {}
    for i, token in enumerate(tokens):
        if token.type == "heading_open" and i + 1 < len(tokens):
            base = slug(tokens[i + 1].content) or "section"
            n = seen.get(base, 0)
            seen[base] = n + 1
            token.attrSet("id", base if n == 0 else f"{base}-{n}")


def _relink_docs(state: Any) -> None:
    """``[the maths](maths.md)`` points at the guide page ``/guide/maths``, not a file the app does not serve."""
    for block in state.tokens:
        for token in block.children or ():
            if token.type == "link_open":
                match = _DOC_LINK.match(str(token.attrGet("href") or ""))
                if match:
                    token.attrSet("href", f"/guide/{match.group(1)}{match.group(2) or ''}")


@lru_cache(maxsize=1)
def _markdown() -> MarkdownIt:
    # "commonmark" with html off: raw HTML blocks and inline tags are escaped, never passed through.
    md = MarkdownIt("commonmark", {"html": False, "linkify": False, "typographer": False}).enable("table")
    md.core.ruler.push("anchor_headings", _anchor_headings)
    md.core.ruler.push("relink_docs", _relink_docs)
    return md


def render(text: str) -> str:
    """Markdown to HTML, raw HTML escaped."""
    return _markdown().render(text)


def _title(text: str, fallback: str) -> str:
    match = re.search(r"^#\s+(.+)$", text, re.MULTILINE)
    return match.group(1).strip() if match else fallback


def _read(name: str) -> tuple[str, str]:
    pages = allowed_pages()
    path = pages.get(name) if _NAME.fullmatch(name) else None
    folder = DOCS_DIR.resolve()
    if path is None or not path.resolve().is_relative_to(folder) or path.stat().st_size > MAX_DOC_BYTES:
        raise RunError(404, f"no guide page {name!r}; one of {', '.join(pages) or '(none)'}")
    text = path.read_text(encoding="utf-8", errors="replace")
    return _title(text, name), render(text)


@router.get("/guide", response_class=HTMLResponse)
async def guide_index(request: Request, templates: TemplatesDep) -> HTMLResponse:
    pages = await asyncio.to_thread(allowed_pages)
    return templates.TemplateResponse(request, "guide.html", {"title": "Guide", "pages": list(pages), "html": None,
                                                              "name": None})


@router.get("/guide/{name}", response_class=HTMLResponse)
async def guide_page(name: str, request: Request, templates: TemplatesDep) -> HTMLResponse:
    title, html = await asyncio.to_thread(_read, name)
    return templates.TemplateResponse(request, "guide.html", {"title": title, "html": html, "name": name,
                                                              "pages": list(allowed_pages())})
