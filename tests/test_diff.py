"""The compare page's config difference (app/web/diff.py): only the fields that differ, escaped, bounded."""

from __future__ import annotations

import time

from fastapi.testclient import TestClient

from app.store import RunRecord
from app.web.diff import MISSING, config_diff
from trainer.config import RunConfig


def test_only_the_fields_that_differ_with_each_runs_value_in_order() -> None:
    sat = RunConfig.model_validate({"gan": {"g_loss": "saturating", "lr_g": 0.001}}).model_dump(mode="json")
    ns = RunConfig.model_validate({"gan": {"g_loss": "non_saturating", "lr_g": 0.001}}).model_dump(mode="json")
    diff = config_diff([sat, ns])
    assert diff.rows == [("gan.g_loss", ["saturating", "non_saturating"])] and diff.more == 0
    assert config_diff([sat, sat]).rows == []


def test_a_field_some_runs_lack_differs_and_shows_as_absent() -> None:
    diff = config_diff([{"lr": 0.1, "opt": {"name": "adam"}}, {"lr": 0.1}, {"lr": 0.2, "opt": {"name": "adam"}}])
    assert diff.rows == [("lr", ["0.1", "0.1", "0.2"]), ("opt.name", ["adam", MISSING, "adam"])]


def test_values_are_compared_as_values_not_as_text() -> None:
    diff = config_diff([{"a": 1, "b": [1, 2], "c": "1", "d": True}, {"a": 1.0, "b": [1, 2], "c": 1, "d": 1}])
    assert [name for name, _ in diff.rows] == ["c", "d"]  # 1 and 1.0 are the same number; "1" and True are not 1


def test_a_huge_difference_is_cut_and_says_how_much_is_left_out() -> None:
    diff = config_diff([{f"k{i}": i for i in range(500)}, {f"k{i}": -i - 1 for i in range(500)}], limit=200)
    assert len(diff.rows) == 200 and diff.more == 300


def test_the_compare_page_shows_the_differing_fields_escaped(client: TestClient) -> None:
    store = client.app.state.store  # type: ignore[attr-defined]
    configs = [RunConfig.model_validate({"name": name, "gan": {"lr_g": lr}}).model_dump(mode="json")
               for name, lr in (("<b>a</b>", 0.001), ("b", 0.0005))]
    for run_id, cfg in zip(("aaaaaaaaaaaa", "bbbbbbbbbbbb"), configs, strict=True):
        store.insert_run(RunRecord(id=run_id, name=cfg["name"], kind="gan", status="completed", config=cfg,
                                   created_at=time.time()))
    page = client.get("/compare", params={"runs": "aaaaaaaaaaaa,bbbbbbbbbbbb"}).text
    assert "2 fields differ" in page
    assert '<tr data-field="name">' in page and '<tr data-field="gan.lr_g">' in page
    assert '<tr data-field="gan.g_loss">' not in page  # the same in both: not listed
    assert "<td>0.001</td><td>0.0005</td>" in page
    assert "<b>a</b>" not in page and "&lt;b&gt;a&lt;/b&gt;" in page
    single = client.get("/compare", params={"runs": "aaaaaaaaaaaa"}).text
    assert 'id="config-diff"' not in single  # one run: nothing to compare
