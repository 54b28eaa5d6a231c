"""Organising runs (issue 14, item 4), in process: PATCH /api/runs/{id} renames, tags and annotates a run; bad input
is a 422 naming the field; the runs table filters in SQL; the push channel says when runs change; user text is
escaped wherever it is shown."""

from __future__ import annotations

import asyncio
import html
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.changes import Changes
from app.store import RunRecord, Store
from trainer.config import RunConfig

XSS = "<script>alert(1)</script>"


def _insert(client: TestClient, run_id: str = "abc123", *, name: str = "plain run", status: str = "completed",
            sweep_id: str | None = None, created_at: float | None = None, **config: Any) -> RunRecord:
    cfg = RunConfig.model_validate({"name": name, "train": {"steps": 10}, **config})
    rec = RunRecord(id=run_id, name=name, kind=cfg.kind, status=status, config=cfg.model_dump(mode="json"),
                    created_at=created_at or time.time(), step=10, sweep_id=sweep_id)
    client.app.state.store.insert_run(rec)  # type: ignore[attr-defined]
    return rec


def _errors(response: Any) -> list[tuple[str, ...]]:
    assert response.status_code == 422, response.text
    return [tuple(str(p) for p in err["loc"]) for err in response.json()["detail"]]


# --------------------------------------------------------------------------- PATCH


def test_patch_renames_tags_and_annotates_and_the_api_returns_it(client: TestClient) -> None:
    rec = _insert(client)
    r = client.patch(f"/api/runs/{rec.id}", json={"name": "  renamed  ", "tags": ["baseline", "Ring 8", "baseline",
                                                                                "BASELINE", "lr:1e-3"],
                                                   "notes": "D wins early.\nWatch step 500."})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["tags"], body["notes"]) == ("renamed", ["baseline", "Ring 8", "lr:1e-3"],
                                                           "D wins early.\nWatch step 500.")
    # Persisted: the detail, the list, and the store all say so; fields left out stay as they were.
    client.patch(f"/api/runs/{rec.id}", json={"notes": ""})
    got = client.get(f"/api/runs/{rec.id}").json()
    assert (got["name"], got["tags"], got["notes"]) == ("renamed", ["baseline", "Ring 8", "lr:1e-3"], "")
    listed = next(run for run in client.get("/api/runs").json() if run["id"] == rec.id)
    assert listed["tags"] == ["baseline", "Ring 8", "lr:1e-3"] and listed["name"] == "renamed"
    assert client.patch(f"/api/runs/{rec.id}", json={"tags": []}).json()["tags"] == []


def test_a_running_run_and_a_scripts_run_can_be_renamed(client: TestClient) -> None:
    running = _insert(client, "run1", status="running")
    store: Store = client.app.state.store  # type: ignore[attr-defined]
    script = RunRecord(id="scr1", name="my script", kind="custom", status="running", config={"lr": 1},
                       created_at=time.time(), source={"origin": "script"})
    store.insert_run(script)
    for run_id in (running.id, script.id):
        r = client.patch(f"/api/runs/{run_id}", json={"name": "new name", "tags": ["x"]})
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "running" and r.json()["name"] == "new name"


@pytest.mark.parametrize(("body", "field"), [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "bad\x00name"}, "name"),
    ({"name": "bell\x07"}, "name"),
    ({"name": None}, "name"),
    ({"name": 5}, "name"),
    ({"tags": ["ok", ""]}, "tags"),
    ({"tags": ["x" * 41]}, "tags"),
    ({"tags": ["semi;colon"]}, "tags"),
    ({"tags": ["<b>"]}, "tags"),
    ({"tags": [f"t{i}" for i in range(33)]}, "tags"),
    ({"tags": "not-a-list"}, "tags"),
    ({"tags": None}, "tags"),
    ({"notes": "x" * 10_001}, "notes"),
    ({"notes": "nul\x00"}, "notes"),
    ('{"name": "lone \\ud800 surrogate"}', "name"),  # raw JSON: a lone surrogate is only sayable escaped
    ('{"notes": "\\udfff"}', "notes"),
    ({"notes": None}, "notes"),
])
def test_each_bad_field_is_a_422_naming_it(client: TestClient, body: dict[str, Any] | str, field: str) -> None:
    rec = _insert(client)
    if isinstance(body, str):
        response = client.patch(f"/api/runs/{rec.id}", content=body, headers={"content-type": "application/json"})
    else:
        response = client.patch(f"/api/runs/{rec.id}", json=body)
    locs = _errors(response)
    assert any(loc[:2] == ("body", field) for loc in locs), locs
    assert client.get(f"/api/runs/{rec.id}").json()["name"] == "plain run"  # nothing changed


def test_limits_are_inclusive_and_tag_case_dedupes(client: TestClient) -> None:
    rec = _insert(client)
    tags = [*(f"t{i}" for i in range(31)), "x" * 40, "T1"]  # 33 given, 32 once "T1" is known as "t1"
    r = client.patch(f"/api/runs/{rec.id}", json={"name": "n" * 200, "tags": tags, "notes": "y" * 10_000})
    assert r.status_code == 200, r.text
    assert len(r.json()["tags"]) == 32 and r.json()["tags"][1] == "t1"


def test_an_unknown_field_is_a_422_and_an_unknown_run_a_404(client: TestClient) -> None:
    rec = _insert(client)
    locs = _errors(client.patch(f"/api/runs/{rec.id}", json={"name": "ok", "status": "completed"}))
    assert ("body", "status") in locs
    r = client.patch("/api/runs/0000ffff", json={"name": "x"})
    assert r.status_code == 404 and "0000ffff" in r.json()["detail"]


def test_an_old_database_without_the_columns_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "gradwatch.db"
    store = Store(path)
    store.close()
    conn = sqlite3.connect(path)
    for trigger in ("runs_search_on_insert", "runs_search_on_update"):
        conn.execute(f"DROP TRIGGER {trigger}")
    for column in ("tags", "notes", "dataset_name", "gan_loss"):
        conn.execute(f"ALTER TABLE runs DROP COLUMN {column}")
    conn.execute("INSERT INTO runs (id, name, kind, status, config, created_at) VALUES ('old1', 'old run', 'gan', "
                 """'completed', '{"data": {"name": "ring8"}, "gan": {"g_loss": "saturating"}}', 1.0)""")
    conn.commit()
    assert {"tags", "notes", "gan_loss"}.isdisjoint(row[1] for row in conn.execute("PRAGMA table_info(runs)"))
    conn.close()
    store = Store(path)
    try:
        old = store.get_run("old1")
        assert old is not None and old.tags is None and old.notes is None
        assert store.update_run("old1", tags=["kept"], notes="n").tags == ["kept"]
        assert store.page_runs(tag="KEPT")[1] == 1
        # Its dataset and loss were copied out of its config when the columns were added: the search finds them.
        assert store.page_runs(query="ring8")[1] == 1 and store.page_runs(query="saturating")[1] == 1
    finally:
        store.close()


# --------------------------------------------------------------------------- escaping


def test_user_text_is_escaped_on_the_runs_table_and_the_run_page(client: TestClient) -> None:
    rec = _insert(client)
    r = client.patch(f"/api/runs/{rec.id}", json={"name": XSS, "notes": XSS})
    assert r.status_code == 200
    # A tag cannot hold < or >: the charset refuses it before anything renders it.
    assert client.patch(f"/api/runs/{rec.id}", json={"tags": [XSS]}).status_code == 422
    client.patch(f"/api/runs/{rec.id}", json={"tags": ["a/b+c:d"]})
    escaped = html.escape(XSS, quote=False)
    for url in ("/ui/runs-table", "/", f"/runs/{rec.id}"):
        page = client.get(url).text
        assert XSS not in page, url
        assert escaped in page.replace("&#34;", '"').replace("&#39;", "'"), url
    table = client.get("/ui/runs-table").text
    assert 'data-tag="a/b+c:d"' in table and "href=\"/?tag=a%2Fb%2Bc%3Ad\"" in table
    run_page = client.get(f"/runs/{rec.id}").text
    assert f'<h1 id="run-name">{escaped}</h1>' in run_page
    assert f">{escaped}</textarea>" in run_page


def test_the_run_page_forms_save_and_show_errors_in_place(client: TestClient) -> None:
    rec = _insert(client)
    url = f"/ui/runs/{rec.id}/meta"
    form = {"content-type": "application/x-www-form-urlencoded"}
    ok = client.post(url, content="part=name&name=fresh+name", headers=form)
    assert ok.status_code == 200 and '<h1 id="run-name">fresh name</h1>' in ok.text
    bad = client.post(url, content="part=name&name=+++", headers=form)
    assert bad.status_code == 422 and 'id="rename-error"' in bad.text and "1 to 200" in bad.text
    tags = client.post(url, content="part=tags&tag=one&new_tag=two,+three", headers=form)
    assert tags.status_code == 200 and client.get(f"/api/runs/{rec.id}").json()["tags"] == ["one", "two", "three"]
    refused = client.post(url, content="part=tags&tag=one&new_tag=no%3Bway", headers=form)
    assert refused.status_code == 422 and 'id="tags-error"' in refused.text and 'value="no;way"' in refused.text
    notes = client.post(url, content="part=notes&notes=seen+it", headers=form)
    assert notes.status_code == 200 and 'id="notes-saved"' in notes.text
    assert client.get(f"/api/runs/{rec.id}").json()["notes"] == "seen it"
    assert client.post(url, content="part=status", headers=form).status_code == 422
    # The same Origin protection as every other /ui/ POST.
    cross = client.post(url, content="part=name&name=x", headers={**form, "Origin": "http://evil.example"})
    assert cross.status_code == 403
    assert client.patch(f"/api/runs/{rec.id}", json={"name": "x"},
                        headers={"Origin": "http://evil.example"}).status_code == 403


# --------------------------------------------------------------------------- the runs table


def test_the_runs_table_filters_searches_and_pages(client: TestClient) -> None:
    now = time.time()
    for i in range(60):
        _insert(client, f"r{i:03d}", name=f"run {i}", created_at=now - i,
                status="running" if i % 10 == 0 else "completed")
    client.patch("/api/runs/r005", json={"tags": ["Special"]})
    page1 = client.get("/ui/runs-table").text
    assert "Showing 1–50 of 60 runs" in page1 and page1.count('<tr data-run="') == 50
    page2 = client.get("/ui/runs-table?page=2").text
    assert "Showing 51–60 of 60 runs" in page2 and page2.count('<tr data-run="') == 10
    assert 'data-run="r000"' in page1 and 'data-run="r000"' not in page2 and 'data-run="r059"' in page2
    assert client.get("/ui/runs-table?per=25&page=3").text.count('<tr data-run="') == 10
    assert client.get("/ui/runs-table?page=99").text.count('<tr data-run="') == 10  # past the end: the last page
    active = client.get("/ui/runs-table?status=active").text
    assert "of 6 matching runs" in active
    tagged = client.get("/ui/runs-table?tag=special").text
    assert tagged.count('<tr data-run="') == 1 and 'data-run="r005"' in tagged
    found = client.get("/ui/runs-table?q=RUN+1").text  # run 1, run 10..19: case-insensitive substring
    assert "of 11 matching runs" in found
    assert "No runs match" in client.get("/ui/runs-table?q=nothing-like-this").text
    # The runs page reads the same query, and the form shows it.
    page = client.get("/?tag=special&per=25").text
    assert 'id="filter-tag" value="special"' in page and '<option value="25" selected>' in page
    assert page.count('<tr data-run="') == 1
    # Nonsense in a shared link is ignored, not an error.
    assert client.get("/ui/runs-table?status=bogus&per=7&page=-1&kind=x").status_code == 200


def test_the_runs_api_filters_and_pages_like_the_table(client: TestClient) -> None:
    """GET /api/runs takes the table's filters and a page (limit, offset); X-Total-Count says how many match."""
    for i in range(7):
        rec = _insert(client, f"r{i}", name=f"run {i}", created_at=1000.0 + i,
                      status="running" if i % 3 == 0 else "completed", sweep_id="sw" if i < 2 else None)
        if i % 2 == 0:
            client.patch(f"/api/runs/{rec.id}", json={"tags": ["even"]})
    everything = client.get("/api/runs")
    assert [r["id"] for r in everything.json()] == [f"r{i}" for i in range(6, -1, -1)]
    assert everything.headers["x-total-count"] == "7"
    page = client.get("/api/runs", params={"limit": 3, "offset": 3})
    assert [r["id"] for r in page.json()] == ["r3", "r2", "r1"] and page.headers["x-total-count"] == "7"
    assert [r["id"] for r in client.get("/api/runs", params={"tag": "EVEN"}).json()] == ["r6", "r4", "r2", "r0"]
    assert [r["id"] for r in client.get("/api/runs", params={"status": "active"}).json()] == ["r6", "r3", "r0"]
    assert [r["id"] for r in client.get("/api/runs", params={"sweep": "sw"}).json()] == ["r1", "r0"]
    found = client.get("/api/runs", params={"q": "RUN 5"})
    assert [r["id"] for r in found.json()] == ["r5"] and found.headers["x-total-count"] == "1"
    for params, field in (({"status": "sleeping"}, "status"), ({"kind": "bert"}, "kind"), ({"limit": 0}, "limit"),
                          ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"), ({"q": "x" * 201}, "q")):
        assert _errors(client.get("/api/runs", params=params)) == [("query", field)]


def test_sweeps_are_grouped_with_what_varies_and_a_compare_link(client: TestClient) -> None:
    now = time.time()
    _insert(client, "s1", name="sat", sweep_id="sw1", created_at=now - 2, gan={"g_loss": "saturating"})
    _insert(client, "s2", name="nonsat", sweep_id="sw1", created_at=now - 1, gan={"g_loss": "non_saturating"},
            status="running")
    _insert(client, "solo", name="alone", created_at=now)
    table = client.get("/ui/runs-table").text
    assert 'data-sweep-head="sw1"' in table
    assert "gan.g_loss: saturating, non_saturating" in table
    assert 'href="/compare?runs=s1,s2"' in table
    assert "1 completed" in table and "1 running" in table
    flat = client.get("/ui/runs-table?group=0").text
    assert "data-sweep-head" not in flat and flat.count('<tr data-run="') == 3
    only = client.get("/ui/runs-table?sweep=sw1").text
    assert only.count('<tr data-run="') == 2 and 'data-run="solo"' not in only


# --------------------------------------------------------------------------- store


def _run(store: Store, run_id: str, created: float, **fields: Any) -> None:
    config = fields.pop("config", {"data": {"name": "ring8"}, "gan": {"g_loss": "saturating"}})
    store.insert_run(RunRecord(id=run_id, name=fields.pop("name", run_id), kind=fields.pop("kind", "gan"),
                               status=fields.pop("status", "completed"), config=config, created_at=created, **fields))


def test_page_runs_filters_in_sql(store: Store) -> None:
    _run(store, "a1", 1.0, name="Alpha", tags=["Base", "ring"], status="running")
    _run(store, "a2", 2.0, name="beta", tags=["base"], status="queued", sweep_id="sw")
    _run(store, "a3", 3.0, name="gamma_1%", kind="vae", config={"data": {"name": "digits"}}, sweep_id="sw")
    _run(store, "a4", 4.0, name="delta", kind="custom", config={"free": "form"}, tags=["x,y"])
    ids = lambda result: [r.id for r in result[0]]  # noqa: E731
    assert ids(store.page_runs()) == ["a4", "a3", "a2", "a1"] and store.page_runs()[1] == 4
    assert ids(store.page_runs(status="active")) == ["a2", "a1"]
    assert ids(store.page_runs(status="queued")) == ["a2"]
    assert ids(store.page_runs(kind="vae")) == ["a3"]
    assert ids(store.page_runs(tag="BASE")) == ["a2", "a1"]
    assert ids(store.page_runs(tag="bas")) == []  # a tag filter is the whole tag
    assert ids(store.page_runs(tag="x")) == []  # never part of another tag's JSON text
    assert ids(store.page_runs(sweep="sw")) == ["a3", "a2"]
    assert ids(store.page_runs(query="ALPHA")) == ["a1"]
    assert ids(store.page_runs(query="a3")) == ["a3"]  # the id
    assert ids(store.page_runs(query="rin")) == ["a2", "a1"]  # a tag ("ring") and the dataset ring8
    assert ids(store.page_runs(query="digits")) == ["a3"]
    assert ids(store.page_runs(query="saturating")) == ["a2", "a1"]  # g_loss, GAN runs only
    assert ids(store.page_runs(query="_1%")) == ["a3"]  # LIKE's wildcards are literal
    assert ids(store.page_runs(query="%")) == ["a3"]
    assert ids(store.page_runs(query="base", status="queued")) == ["a2"]
    rows, total = store.page_runs(limit=2, offset=2)
    assert [r.id for r in rows] == ["a2", "a1"] and total == 4
    assert store.page_runs(limit=2, offset=10) == ([], 4)
    assert {k: [r.id for r in v] for k, v in store.sweep_runs(["sw", "none"]).items()} == {"sw": ["a3", "a2"],
                                                                                          "none": []}
    # The dataset and loss the search reads are copies of the config's, kept in step when the config changes (a
    # script's run sends its config later).
    store.update_run("a4", config={"data": {"name": "my_faces"}}, kind="gan")
    assert ids(store.page_runs(query="faces")) == ["a4"]
    store.update_run("a4", config={"data": {"name": "cats"}, "gan": {"g_loss": "hinge"}})
    assert ids(store.page_runs(query="faces")) == [] and ids(store.page_runs(query="hinge")) == ["a4"]


def test_the_store_reports_every_run_row_change(store: Store) -> None:
    seen: list[str] = []
    store.on_change = seen.append
    _run(store, "c1", 1.0)
    store.update_run("c1", name="renamed")
    store.append("c1", [({"seq": 1, "type": "metrics", "step": [5], "time": [0.0], "data": {"x": [1.0]}},
                         '{"seq":1}')])
    assert store.wait_flushed()
    store.delete_run("c1")
    assert seen == ["c1"] * 4


# --------------------------------------------------------------------------- the push channel


def test_changes_coalesce_and_end_on_close() -> None:
    async def scenario() -> list[str]:
        changes = Changes()
        changes.start()
        out: list[str] = []

        async def listen() -> None:
            async for chunk in changes.stream():
                out.append(chunk)

        task = asyncio.create_task(listen())
        await asyncio.sleep(0.05)
        for i in range(500):  # a burst, as a training run's steps are: one event, maybe two
            changes.notify(f"run{i % 3}")
        await asyncio.sleep(0.2)
        changes.notify("other")
        await asyncio.sleep(0.8)
        changes.close()
        await asyncio.wait_for(task, 2)
        return out

    chunks = asyncio.run(scenario())
    assert chunks[0].startswith("retry: 2000\nevent: hello\n")
    events = [json.loads(c.split("data: ", 1)[1]) for c in chunks if c.startswith("event: runs")]
    assert 1 <= len(events) <= 3, events
    assert set().union(*(e["runs"] for e in events)) == {"run0", "run1", "run2", "other"}


def test_the_changes_endpoint_and_the_patch_need_the_token(tmp_path: Path) -> None:
    import secrets

    from app.main import create_app
    from app.settings import Settings

    token = secrets.token_urlsafe(32)
    app = create_app(Settings(data_dir=tmp_path, token=token, _env_file=None))  # type: ignore[call-arg]
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        assert client.get("/api/runs/changes").status_code == 401
        # The PATCH takes the same token as every other API write.
        _insert(client)
        assert client.patch("/api/runs/abc123", json={"name": "x"}).status_code == 401
        r = client.patch("/api/runs/abc123", json={"name": "x"}, headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200 and r.json()["name"] == "x"
