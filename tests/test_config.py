"""The run config refuses bad input with errors that name the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from trainer.config import ControlRequest, RunConfig
from trainer.presets import all_presets, preset_names


def _error_locs(raw: dict) -> list[str]:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(raw)
    return [".".join(str(p) for p in err["loc"]) for err in info.value.errors()]


def test_defaults_validate_and_round_trip() -> None:
    cfg = RunConfig()
    assert RunConfig.model_validate_json(cfg.model_dump_json()) == cfg


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"gan": {"lr_g": -1e-3}}, "gan.lr_g"),
        ({"gan": {"lr_d": 0}}, "gan.lr_d"),
        ({"gan": {"lr_g": math.nan}}, "gan.lr_g"),
        ({"vae": {"beta": math.inf}}, "vae.beta"),
        ({"gan": {"g_loss": "minimax"}}, "gan.g_loss"),
        ({"train": {"batch_size": 10**7}}, "train.batch_size"),
        ({"train": {"steps": 0}}, "train.steps"),
        ({"train": {"device": "tpu"}}, "train.device"),
        ({"model": {"width": 10**6}}, "model.width"),
        ({"data": {"name": "imagenet"}}, "data.name"),
        ({"gan": {"d_stepz": 2}}, "gan.d_stepz"),
        ({"surprise": 1}, "surprise"),
        ({"name": "x" * 201}, "name"),
    ],
)
def test_bad_field_is_named(raw: dict, field: str) -> None:
    assert field in _error_locs(raw)


def test_cross_field_rules_explain_themselves() -> None:
    with pytest.raises(ValidationError, match=r"data\.path is required"):
        RunConfig.model_validate({"data": {"name": "mnist_idx"}})
    with pytest.raises(ValidationError, match=r"model\.arch 'conv' needs image data"):
        RunConfig.model_validate({"model": {"arch": "conv"}})


def test_with_overrides_validates_and_rejects_unknown_paths() -> None:
    cfg = RunConfig().with_overrides({"gan.g_loss": "saturating", "train.seed": 3})
    assert (cfg.gan.g_loss, cfg.train.seed) == ("saturating", 3)
    with pytest.raises(KeyError):
        RunConfig().with_overrides({"gan.nope": 1})
    with pytest.raises(ValidationError):
        RunConfig().with_overrides({"gan.lr_g": -1})


def test_presets_are_complete_and_named() -> None:
    presets = all_presets()
    assert {"ring8-saturating", "ring8-non-saturating", "digits-gan", "digits-vae"} <= set(presets)
    assert preset_names() == list(presets)
    sat, non_sat = presets["ring8-saturating"], presets["ring8-non-saturating"]
    assert sat.gan.g_loss == "saturating" and sat.gan.d_head_start > 0
    assert non_sat.gan.g_loss == "non_saturating"
    assert presets["digits-vae"].kind == "vae"


def test_control_request_needs_a_change_and_bounds_it() -> None:
    assert ControlRequest.model_validate({"g_loss": "non_saturating"}).changes() == {"g_loss": "non_saturating"}
    with pytest.raises(ValidationError, match="at least one"):
        ControlRequest.model_validate({})
    with pytest.raises(ValidationError) as info:
        ControlRequest.model_validate({"lr_g": 5.0})
    assert info.value.errors()[0]["loc"] == ("lr_g",)


def test_retention_is_bounded_so_files_cannot_fill_a_disk() -> None:
    """keep_checkpoints accepted 1000 and samples were never pruned (issue 12, item 7): both are now bounded."""
    assert "intervals.keep_checkpoints" in _error_locs({"intervals": {"keep_checkpoints": 51}})
    assert "intervals.keep_samples" in _error_locs({"intervals": {"keep_samples": 1001}})
    assert "intervals.keep_samples" in _error_locs({"intervals": {"keep_samples": 0}})
    cfg = RunConfig.model_validate({"intervals": {"keep_checkpoints": 50, "keep_samples": 1000}})
    assert (cfg.intervals.keep_checkpoints, cfg.intervals.keep_samples) == (50, 1000)
    assert RunConfig().intervals.keep_samples == 200
