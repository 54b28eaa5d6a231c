"""The docs as read-only pages inside the app (``GET /guide/{name}``, app/web/guide.py): only the docs folder's own
Markdown files, rendered with raw HTML escaped."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.web import guide

HTML = {"accept": "text/html"}


def test_an_allow_listed_doc_renders_inside_the_layout_with_its_headings_and_anchors(client: TestClient) -> None:
    page = client.get("/guide/maths", headers=HTML)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "<h1" in page.text and "The maths gradwatch implements" in page.text
    assert 'id="2-the-two-generator-losses"' in page.text  # the compare page's caption links to this section
    assert 'class="topbar"' in page.text  # the app's own layout
    assert "<table>" in page.text  # GitHub-style tables render
    index = client.get("/guide", headers=HTML)
    assert index.status_code == 200 and 'href="/guide/maths"' in index.text and 'href="/guide/dashboard"' in index.text


@pytest.mark.parametrize("name", ["nope", "MATHS", "maths.md", "%2e%2e", "..%2fREADME", "..%2f..%2fpyproject",
                                  "%2e%2e%2fpyproject.toml", "..%5cREADME", ".hidden", "maths%00"])
def test_a_name_not_on_the_list_is_404_and_nothing_outside_docs_is_read(client: TestClient, name: str) -> None:
    page = client.get(f"/guide/{name}", headers=HTML)
    assert page.status_code == 404
    assert "[project]" not in page.text and "gradwatch is a self-hosted" not in page.text


@pytest.mark.parametrize("path", ["/guide/..", "/guide/../pyproject.toml", "/guide/../../etc/passwd",
                                  "/guide/maths/../../README"])
def test_dot_dot_paths_never_reach_a_file_outside_docs(client: TestClient, path: str) -> None:
    page = client.get(path, headers=HTML)
    assert page.status_code == 404 or "The maths gradwatch implements" not in page.text
    assert "[project]" not in page.text and "root:" not in page.text


def test_the_allow_list_skips_links_and_odd_names(tmp_path: Path) -> None:
    (tmp_path / "good.md").write_text("# Good\n")
    (tmp_path / "Bad Name.md").write_text("# no\n")
    (tmp_path / "notes.txt").write_text("no\n")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.md"
    outside.write_text("# secret\n")
    (tmp_path / "link.md").symlink_to(outside)
    assert list(guide.allowed_pages(tmp_path)) == ["good"]


def test_raw_html_in_markdown_is_escaped_and_script_links_are_dropped() -> None:
    html = guide.render("# T\n\n<script>alert(1)</script>\n\nText <b onclick=\"x()\">bold</b> "
                        "[bad](javascript:alert(1)) [maths](maths.md#notation) [ext](https://example.org)\n")
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<b onclick" not in html and "&lt;b onclick" in html
    assert 'href="javascript:' not in html
    assert 'href="/guide/maths#notation"' in html and 'href="https://example.org"' in html
