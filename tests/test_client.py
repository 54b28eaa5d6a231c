"""The Python client in-process, offline: the folder it writes, what it accepts and refuses (SPEC §8)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import gradwatch
from gradwatch.channel import SpoolOutbox
from gradwatch.client import Run
from gradwatch.folder import RunFolder
from gradwatch.images import Image, as_batch, file_name


def frames_of(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]


def offline(tmp_path: Path, **kwargs: Any) -> Run:
    """An offline run with every key on every logged step (the budget's sampling is tests/test_budget.py's)."""
    kwargs.setdefault("telemetry_budget", 1.0)
    return Run(mode="offline", out=tmp_path / "run", quiet=True, **kwargs)


def tiny_gan() -> tuple[nn.Module, nn.Module, torch.optim.Optimizer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    g = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 2))
    d = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 1))
    return g, d, torch.optim.Adam(g.parameters(), 1e-3), torch.optim.Adam(d.parameters(), 1e-3)


def test_an_offline_run_writes_the_headless_folder_layout(tmp_path: Path) -> None:
    with offline(tmp_path, name="layout", config={"lr": 0.1}, flush_steps=4, flush_ms=10**6) as run:
        for step in range(1, 11):
            run.log({"loss": torch.tensor(1.0 / step), "epoch": 0}, step=step)
        run.log_images(torch.rand(4, 1, 8, 8), step=10)
        run.save_checkpoint({"w": torch.ones(2)}, step=10)
    folder = tmp_path / "run"
    frames = frames_of(folder)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    assert frames[0]["type"] == "status" and frames[0]["status"] == "running"
    assert frames[-1] == {**frames[-1], "type": "status", "status": "completed", "step": 10}
    metrics = [f for f in frames if f["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10]]  # one host copy per 4 steps
    assert metrics[0]["data"]["loss"] == pytest.approx([1.0, 0.5, 1 / 3, 0.25])
    assert (folder / "samples" / "step_00000010.png").is_file()
    assert torch.load(folder / "checkpoints" / "step_00000010.pt", weights_only=True)["w"].tolist() == [1.0, 1.0]
    meta = json.loads((folder / "run.json").read_text())
    assert meta["name"] == "layout" and meta["config"] == {"lr": 0.1} and meta["status"] == "completed"
    assert meta["source"]["script"] and meta["source"]["host"]


def test_values_of_different_key_sets_go_out_as_separate_frames_at_their_steps(tmp_path: Path) -> None:
    with offline(tmp_path, flush_steps=100, flush_ms=10**6) as run:
        for step in range(1, 5):
            run.log({"train/loss": float(step)}, step=step)
            if step % 2 == 0:
                run.log({"val/acc": step / 10}, step=step)
    metrics = [f for f in frames_of(tmp_path / "run") if f["type"] == "metrics"]
    assert [(sorted(m["data"]), m["step"]) for m in metrics] == [(["train/loss"], [1, 2, 3, 4]),
                                                                 (["val/acc"], [2, 4])]


def test_a_watched_gan_reports_every_spec_key_and_steps_the_user_never_logged(tmp_path: Path) -> None:
    g, d, opt_g, opt_d = tiny_gan()
    with offline(tmp_path, flush_steps=100, flush_ms=10**6, hist_every=2) as run:
        gan = run.watch_gan(g, d, g_loss="saturating", opt_g=opt_g, opt_d=opt_d)
        for _ in range(4):  # no run.log at all: each completed step is logged under the next step number
            real = torch.randn(16, 2)
            fake = g(torch.randn(16, 2))
            opt_d.zero_grad()
            gan.discriminator_backward(real, fake.detach())
            opt_d.step()
            opt_g.zero_grad()
            gan.generator_backward(fake)
            opt_g.step()
    frames = frames_of(tmp_path / "run")
    metrics = [f for f in frames if f["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [[1, 2, 3, 4]]
    data = metrics[0]["data"]
    for key in ("loss/d", "loss/g", "grad/g_norm", "grad/g_norm_saturating", "grad/g_norm_non_saturating",
                "dldh/saturating", "dldh/non_saturating", "d/real_prob", "grad/d_layer/0.weight",
                "grad/g_layer/2.bias"):
        assert len(data[key]) == 4, key
    assert data["grad/g_norm"] == data["grad/g_norm_saturating"]  # the applied one is the saturating loss
    assert [f["step"] for f in frames if f["type"] == "dldh"] == [2, 4]
    caps = [f for f in frames if f["type"] == "capabilities"]
    assert caps[0]["kind"] == "gan" and caps[0]["controls"] == ["g_loss", "lr_g", "lr_d"]


def test_a_dashboard_flip_applies_between_two_steps_and_is_recorded(tmp_path: Path) -> None:
    g, d, opt_g, opt_d = tiny_gan()
    with offline(tmp_path, flush_steps=100, flush_ms=10**6) as run:
        gan = run.watch_gan(g, d, g_loss="saturating", opt_g=opt_g, opt_d=opt_d)
        for step in range(1, 5):
            if step == 3:
                run._on_control({"g_loss": "non_saturating", "lr_g": 0.01})  # what the channel thread does
                assert gan.g_loss == "saturating"  # not under a running step
            fake = g(torch.randn(16, 2))
            opt_d.zero_grad()
            gan.discriminator_backward(torch.randn(16, 2), fake.detach())
            opt_d.step()
            opt_g.zero_grad()
            gan.generator_backward(fake)
            opt_g.step()
            run.log({}, step=step)
        assert gan.g_loss == "non_saturating" and opt_g.param_groups[0]["lr"] == 0.01
        with pytest.raises(ValueError, match="g_loss"):
            run._on_control({"g_loss": "bogus"})
    frames = frames_of(tmp_path / "run")
    assert [(f["step"], f["changes"]) for f in frames if f["type"] == "control"] == [
        (2, {"g_loss": "non_saturating", "lr_g": 0.01})]
    data = next(f for f in frames if f["type"] == "metrics")["data"]
    assert data["grad/g_norm"][:2] == data["grad/g_norm_saturating"][:2]
    assert data["grad/g_norm"][2:] == data["grad/g_norm_non_saturating"][2:]


def test_stop_saves_the_models_the_probe_watches_once(tmp_path: Path) -> None:
    g, d, opt_g, opt_d = tiny_gan()
    with offline(tmp_path) as run:
        run.watch_gan(g, d, opt_g=opt_g, opt_d=opt_d)
        run.log({"x": 1.0}, step=7)
        assert not run.stop_requested
        run._stop.set()  # what the channel does on the dashboard's Stop
        assert run.stop_requested and run.stop_requested
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert files == ["step_00000007.pt"]
    state = torch.load(tmp_path / "run" / "checkpoints" / files[0], weights_only=True)
    assert set(state) == {"generator", "discriminator", "opt_g", "opt_d", "g_loss"}
    frames = frames_of(tmp_path / "run")
    assert frames[-1]["status"] == "stopped"
    assert "stop" in [f for f in frames if f["type"] == "capabilities"][-1]["controls"]


def test_an_exception_in_the_with_block_fails_the_run_with_its_traceback(tmp_path: Path) -> None:
    with pytest.raises(ZeroDivisionError), offline(tmp_path) as run:
        run.log({"x": 1.0})
        _ = 1 / 0
    last = frames_of(tmp_path / "run")[-1]
    assert last["status"] == "failed"
    assert "Traceback" in last["error"] and "ZeroDivisionError" in last["error"]


@pytest.mark.parametrize(("metrics", "error", "match"), [
    ({"x": torch.ones(3)}, ValueError, r"'x' is a tensor of 3 elements"),
    ({"x": "text"}, TypeError, r"'x' is a str"),
    ({"": 1.0}, ValueError, "not a metric name"),
    ({"a\nb": 1.0}, ValueError, "not a metric name"),
])
def test_log_refuses_what_it_cannot_chart_naming_the_key(tmp_path: Path, metrics: dict[str, Any],
                                                         error: type[Exception], match: str) -> None:
    with offline(tmp_path) as run, pytest.raises(error, match=match):
        run.log(metrics, step=1)


def test_non_finite_values_travel_as_null(tmp_path: Path) -> None:
    with offline(tmp_path) as run:
        run.log({"x": float("nan"), "y": torch.tensor(float("inf"))}, step=1)
    data = next(f for f in frames_of(tmp_path / "run") if f["type"] == "metrics")["data"]
    assert data == {"x": [None], "y": [None]}


def test_a_checkpoint_holds_tensors_and_plain_data_only(tmp_path: Path) -> None:
    with offline(tmp_path) as run:
        with pytest.raises(ValueError, match=r"obj\['model'\] is a Linear"):
            run.save_checkpoint({"model": nn.Linear(2, 2)}, step=1)
        path = run.save_checkpoint({"model": nn.Linear(2, 2).state_dict(), "step": 1, "tags": ["a"]}, step=1)
    assert set(torch.load(path, weights_only=True)) == {"model", "step", "tags"}


def test_config_takes_an_argparse_namespace_and_updates_travel(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=0.01, out=Path("/tmp/x"), layers=(1, 2))
    with offline(tmp_path, config=args) as run:
        assert run.config.lr == 0.01 and run.config["out"] == "/tmp/x" and run.config["layers"] == [1, 2]
        run.config.update({"batch": 64})
        run.config.seed = 3
    updates = [f["config"] for f in frames_of(tmp_path / "run") if f["type"] == "config"]
    assert updates[-1] == {"lr": 0.01, "out": "/tmp/x", "layers": [1, 2], "batch": 64, "seed": 3}


def test_module_level_calls_act_on_the_current_run_like_wandb(tmp_path: Path) -> None:
    wandb = gradwatch  # what `import gradwatch as wandb` gives a script
    wandb.config.preset = "before init"
    run = wandb.init(project="p", name="drop-in", config={"lr": 0.1}, mode="offline", out=tmp_path / "run",
                     entity="ignored", quiet=True)
    assert wandb.run is run and wandb.config.lr == 0.1
    wandb.log({"loss": 1.0})
    wandb.log({"loss": 0.5, "samples": wandb.Image(np.zeros((8, 8, 3), dtype=np.uint8))})
    wandb.finish()
    assert wandb.run is None
    frames = frames_of(tmp_path / "run")
    assert [m["step"] for m in frames if m["type"] == "metrics"] == [[1, 2]]
    assert [(f["step"], f["label"]) for f in frames if f["type"] == "sample"] == [(2, "samples")]
    with pytest.raises(RuntimeError, match=r"call gradwatch\.init"):
        wandb.log({"x": 1})


def test_logging_works_inside_a_running_event_loop_as_in_jupyter(tmp_path: Path) -> None:
    async def notebook_cell() -> list[dict[str, Any]]:
        with offline(tmp_path) as run:
            for step in range(1, 4):
                run.log({"x": float(step)}, step=step)
                await asyncio.sleep(0)
        return frames_of(tmp_path / "run")

    frames = asyncio.run(notebook_cell())
    assert frames[-1]["status"] == "completed"


@pytest.mark.parametrize(("data", "shape"), [
    (np.zeros((8, 6, 3), dtype=np.uint8), (1, 3, 8, 6)),
    (np.zeros((8, 6), dtype=np.float32), (1, 1, 8, 6)),
    (torch.zeros(5, 1, 4, 4), (5, 1, 4, 4)),
    (torch.zeros(4, 4, 4), (1, 3, 4, 4)),  # RGBA → RGB
])
def test_images_become_batches_of_one_or_three_channels(data: Any, shape: tuple[int, ...]) -> None:
    assert tuple(as_batch(Image(data)).shape) == shape


@pytest.mark.parametrize(("values", "expected"), [
    ([0.0, 1.0], [-1.0, 1.0]), ([-1.0, 1.0], [-1.0, 1.0]), ([0.0, 255.0], [-1.0, 1.0]), ([-3.0, 5.0], [-1.0, 1.0]),
])
def test_images_are_mapped_to_the_grids_range_by_what_they_look_like(values: list[float],
                                                                     expected: list[float]) -> None:
    batch = as_batch(torch.tensor(values).view(1, 1, 1, 2))
    assert batch.flatten().tolist() == pytest.approx(expected)


def test_sample_names_carry_the_step_and_a_safe_label() -> None:
    assert file_name(500, "samples", ".png") == "step_00000500.png"
    assert file_name(3, "val/recon ../x", ".png") == "step_00000003_val-recon-..-x.png"


def test_the_spool_is_bounded_and_says_what_it_dropped(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run", "r", max_backlog_bytes=400)
    folder.bounded = True
    kept = [folder.emit("metrics", step=[i], time=[0.0], data={"x": [1.0]}) for i in range(20)]
    assert kept[0] is not None and kept[-1] is None and folder.dropped > 0
    n = sum(f is not None for f in kept)
    assert folder.outbox.last_seq() == n == folder.seq  # dropped frames never took a seq: no gap
    folder.outbox.release(n, collect=False)  # the server acknowledged everything
    assert folder.outbox.has_room()
    folder.close()


def test_the_spool_outbox_reads_from_any_seq_and_renumbers_a_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    lines = [{"type": "metrics", "seq": s, "step": [s]} for s in (1, 2, 1, 2)]  # a resumed `train --out` folder
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"type": "cut sh')  # a torn last line
    outbox = SpoolOutbox(path, renumber=True)
    assert outbox.last_seq() == 4
    assert [f["seq"] for f, _ in outbox.read(2, 10, 1 << 20)] == [2, 3, 4]
    assert json.loads(outbox.read(3, 1, 1 << 20)[0][1])["seq"] == 3
    outbox.release(2, collect=False)
    assert [f["step"] for f, _ in outbox.read(1, 10, 1 << 20)] == [[1], [2]]
    outbox.close()


def test_a_diverged_gan_is_reported_and_left_to_the_script(tmp_path: Path) -> None:
    g, d, opt_g, opt_d = tiny_gan()
    with offline(tmp_path, flush_steps=2, flush_ms=10**6) as run:
        gan = run.watch_gan(g, d, opt_g=opt_g, opt_d=opt_d)
        for step in range(1, 5):
            real = torch.full((16, 2), float("nan")) if step == 3 else torch.randn(16, 2)
            fake = g(torch.randn(16, 2))
            gan.discriminator_backward(real, fake.detach())
            gan.generator_backward(fake)
            run.log({}, step=step)
    frames = frames_of(tmp_path / "run")
    assert [(f["step"], f["kind"]) for f in frames if f["type"] == "alert"] == [(3, "diverged")]
    assert frames[-1]["status"] == "completed"  # the script decides what a divergence means for it


def test_sync_of_a_folder_that_is_not_a_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    assert main(["sync", str(tmp_path), "--server", "http://127.0.0.1:9", "--no-progress"]) == 1
    assert "has no events.jsonl: not a gradwatch run folder" in capsys.readouterr().err


def test_sync_without_a_server_says_where_it_looked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from app.cli import main

    with offline(tmp_path) as run:
        run.log({"x": 1.0})
    assert main(["sync", str(tmp_path / "run"), "--server", "http://127.0.0.1:9", "--no-progress"]) == 1
    assert "cannot reach a gradwatch server at http://127.0.0.1:9" in capsys.readouterr().err
