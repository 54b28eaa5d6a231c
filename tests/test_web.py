"""The dashboard's server side, in process: the generated launch form, its errors, escaping and assets.

What only a browser shows (live charts, htmx swaps, downloads) is in
test_browser_dashboard.py against a real server.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.store import RunRecord
from app.web import assets
from app.web.form import errors_by_field, flat_values, form_sections, nested_config
from app.web.pages import MAX_COMPARE
from trainer.config import RunConfig
from trainer.presets import get_preset

ORIGIN = {"origin": "http://127.0.0.1:8000"}
FORM = {"content-type": "application/x-www-form-urlencoded", **ORIGIN}
EVIL_NAME = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'


def _insert(client: TestClient, name: str = EVIL_NAME, status: str = "completed") -> RunRecord:
    """A run row as a finished run leaves it, without starting a worker."""
    cfg = RunConfig.model_validate({"name": name, "train": {"steps": 10}})
    rec = RunRecord(id="abc123", name=name, kind="gan", status=status, config=cfg.model_dump(mode="json"),
                    created_at=time.time(), step=10, last_alert={"step": 7, "kind": "gradient_collapse",
                                                                   "message": "<b>low</b>"})
    client.app.state.store.insert_run(rec)  # type: ignore[attr-defined]
    return rec


def _form_body(values: dict[str, object]) -> str:
    from urllib.parse import urlencode

    return urlencode({k: "" if v is None else str(v) for k, v in values.items()})


# --------------------------------------------------------------------------- the form model


def test_the_form_has_an_input_for_every_config_field() -> None:
    names = [f.name for s in form_sections() for f in s.fields]
    assert sorted(names) == sorted(flat_values(RunConfig().model_dump(mode="json")))
    assert len(names) == len(set(names))


def test_inputs_carry_the_schema_bounds_and_types() -> None:
    fields = {f.name: f for s in form_sections() for f in s.fields}
    lr = fields["gan.lr_g"]
    assert (lr.input, lr.kind, lr.minimum, lr.maximum, lr.exclusive_min) == ("number", "number", 0.0, 1.0, True)
    assert lr.bounds == "0 < x ≤ 1"
    assert fields["train.steps"].step == "1" and fields["train.steps"].minimum == 1
    assert fields["gan.g_loss"].options == ("saturating", "non_saturating", "hinge", "least_squares", "wasserstein")
    assert fields["data.image_size"].optional and fields["data.image_size"].options == ("8", "28", "32")
    assert "Adam" in fields["gan.g_optimizer"].help


def test_submitted_strings_become_the_config() -> None:
    fields = [f for s in form_sections() for f in s.fields]
    pairs = [("kind", "gan"), ("gan.lr_g", "0.005"), ("train.steps", "42"), ("data.path", ""),
             ("data.image_size", ""), ("twin", "1")]
    cfg = RunConfig.model_validate(nested_config(pairs, fields))
    assert cfg.gan.lr_g == 0.005 and cfg.train.steps == 42 and cfg.data.path is None


def test_an_unknown_input_is_refused_by_name() -> None:
    fields = [f for s in form_sections() for f in s.fields]
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(nested_config([("gan.lr_x", "1")], fields))
    assert "gan.lr_x" in errors_by_field(info.value)


# --------------------------------------------------------------------------- pages and fragments


def test_the_runs_page_opens_on_the_twin_preset_with_defaults_filled(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert 'name="twin" value="1"' in page.text
    assert re.search(r'<select name="gan.g_loss"[^>]*>.*?<option value="saturating"\s+selected', page.text, re.S)
    assert 'name="gan.d_head_start" step="1" value="500"' in page.text
    # What the user will see, said on the page itself (not only in a tooltip), and measured by
    # test_presets_quality.py: which run collapses, which learns, and how long it takes.
    blurb = re.search(r'<p class="preset-blurb" data-testid="preset-blurb">(.*?)</p>', page.text, re.S)
    assert blurb is not None
    assert "captures 0 of 8 modes" in blurb.group(1) and "7–8 of 8 modes" in blurb.group(1)
    assert "step 8,000" in blurb.group(1) and f"{get_preset('ring8-saturating').train.steps:,}" == "8,000"
    vae = client.get("/ui/form", params={"preset": "digits-vae"})
    assert 'name="twin" value="0"' in vae.text and 'data-kind="vae"' in vae.text
    assert client.get("/ui/form", params={"preset": "nope"}).status_code == 404


def test_a_bad_field_comes_back_at_that_field_and_launches_nothing(client: TestClient) -> None:
    values = flat_values(RunConfig().model_dump(mode="json"))
    values.update({"gan.lr_g": "-0.001", "train.steps": "abc"})
    response = client.post("/ui/runs", content=_form_body(values), headers=FORM)
    assert response.status_code == 422
    errors = dict(re.findall(r'data-error-for="([^"]*)">([^<]*)<', response.text))
    assert errors.keys() == {"gan.lr_g", "train.steps"}
    assert "greater than 0" in errors["gan.lr_g"]
    assert "integer" in errors["train.steps"]
    # The user's input is kept, marked invalid, so they can fix it.
    assert re.search(r'name="gan.lr_g"[^>]*value="-0.001"[^>]*aria-invalid="true"', response.text)
    assert client.get("/api/runs").json() == []


def test_a_cross_field_error_is_shown_on_its_section(client: TestClient) -> None:
    values = flat_values(RunConfig().model_dump(mode="json"))
    values.update({"model.arch": "conv"})  # conv on 2-D ring data
    response = client.post("/ui/runs", content=_form_body(values), headers=FORM)
    assert response.status_code == 422
    assert re.search(r'data-error-for="">[^<]*conv', response.text)
    assert client.get("/api/runs").json() == []


def test_a_cross_site_form_post_is_refused(client: TestClient) -> None:
    response = client.post("/ui/runs", content="kind=gan", headers={**FORM, "origin": "https://evil.example"})
    assert response.status_code == 403
    assert client.get("/api/runs").json() == []


def test_user_text_is_escaped_in_every_page(client: TestClient) -> None:
    rec = _insert(client)
    for url in ("/ui/runs-table", f"/runs/{rec.id}", f"/compare?runs={rec.id}"):
        text = client.get(url).text
        assert "<script>window" not in text and "<img src=x" not in text and "<b>low" not in text, url
    run_page = client.get(f"/runs/{rec.id}").text
    assert f'<h1 id="run-name">{EVIL_NAME.replace("<", "&lt;").replace(">", "&gt;").replace(chr(34), "&#34;")}' \
        in run_page
    boot = re.search(r'<script id="boot" type="application/json">(.*?)</script>', run_page, re.S)
    # The page's boot data is JSON inside a script tag: "<" must be \u003c there, or "</script>" would end it.
    assert boot is not None and "<" not in boot.group(1)
    assert json.loads(boot.group(1))["name"] == EVIL_NAME


def test_the_runs_table_shows_status_progress_and_alert(client: TestClient) -> None:
    rec = _insert(client, name="plain run")
    table = client.get("/ui/runs-table").text
    row = re.search(rf'<tr data-run="{rec.id}" data-status="completed">(.*?)</tr>', table, re.S)
    assert row is not None
    assert "10<span class=\"sub\"> / 10</span>" in row.group(1)
    assert "gradient collapse @ 7" in row.group(1)
    assert f'hx-delete="/ui/table/runs/{rec.id}"' in row.group(1)  # finished: delete, not stop


def test_table_actions_answer_with_the_refreshed_table(client: TestClient) -> None:
    rec = _insert(client, name="to delete")
    stop = client.post(f"/ui/table/runs/{rec.id}/stop", headers=ORIGIN)
    assert stop.status_code == 409 and "not running" in stop.text and 'data-run="abc123"' in stop.text
    deleted = client.delete(f"/ui/table/runs/{rec.id}", headers=ORIGIN)
    assert deleted.status_code == 200 and "No runs yet" in deleted.text
    assert client.get("/api/runs").json() == []


def test_controls_on_a_finished_run_explain_why_not(client: TestClient) -> None:
    rec = _insert(client, name="done")
    response = client.post(f"/ui/runs/{rec.id}/control", content="g_loss=non_saturating&lr_g=", headers=FORM)
    assert response.status_code == 409 and "not running" in response.text
    bad = client.post(f"/ui/runs/{rec.id}/control", content="g_loss=nope", headers=FORM)
    assert bad.status_code == 422 and "g_loss" in bad.text


def test_a_missing_run_is_a_page_for_a_browser_and_json_for_a_client(client: TestClient) -> None:
    page = client.get("/runs/ffff", headers={"accept": "text/html"})
    assert page.status_code == 404 and "<h1>404</h1>" in page.text
    assert client.get("/api/runs/ffff").json() == {"detail": "no run 'ffff'"}


def test_pages_load_every_asset_from_the_app_itself(client: TestClient) -> None:
    rec = _insert(client, name="assets")
    for url in ("/", f"/runs/{rec.id}", f"/compare?runs={rec.id}"):
        html = client.get(url).text
        refs = re.findall(r'(?:src|href)="([^"]+)"', html)
        assert refs and all(r.startswith("/") for r in refs), (url, refs)
        for ref in refs:
            if ref.startswith("/assets/"):
                assert client.get(ref).status_code == 200, ref
    assert client.get("/assets/vendor/htmx.min.js").text.count("htmx") > 10
    assert client.get("/assets/vendor/nope.js").status_code == 404
    assert client.get("/assets/../app/settings.py").status_code == 404


def test_rarely_changed_fields_are_folded_until_one_of_them_is_wrong(client: TestClient) -> None:
    folded = re.compile(r'<details class="more"\s*>\s*<summary>More GAN options</summary>(.*?)</details>', re.S)
    page = client.get("/").text
    match = folded.search(page)
    assert match is not None and 'name="gan.beta1"' in match.group(1) and 'name="gan.lr_g"' not in match.group(1)
    values = flat_values(RunConfig().model_dump(mode="json"))
    values["gan.beta1"] = "1.5"
    response = client.post("/ui/runs", content=_form_body(values), headers=FORM)
    assert response.status_code == 422 and folded.search(response.text) is None  # opened, to show the error
    assert re.search(r'<details class="more" open>\s*<summary>More GAN options', response.text)


def test_compare_shows_at_most_max_compare_runs_and_says_which_it_left_out(client: TestClient) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    cfg = RunConfig().model_dump(mode="json")
    ids = [f"{i:012x}" for i in range(MAX_COMPARE + 2)]
    for run_id in ids:
        store.insert_run(RunRecord(id=run_id, name=f"run {run_id}", kind="gan", status="completed", config=cfg,
                                   created_at=time.time()))
    page = client.get("/compare", params={"runs": ",".join(ids)}).text
    assert MAX_COMPARE == 20 and page.count('<li data-run="') == MAX_COMPARE  # chosen from bench/browser.py --compare
    assert f"left out: {ids[MAX_COMPARE]}, {ids[MAX_COMPARE + 1]}" in page


def _without_htmx(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The app as a clone installed without `npm ci` serves it: htmx is not where the pages load it from."""
    missing = tmp_path / "node_modules" / "htmx.org" / "dist" / "htmx.min.js"
    real = assets.vendor_files()
    monkeypatch.setattr(assets, "vendor_files", lambda: {**real, "htmx.min.js": missing})
    return missing


def test_every_page_says_htmx_is_missing_and_the_command_that_installs_it(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rec = _insert(client, name="plain")
    missing = _without_htmx(monkeypatch, tmp_path)
    for url in ("/", f"/runs/{rec.id}", f"/compare?runs={rec.id}", "/runs/ffffffffffff"):
        page = client.get(url, headers={"accept": "text/html"}).text
        banner = re.search(r'<section class="setup-missing" role="alert" id="setup-missing">(.*?)</section>', page,
                           re.S)
        assert banner is not None, url
        assert "htmx.min.js" in banner.group(1) and str(missing) in banner.group(1)
        assert "npm ci" in banner.group(1) and "make install" in banner.group(1)
    home = client.get("/").text
    # Without htmx the launch button would submit the config as a GET query string: it is disabled, and the
    # form's own method is POST anyway. The runs table is rendered with the page instead of "Loading runs…".
    assert re.search(r'<form id="launch-form"[^>]*method="post"', home)
    assert re.search(r'<button type="submit" class="primary" id="launch-button" disabled', home)
    assert f'<tr data-run="{rec.id}"' in home and "Loading runs" not in home
    not_installed = client.get("/assets/vendor/htmx.min.js")
    assert not_installed.status_code == 404 and "npm ci" in not_installed.json()["detail"]


def test_no_setup_message_when_everything_is_installed(client: TestClient) -> None:
    assert assets.missing_vendor_files() == []  # `make install` ran npm ci
    page = client.get("/").text
    assert "setup-missing" not in page
    assert re.search(r'<button type="submit" class="primary" id="launch-button"\s*>', page)


def test_serve_prints_what_is_missing_on_the_terminal_at_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from app import cli

    missing = _without_htmx(monkeypatch, tmp_path)
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: None)  # start, print, do not serve
    assert cli.main(["serve", "--port", "0", "--data-dir", str(tmp_path / "data")]) == 0
    err = capsys.readouterr().err
    assert "serving on http://127.0.0.1:" in err
    assert "htmx.min.js" in err and str(missing) in err and "npm ci" in err


# --------------------------------------------------------------------------- a script's run (SPEC §8)

HOSTILE_CONFIG = {"gan": 5, "train": "x", "data": [1], "<script>x</script>": "<b>hostile</b>",
                  "intervals": {"eval_every": "<i>often</i>"}, "nested": {"deep": {"list": [1, "<img src=x>"]}}}
HOSTILE_SOURCE = {"origin": "script", "host": "<h1>host</h1>", "script": "<script>alert(1)</script>.py",
                  "argv": ["--lr", "<b>argv</b>", "two words"], "python": "3.11.7", "pid": 4242, "gradwatch": "0.1.0",
                  "git": {"commit": "0123456789abcdef0123", "branch": "<em>main</em>", "dirty": True}}
#: What none of the hostile values may ever become: markup.
RAW = ("<b>hostile", "<script>x", "<img src=x>", "<h1>host", "<em>main", "<script>alert", "<b>argv", "<i>often")


def _insert_script_run(client: TestClient, run_id: str, *, kind: str = "gan", status: str = "running",
                       config: dict[str, object] | None = None, controls: list[str] | None = None,
                       source: dict[str, object] | None = None, name: str = "my script") -> RunRecord:
    """A script's run as the server keeps it (free-form config, a source, the controls it registered)."""
    rec = RunRecord(id=run_id, name=name, kind=kind, status=status,
                    config=HOSTILE_CONFIG if config is None else config, created_at=time.time(), step=7,
                    device="script", source=HOSTILE_SOURCE if source is None else source,
                    controls=[] if controls is None else controls, uid=f"uid-{run_id}")
    client.app.state.store.insert_run(rec)  # type: ignore[attr-defined]
    return rec


def _tag(page: str, pattern: str) -> str:
    match = re.search(pattern, page, re.S)
    assert match is not None, pattern
    return match.group(0)


def test_a_scripts_run_with_a_hostile_free_form_config_renders_escaped_on_every_page(client: TestClient) -> None:
    ids = [_insert_script_run(client, f"{kind}00000000", kind=kind).id for kind in ("gan", "vae", "custom")]
    pages = {url: client.get(url) for url in (*(f"/runs/{i}" for i in ids), "/", "/ui/runs-table",
                                              f"/compare?runs={','.join(ids)}", f"/ui/runs/{ids[0]}/config")}
    for url, response in pages.items():
        assert response.status_code == 200, (url, response.text[-2000:])
        for raw in RAW:
            assert raw not in response.text, (url, raw)
    run_page = pages[f"/runs/{ids[0]}"].text
    # The config, flattened to dotted keys, shown as text.
    rows = dict(re.findall(r"<tr><th scope=\"row\">(.*?)</th><td>(.*?)</td></tr>", run_page))
    assert rows["gan"] == "5" and rows["train"] == "x" and rows["data"] == "[1]"
    assert rows["&lt;script&gt;x&lt;/script&gt;"] == "&lt;b&gt;hostile&lt;/b&gt;"
    assert rows["intervals.eval_every"] == "&lt;i&gt;often&lt;/i&gt;"
    assert rows["nested.deep.list"] == '[1, &#34;&lt;img src=x&gt;&#34;]'
    # Where it came from, escaped too.
    source = _tag(run_page, r'<p class="meta source" id="run-source" data-origin="script">.*?</p>')
    assert "&lt;script&gt;alert(1)&lt;/script&gt;.py" in source and "&lt;h1&gt;host&lt;/h1&gt;" in source
    assert "--lr &#39;&lt;b&gt;argv&lt;/b&gt;&#39; &#39;two words&#39;" in source  # argv, quoted as a shell would
    assert ">0123456789<" not in source and ">01234567</code>" in source and "&lt;em&gt;main&lt;/em&gt;" in source
    assert "dirty" in source and "Python <b>3.11.7</b>" in source
    # Nothing in it is read as settings: no dataset, no step target, no learning rates, no eval interval.
    meta = _tag(run_page, r'<p class="meta">.*?</p>')
    assert " on <b>" not in meta and "step <b id=\"run-step\">7</b> /" not in meta
    assert 'placeholder=""' in run_page
    assert "every " not in _tag(run_page, r'<section class="card panel" id="eval-panel".*?</section>')
    boot = re.search(r'<script id="boot" type="application/json">(.*?)</script>', run_page, re.S)
    assert boot is not None and "<" not in boot.group(1)
    data = json.loads(boot.group(1))
    assert data["config"] == HOSTILE_CONFIG and data["external"] is True and data["g_loss"] is None
    # The runs table: the script's device, no dataset, and no Stop for a script that does not check it.
    table = pages["/ui/runs-table"].text
    row = _tag(table, rf'<tr data-run="{ids[2]}" data-status="running">.*?</tr>')
    assert "CUSTOM · <span class=\"origin\">script &lt;script&gt;alert(1)&lt;/script&gt;.py</span>" in row
    assert "None" not in row and "<td>script<span class=\"sub\">&lt;h1&gt;host&lt;/h1&gt;</span></td>" in row
    assert "/stop" not in row
    compare = pages[f"/compare?runs={','.join(ids)}"].text
    assert compare.count('<li data-run="') == 3 and "None" not in compare


STOP_TAG = r'<button type="button" id="stop-button"[^>]*>'


def test_a_scripts_run_shows_only_the_controls_it_registered(client: TestClient) -> None:
    def shown(page: str) -> dict[str, bool]:
        tags = {"stop": STOP_TAG, "form": r'<form id="control-form"[^>]*>',
                "g_loss": r'<label data-control="g_loss"[^>]*>', "lr_g": r'<label data-control="lr_g"[^>]*>',
                "lr_d": r'<label data-control="lr_d"[^>]*>',
                "flip": r'<button type="button" class="primary" id="flip-button"[^>]*>'}
        return {name: " hidden" not in _tag(page, pattern) for name, pattern in tags.items()}

    some = _insert_script_run(client, "some00000000", controls=["lr_g"])
    assert shown(client.get(f"/runs/{some.id}").text) == {
        "stop": False, "form": True, "g_loss": False, "lr_g": True, "lr_d": False, "flip": False}
    none = _insert_script_run(client, "none00000000", controls=[])
    assert not any(shown(client.get(f"/runs/{none.id}").text).values())
    every = _insert_script_run(client, "all000000000", controls=["stop", "g_loss", "lr_g", "lr_d"])
    assert all(shown(client.get(f"/runs/{every.id}").text).values())
    launched = _insert(client, name="launched", status="running")  # a launched run: controls None, all of them
    page = client.get(f"/runs/{launched.id}").text
    assert all(shown(page).values()) and 'id="run-source"' not in page and 'id="script-config"' not in page
    assert re.search(r'name="lr_g"[^>]*placeholder="[0-9.e-]+"', page)  # its config's learning rate
    # A custom run has no live-change form at all, only Stop when registered.
    custom = _insert_script_run(client, "cust00000000", kind="custom", controls=["stop"])
    page = client.get(f"/runs/{custom.id}").text
    assert 'id="control-form"' not in page and " hidden" not in _tag(page, STOP_TAG)
    table = client.get("/ui/runs-table").text
    assert f'hx-post="/ui/table/runs/{custom.id}/stop"' in table
    assert f'hx-post="/ui/table/runs/{none.id}/stop"' not in table


def test_a_synced_train_folder_reads_its_run_config_but_a_scripts_partial_one_is_not_read(client: TestClient) -> None:
    cfg = RunConfig.model_validate({"train": {"steps": 40}}).model_dump(mode="json")
    synced = _insert_script_run(client, "sync00000000", status="completed", config=cfg, controls=[],
                                source={"origin": "sync", "script": "train", "host": "box"})
    page = client.get(f"/runs/{synced.id}").text
    assert "GAN on <b>ring8</b>" in page and "/ 40" in page and 'id="chart-field"' in page
    assert "uploaded with <code>gradwatch sync</code> from" in page
    partial = _insert_script_run(client, "part00000000", status="completed", config={"train": {"steps": 40}},
                                 controls=[], source={"origin": "script", "script": "s.py"})
    page = client.get(f"/runs/{partial.id}").text
    assert "/ 40" not in page and 'id="chart-field"' not in page and 'id="sample-img"' in page
    assert "ring8" not in page


def test_config_rows_flatten_any_json_to_text() -> None:
    from app.web.pages import CONFIG_ROWS, CONFIG_VALUE_CHARS, config_rows

    rows, cut = config_rows({"a": {"b": 1, "c": {"d": None}}, "e": [1, {"f": 2}], "g": "text", "h": {}, "i": True})
    assert rows == [("a.b", "1"), ("a.c.d", "null"), ("e", '[1, {"f": 2}]'), ("g", "text"), ("h", "{}"),
                    ("i", "true")] and not cut
    rows, cut = config_rows({f"k{i}": "v" * (CONFIG_VALUE_CHARS + 5) for i in range(CONFIG_ROWS + 5)})
    assert len(rows) == CONFIG_ROWS and cut and rows[0][1].endswith("…") and len(rows[0][1]) == CONFIG_VALUE_CHARS + 1
    assert config_rows({}) == ([], False) and config_rows(None) == ([], False)
