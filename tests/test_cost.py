"""The cost estimator against the real thing, and the configs it refuses at submit.

The estimator is arithmetic on the config (cheap enough to run on every validation); these tests keep it honest:
parameter counts exact against the models ``trainer.models`` builds, checkpoint sizes against files a trainer
really wrote, training memory against the peak a real process reached. Then the refusals: each limit names its
fields and the cost, no field at its own upper bound is refused alone, and the issue's example (a conv GAN of
width 1024 whose checkpoint would be 1.5 GiB) is a 422 at ``POST /api/runs``.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError

from tests.live_server import TINY_GAN, TINY_VAE
from trainer import cost
from trainer.config import DataConfig, IntervalConfig, ModelConfig, RunConfig, TrainConfig, VaeConfig
from trainer.loop import RunOptions, make_trainer
from trainer.models import build_gan, build_vae
from trainer.presets import all_presets

ROOT = Path(__file__).resolve().parents[1]

#: The issue's example: 32 px, conv, width 1024, a 512-dimensional latent, Adam: a 1.5 GiB checkpoint.
HUGE_CHECKPOINT: dict[str, Any] = {
    "kind": "gan", "data": {"name": "image_folder", "path": "/data/faces", "image_size": 32},
    "model": {"arch": "conv", "width": 1024, "latent_dim": 512},
}


def _cfg(kind: str, arch: str, data: dict[str, Any], width: int, depth: int = 2, latent: int = 8) -> RunConfig:
    return RunConfig.model_validate({"kind": kind, "data": data,
                                     "model": {"arch": arch, "width": width, "depth": depth, "latent_dim": latent}})


_IMAGE_DATA = [{"name": "digits"}, {"name": "mnist_idx", "path": "/x", "image_size": 28},
               {"name": "image_folder", "path": "/x", "channels": 3}]
_SHAPES = [
    (kind, arch, data, width)
    for kind, arch, width in itertools.product(("gan", "vae"), ("mlp", "conv"), (4, 48))
    for data in ([{"name": "ring8"}] if arch == "mlp" else []) + _IMAGE_DATA
] + [("gan", "pacgan", data, width) for width in (4, 48) for data in ({"name": "ring8"}, {"name": "digits"})]


@pytest.mark.parametrize(("kind", "arch", "data", "width"), _SHAPES)
def test_parameter_and_buffer_counts_are_exact(kind: str, arch: str, data: dict[str, Any], width: int) -> None:
    """Built on the meta device (no memory), every network the config makes has exactly the counted tensors."""
    cfg = _cfg(kind, arch, data, width, depth=3, latent=5)
    with torch.device("meta"):
        built = dict(zip(("generator", "discriminator"), build_gan(cfg.model, cost.data_shape(cfg)), strict=True)) \
            if kind == "gan" else {"encoder": (vae := build_vae(cfg.model, cost.data_shape(cfg))).encoder,
                                   "decoder": vae.decoder}
    counted = cost.networks(cfg)
    assert set(counted) == set(built)
    for name, net in built.items():
        params, buffers = list(net.parameters()), list(net.buffers())
        assert (counted[name].params, counted[name].param_tensors) == (sum(p.numel() for p in params), len(params))
        assert (counted[name].buffers, counted[name].buffer_tensors) == (sum(b.numel() for b in buffers), len(buffers))


def test_the_issues_example_counts_as_the_issue_measured() -> None:
    """Conv, width 1024, latent 512, 32 px, Adam: the real model's parameters, weights and Adam's two moments,
    1.5 GiB, which the server's default max_artifact_bytes (1 GiB) could never take."""
    # Built past the run config's validation, which now refuses it; each section is valid on its own.
    cfg = RunConfig.model_construct(kind="gan", data=DataConfig.model_validate(HUGE_CHECKPOINT["data"]),
                                    model=ModelConfig.model_validate(HUGE_CHECKPOINT["model"]))
    with torch.device("meta"):
        g, d = build_gan(cfg.model, cost.data_shape(cfg))
    params = sum(p.numel() for p in itertools.chain(g.parameters(), d.parameters()))
    assert cost.estimate(cfg).parameters == params == 134_648_834
    assert 1.45 * cost.GiB < cost.checkpoint_bytes(cfg) < 1.55 * cost.GiB
    assert 3 * 4 * params < cost.checkpoint_bytes(cfg) < 1.01 * 3 * 4 * params


@pytest.mark.parametrize("raw", [
    {"model": {"width": 32, "depth": 2, "latent_dim": 2}, "gan": {"g_optimizer": "sgd", "d_optimizer": "sgd"}},
    {"data": {"name": "digits"}, "model": {"arch": "conv", "width": 64}, "gan": {"g_loss": "wasserstein"}},
    {"kind": "vae", "data": {"name": "digits"}, "model": {"width": 256, "depth": 2}},
    {"kind": "vae", "data": {"name": "digits"}, "model": {"arch": "conv", "width": 48}},
], ids=["mlp-gan-sgd", "conv-gan", "mlp-vae", "conv-vae"])
def test_checkpoint_estimate_matches_the_file_a_trainer_writes(tmp_path: Path, raw: dict[str, Any]) -> None:
    """After one step (optimiser state exists) the real checkpoint file is within the estimate, and the estimate
    is at most 2 % over it for a model of any size (a small one's fixed overhead is guessed more coarsely)."""
    cfg = RunConfig.model_validate({**raw, "train": {"batch_size": 16, "device": "cpu"}})
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=lambda _frame: None, cache_dir=tmp_path))
    trainer.train_step(1, log=True)
    trainer.step = 1
    trainer._checkpoint(1, keep=False)
    real = (tmp_path / "checkpoints" / "step_00000001.pt").stat().st_size
    estimated = cost.checkpoint_bytes(cfg)
    assert real <= estimated <= max(1.02 * real, real + 16 * 1024), (real, estimated)


_PEAK_SCRIPT = """
import json, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
from trainer.config import RunConfig
from trainer.loop import RunOptions, make_trainer
cfg = RunConfig.model_validate_json(sys.argv[1])
out = Path(tempfile.mkdtemp())
trainer = make_trainer(cfg, RunOptions(out_dir=out, sink=lambda frame: None, cache_dir=out))

def status(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS")
for step in (1, 2):
    trainer.train_step(step, log=True)
print(json.dumps({"grew": status("VmHWM") - before}))
"""


@pytest.mark.parametrize("raw", [
    {"data": {"name": "digits"}, "model": {"arch": "conv", "width": 128}, "train": {"batch_size": 1024}},
    {"kind": "vae", "data": {"name": "digits"}, "model": {"width": 512, "depth": 2}, "vae": {"mc_samples": 4},
     "train": {"batch_size": 2048}},
], ids=["conv-gan", "mlp-vae"])
def test_training_memory_estimate_is_within_a_factor_of_the_measured_peak(raw: dict[str, Any]) -> None:
    """A fresh process builds the trainer, then takes two logged steps (gradients, optimiser state, shadow
    gradients, activations all appear): the peak RSS growth is what the estimate, less the weights already there
    and the fixed base, must match within a factor of two. Measured ≈ 165 MB for both here, estimates 1.2–1.5× that:
    upper-end, as a limit should be."""
    cfg = RunConfig.model_validate({**raw, "train": {**raw["train"], "device": "cpu"}})
    done = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, cfg.model_dump_json()], cwd=ROOT, timeout=180,
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    grew = json.loads(done.stdout.strip().splitlines()[-1])["grew"]
    weights = 4 * sum(net.params + net.buffers for net in cost.networks(cfg).values())
    step_estimate = cost.training_memory_bytes(cfg) - cost._BASE_MEMORY_BYTES - weights
    assert 0.75 * grew < step_estimate < 2.5 * grew, (grew, step_estimate)


def _refusal(raw: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        RunConfig.model_validate(raw)
    (error,) = info.value.errors()
    assert error["type"] == "config_cost"
    return str(error["msg"])


def test_each_limit_refuses_with_the_fields_and_the_cost() -> None:
    message = _refusal(HUGE_CHECKPOINT)
    for part in ("model.width=1024", "model.latent_dim=512", "32×32", "G adam", "checkpoint of ≈ 1.5 GiB",
                 "over the 1.0 GiB limit"):
        assert part in message
    message = _refusal({"kind": "gan", "data": {"name": "image_folder", "path": "/x", "channels": 3},
                        "model": {"arch": "conv", "width": 1024}, "train": {"batch_size": 4096}})
    assert "train.batch_size=4096" in message and "model.width=1024" in message
    assert "of memory, over the 16.0 GiB limit" in message
    message = _refusal({"data": {"name": "digits"}, "model": {"arch": "conv", "width": 1024},
                        "intervals": {"keep_checkpoints": 50}})
    assert "intervals.keep_checkpoints=50" in message and "over the 20.0 GiB limit" in message
    message = _refusal({"model": {"width": 1024, "depth": 8}, "intervals": {"checkpoint_every": 1}})
    assert "intervals.checkpoint_every=1" in message and "per 1,000 steps, over the 20.0 GiB limit" in message


def _upper_bounds() -> list[tuple[str, str, int]]:
    out = []
    for section, model in (("model", ModelConfig), ("train", TrainConfig), ("vae", VaeConfig),
                           ("intervals", IntervalConfig)):
        for name, info in model.model_fields.items():
            high = next((m.le for m in info.metadata if getattr(m, "le", None) is not None), None)
            if info.annotation is int and high is not None:
                out.append((section, name, int(high)))
    return out


@pytest.mark.parametrize(("kind", "section", "name", "high"),
                         [(kind, *bound) for kind in ("gan", "vae") for bound in _upper_bounds()])
def test_no_field_at_its_own_upper_bound_is_refused_alone(kind: str, section: str, name: str, high: int) -> None:
    """The cost limits bite combinations, never a single field the schema allows: each integer field at its
    maximum, everything else at defaults, still validates (2-D and image data)."""
    for data in ({"name": "ring8"}, {"name": "digits"}):
        RunConfig.model_validate({"kind": kind, "data": data, section: {name: high}})


def test_shipped_presets_and_test_configs_cost_little() -> None:
    """The demos and the suite's tiny runs are nowhere near a limit: a tenth of each, at most."""
    configs = {**all_presets(), "TINY_GAN": RunConfig.model_validate(TINY_GAN),
               "TINY_VAE": RunConfig.model_validate(TINY_VAE)}
    for name, cfg in configs.items():
        est = cost.estimate(cfg)
        assert est.checkpoint_bytes < cost.MAX_CHECKPOINT_BYTES / 10, name
        assert est.training_memory_bytes < cost.MAX_TRAINING_MEMORY_BYTES / 10, name
        assert est.retained_disk_bytes < cost.MAX_RETAINED_DISK_BYTES / 10, name
        assert est.written_per_1000_steps < cost.MAX_WRITTEN_PER_1000_STEPS / 10, name


def test_post_runs_refuses_an_over_cost_config_with_a_422_naming_the_fields(client: TestClient) -> None:
    """The issue's 1.5 GiB-checkpoint config was accepted and then wedged its run; now the submit refuses it."""
    response = client.post("/api/runs", json=HUGE_CHECKPOINT)
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body"] and error["type"] == "config_cost"
    assert "model.width=1024" in error["msg"] and "model.latent_dim=512" in error["msg"]
    assert "≈ 1.5 GiB" in error["msg"] and "1.0 GiB limit" in error["msg"]
    assert client.get("/api/runs").json() == []
    sweep = client.post("/api/sweeps", json={"base": {**HUGE_CHECKPOINT, "model": {"arch": "conv", "width": 1024}},
                                             "vary": {"model.latent_dim": [16, 512]}})
    assert sweep.status_code == 422, sweep.text
    assert "model.latent_dim=512" in json.dumps(sweep.json(), ensure_ascii=False)


@pytest.mark.parametrize("raw", [
    {"model": {"width": 32, "depth": 2, "latent_dim": 2}},
    {"data": {"name": "digits"}, "model": {"arch": "conv", "width": 16}},
    {"kind": "vae", "data": {"name": "image_folder", "channels": 3}, "model": {"width": 16}},
], ids=["ring8-field", "digits-grid", "32px-rgb-grid"])
def test_sample_estimate_covers_the_files_a_sample_step_writes(tmp_path: Path, raw: dict[str, Any]) -> None:
    """An untrained network's samples are noise, the least compressible a sample gets: still within the
    estimate that the disk limits multiply, and within 2× of it for a grid of tiles not upscaled (raw pixels)."""
    from PIL import Image

    from trainer import loop, samples

    assert (cost._SAMPLE_GRID, cost._MIN_TILE_PX, cost._GRID_PAD_PX) == (
        loop.SAMPLE_GRID, samples.MIN_TILE_PX, samples.GRID_PAD_PX)
    if raw.get("data", {}).get("name") == "image_folder":
        images = tmp_path / "images"
        images.mkdir()
        for i in range(4):
            Image.new("RGB", (32, 32), (60 * i, 0, 0)).save(images / f"{i}.png")
        raw = {**raw, "data": {**raw["data"], "path": str(images)}}
    cfg = RunConfig.model_validate({**raw, "train": {"batch_size": 16, "device": "cpu"}})
    trainer = make_trainer(cfg, RunOptions(out_dir=tmp_path, sink=lambda _frame: None, cache_dir=tmp_path))
    names = trainer.write_sample(1)
    written = sum((tmp_path / "samples" / name).stat().st_size for name in names)
    estimated = cost.sample_bytes(cfg)
    assert written <= estimated, (written, estimated)
    if not cfg.data.is_2d and cfg.data.resolved_image_size >= samples.MIN_TILE_PX:
        assert estimated < 2 * written, (written, estimated)


def test_a_server_with_a_lower_max_artifact_bytes_refuses_what_it_could_not_store(tmp_path: Path) -> None:
    """RunConfig allows checkpoints up to the default cap (1 GiB); a server set lower refuses at submit, not at the
    first checkpoint, naming the fields and its own setting."""
    from app.main import create_app
    from app.settings import Settings

    app = create_app(Settings(data_dir=tmp_path, max_artifact_bytes=256 << 10, _env_file=None))  # type: ignore[call-arg]
    with TestClient(app, base_url="http://127.0.0.1:8000") as client:
        wide = {**TINY_GAN, "model": {**TINY_GAN["model"], "width": 512}}  # ≈ 12 MiB of checkpoint with Adam
        response = client.post("/api/runs", json=wide)
        assert response.status_code == 422, response.text
        detail = response.json()["detail"]
        assert "model.width=512" in detail and "this server's max_artifact_bytes" in detail
        assert client.get("/api/runs").json() == []
        assert client.post("/api/runs", json=TINY_GAN).status_code == 201  # a small model still fits
