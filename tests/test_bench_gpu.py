"""Smoke tests of ``bench/gpu.py``, the prepared GPU run: on the CPU at the smallest sizes, the JSON it promises.

These check the script's plumbing (a lent GPU's minutes must not go on a bug), not its figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench import gpu

MEASURED = ("calls", "ms_per_call", "host_ms_per_call", "device_ms_per_call", "kernels_per_call",
            "launches_per_call", "aten_ops_per_call", "profile_error")
TRAINER_PIECES = ["user_step", "trainer_unlogged", "trainer_logged_default", "trainer_logged_every_step"]
GAN_PIECES = ["g_grad_user", "g_grad_applied", "g_grad_applied_shadow", "layer_norms"]


def test_cpu_smoke_run_writes_micro_and_overhead(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--quick", "--cases", "ring8-non-saturating,digits-vae", "--calls", "2",
                     "--warmup-calls", "1", "--profiled-calls", "1", "--inprocess", "--overhead-steps", "2",
                     "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    meta = payload["meta"]
    for key in ("device", "device_name", "driver", "torch", "cuda", "cpu", "elapsed_s", "micro_s", "quick"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["torch"] == torch.__version__ and meta["quick"] is True
    assert payload["imports"]["missing"] == []

    micro = payload["micro"]
    assert micro["calls"] == 2 and micro["profiled_calls"] == 1
    gan, vae = micro["cases"]
    assert (gan["preset"], gan["kind"], vae["preset"], vae["kind"]) == ("ring8-non-saturating", "gan",
                                                                        "digits-vae", "vae")
    assert list(gan["pieces"]) == TRAINER_PIECES + GAN_PIECES
    assert list(vae["pieces"]) == TRAINER_PIECES
    for case in (gan, vae):
        for name, piece in case["pieces"].items():
            assert set(piece) == set(MEASURED), name
            assert piece["ms_per_call"] > 0 and piece["calls"] == 2
            assert piece["device_ms_per_call"] is None and piece["kernels_per_call"] is None  # CPU: no CUDA figures
            assert piece["profile_error"] is None and piece["aten_ops_per_call"] > 0
    assert set(gan["derived"]["shadow_extra"]) == {"ms_per_call", "device_ms_per_call", "kernels_per_call",
                                                   "launches_per_call", "aten_ops_per_call"}
    # The shadow gradient is a second loss's pass through G: it cannot take fewer ops than the applied one alone.
    assert gan["derived"]["shadow_extra"]["aten_ops_per_call"] > 0
    assert "shadow_extra" not in vae["derived"]

    overhead = payload["overhead"]
    assert overhead["meta"]["variants"] == list(gpu.OVERHEAD_VARIANTS)
    assert overhead["meta"]["device"] == "cpu"
    assert [r["preset"] for r in overhead["results"]] == ["ring8-non-saturating", "digits-vae"]
    for result in overhead["results"]:
        assert list(result["variants"]) == list(gpu.OVERHEAD_VARIANTS)
        assert result["variants"]["every-step"]["ratio_to_bare"]["median"] > 0
    assert (tmp_path / "overhead-gpu.json").is_file()
    assert "trainer_logged_every_step" in capsys.readouterr().out


def test_a_missing_dependency_stops_the_run_before_it_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(gpu, "check_imports", lambda: {"missing": ["fastapi>=0.115"], "optional_missing": []})
    out = tmp_path / "gpu.json"
    assert gpu.main(["--device", "cpu", "--quick", "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert "fastapi>=0.115" in err and "pip install" in err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_asked_without_a_gpu_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu.main(["--json", str(tmp_path / "gpu.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_this_environment_has_what_the_run_imports() -> None:
    assert gpu.check_imports()["missing"] == []
    assert gpu._requirement_name("uvicorn[standard]>=0.30") == "uvicorn"
    assert gpu._requirement_name("torch>=2.6,<3") == "torch"
