"""Sample artefacts: image grids and 2-D field snapshots, checked against analytic answers."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from trainer import samples
from trainer.samples import field_snapshot, save_field_plot, save_image_grid

PAD = samples.GRID_PAD_PX


def _reject_constant(name: str) -> Any:
    raise AssertionError(f"non-standard JSON constant {name} in output")


def _linear_critic(w: tuple[float, float], b: float) -> nn.Linear:
    """h(x) = w·x + b in float64, so ∇ₓh = w and σ(h) are known exactly."""
    lin = nn.Linear(2, 1).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w], dtype=torch.float64))
        lin.bias.fill_(b)
    return lin


def _only_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# --------------------------------------------------------------------------- image grid


@pytest.mark.parametrize(
    ("n", "side", "nrow", "expected_wh"),
    [
        # 8×8 digits are upscaled ×4 to 32 px: 4 columns × 3 rows, 2-px padding around every tile.
        (10, 8, 4, (4 * 32 + 5 * PAD, 3 * 32 + 4 * PAD)),
        # 28×28 MNIST is upscaled ×2 to 56 px: 3 columns × 2 rows.
        (6, 28, 3, (3 * 56 + 4 * PAD, 2 * 56 + 3 * PAD)),
        # default nrow: square-ish, 64 images → 8 × 8
        (64, 8, None, (8 * 32 + 9 * PAD, 8 * 32 + 9 * PAD)),
    ],
)
def test_grid_png_size(tmp_path: Path, n: int, side: int, nrow: int | None, expected_wh: tuple[int, int]) -> None:
    path = tmp_path / "grid.png"
    save_image_grid(torch.rand(n, 1, side, side) * 2 - 1, path, nrow=nrow)
    with Image.open(path) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == expected_wh
        assert img.mode == "L"
    assert _only_files(tmp_path) == {"grid.png"}


def test_grid_pixel_values_and_nearest_neighbour(tmp_path: Path) -> None:
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2  # 0/1 checkerboard
    images = torch.stack(
        [
            torch.full((1, 8, 8), -1.0),  # black
            torch.full((1, 8, 8), 1.0),  # white
            checker.float().mul(2).sub(1).unsqueeze(0),  # -1/1 checkerboard
            torch.full((1, 8, 8), 5.0),  # out of range: clipped to white
        ]
    )
    images[0, 0, 0, 0] = -7.0  # clipped to black
    path = tmp_path / "g.png"
    save_image_grid(images, path, nrow=2)
    arr = np.asarray(Image.open(path))
    tile = 32

    def tile_at(r: int, c: int) -> np.ndarray:
        y, x = PAD + r * (tile + PAD), PAD + c * (tile + PAD)
        return arr[y : y + tile, x : x + tile]

    assert (tile_at(0, 0) == 0).all()
    assert (tile_at(0, 1) == 255).all()
    expected = np.kron(checker.numpy() * 255, np.ones((4, 4), dtype=np.int64))
    np.testing.assert_array_equal(tile_at(1, 0), expected)
    assert (tile_at(1, 1) == 255).all()
    # padding is neither black nor white, so tiles stay separable
    assert arr[0, 0] == samples.GRID_PAD_VALUE
    assert arr[PAD + tile, PAD] == samples.GRID_PAD_VALUE


def test_grid_midpoint_and_rgb(tmp_path: Path) -> None:
    images = torch.zeros(3, 3, 4, 4)
    images[1, 0] = 1.0  # red
    images[1, 1:] = -1.0
    path = tmp_path / "rgb.png"
    save_image_grid(images, path)
    with Image.open(path) as img:
        assert img.mode == "RGB"
        arr = np.asarray(img)
    # 4×4 images are upscaled ×8 to 32 px; default layout is 2 columns × 2 rows
    assert arr.shape == (2 * 32 + 3 * PAD, 2 * 32 + 3 * PAD, 3)
    np.testing.assert_array_equal(arr[PAD + 5, PAD + 5], [128, 128, 128])  # 0 → (0 + 1) · 127.5 rounded
    np.testing.assert_array_equal(arr[PAD + 5, 2 * PAD + 32 + 5], [255, 0, 0])


def test_grid_rejects_bad_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(2, 2, 8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(8, 8), tmp_path / "x.png")
    with pytest.raises(ValueError):
        save_image_grid(torch.zeros(0, 1, 8, 8), tmp_path / "x.png")
    assert _only_files(tmp_path) == set()


def test_grid_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "g.png"
    save_image_grid(torch.full((1, 1, 8, 8), -1.0), path)
    before = path.read_bytes()

    def failing_replace(src: str, dst: str) -> None:
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        save_image_grid(torch.full((1, 1, 8, 8), 1.0), path)
    # the old file is untouched and the temporary file is cleaned up
    assert path.read_bytes() == before
    assert _only_files(tmp_path) == {"g.png"}


# --------------------------------------------------------------------------- field snapshot


def test_field_arrows_match_analytic_gradient() -> None:
    w, b = (0.7, -1.3), 0.4
    critic = _linear_critic(w, b)
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(50, 2, generator=gen, dtype=torch.float64)
    fake = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 2
    snap = field_snapshot(critic, real, fake, grid=16, digits=15)

    wt = torch.tensor(w, dtype=torch.float64)
    h = fake @ wt + b
    sig = torch.sigmoid(h).unsqueeze(1)
    got_logit = torch.tensor(snap["fake_logit"], dtype=torch.float64)
    torch.testing.assert_close(got_logit, h, atol=1e-9, rtol=0)
    # saturating: loss = -softplus(h), ∂loss/∂h = -σ(h), so the step -∂loss/∂x = σ(h)·w
    sat = torch.tensor(snap["arrows"]["saturating"], dtype=torch.float64)
    torch.testing.assert_close(sat, sig * wt, atol=1e-6, rtol=0)
    # non-saturating: loss = softplus(-h), ∂loss/∂h = -(1 - σ(h)), step = (1 - σ(h))·w
    ns = torch.tensor(snap["arrows"]["non_saturating"], dtype=torch.float64)
    torch.testing.assert_close(ns, (1 - sig) * wt, atol=1e-6, rtol=0)
    # the two weights add up to one: both arrows together are exactly ∇ₓh
    torch.testing.assert_close(sat + ns, wt.expand(40, 2), atol=1e-9, rtol=0)

    # the critic's parameters must not accumulate gradients
    assert critic.weight.grad is None
    assert critic.bias.grad is None


def test_field_default_rounding_keeps_values() -> None:
    critic = _linear_critic((0.7, -1.3), 0.4).float()
    fake = torch.randn(30, 2, generator=torch.Generator().manual_seed(1))
    snap = field_snapshot(critic, fake, fake, grid=8)
    h = (fake @ torch.tensor([0.7, -1.3]) + 0.4).double()
    sat = torch.tensor(snap["arrows"]["saturating"], dtype=torch.float64)
    torch.testing.assert_close(
        sat, torch.sigmoid(h).unsqueeze(1) * torch.tensor([0.7, -1.3]).double(), rtol=1e-4, atol=1e-7
    )
    # rounded to a few significant digits: the JSON stays small
    assert all(len(repr(v)) <= 12 for row in snap["fake"] for v in row)


def test_field_saturating_vanishes_when_d_wins() -> None:
    w = (0.3, -0.4)  # ‖w‖ = 0.5
    critic = _linear_critic(w, -20.0)
    fake = torch.randn(64, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.05
    real = torch.ones(8, 2, dtype=torch.float64)
    snap = field_snapshot(critic, real, fake)
    assert max(snap["fake_logit"]) < -19.9
    sat = np.linalg.norm(np.array(snap["arrows"]["saturating"]), axis=1)
    ns = np.linalg.norm(np.array(snap["arrows"]["non_saturating"]), axis=1)
    assert (sat < 1e-8).all()  # σ(-20) ≈ 2e-9
    assert (sat > 0).all()  # tiny but kept: significant-digit rounding does not flush it to zero
    np.testing.assert_allclose(ns, 0.5, atol=1e-5)
    assert snap["arrow_mean"]["saturating"] < 1e-8
    assert snap["arrow_mean"]["non_saturating"] == pytest.approx(0.5, abs=1e-5)


def test_field_d_prob_grid_orientation_and_extent() -> None:
    w, b = (1.5, -0.5), 0.25  # asymmetric, so a transposed grid would not match
    critic = _linear_critic(w, b)
    pts = torch.zeros(4, 2, dtype=torch.float64)
    snap = field_snapshot(critic, pts, pts, grid=9, extent=3.0, digits=15)
    assert snap["extent"] == [-3.0, 3.0, -3.0, 3.0]
    gx = np.array(snap["grid_x"])
    gy = np.array(snap["grid_y"])
    np.testing.assert_allclose(gx, np.linspace(-3, 3, 9), atol=1e-12)
    np.testing.assert_allclose(gy, np.linspace(-3, 3, 9), atol=1e-12)
    d_prob = np.array(snap["d_prob"])
    assert d_prob.shape == (9, 9)
    h = w[0] * gx[None, :] + w[1] * gy[:, None] + b  # d_prob[j][i] ↔ (grid_x[i], grid_y[j])
    np.testing.assert_allclose(d_prob, 1 / (1 + np.exp(-h)), atol=1e-9)


def test_field_auto_extent_covers_points_and_caps_counts() -> None:
    critic = _linear_critic((1.0, 1.0), 0.0).float()
    gen = torch.Generator().manual_seed(3)
    real = torch.randn(1500, 2, generator=gen) + torch.tensor([5.0, 0.0])
    fake = torch.randn(1200, 2, generator=gen) * 0.1
    snap = field_snapshot(critic, real, fake, grid=4)
    xmin, xmax, ymin, ymax = snap["extent"]
    allp = torch.cat([real[:1000], fake[:1000]])
    assert xmin < allp[:, 0].min() and xmax > allp[:, 0].max()
    assert ymin < allp[:, 1].min() and ymax > allp[:, 1].max()
    assert xmax - xmin == pytest.approx(ymax - ymin, rel=1e-4)  # square: arrows keep their true direction
    assert len(snap["real"]) == samples.MAX_SNAPSHOT_POINTS
    assert len(snap["fake"]) == samples.MAX_SNAPSHOT_POINTS
    assert len(snap["fake_logit"]) == samples.MAX_SNAPSHOT_POINTS
    assert len(snap["arrows"]["saturating"]) == samples.MAX_SNAPSHOT_POINTS
    assert snap["real"][0] == pytest.approx(real[0].tolist(), rel=1e-4)  # the first points are kept


def test_field_leaves_module_state_alone() -> None:
    bn = nn.BatchNorm1d(8)
    critic = nn.Sequential(nn.Linear(2, 8), bn, nn.Tanh(), nn.Linear(8, 1)).train()
    assert bn.running_mean is not None
    running = bn.running_mean.clone()
    fake = torch.randn(32, 2, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # an outer no_grad (as in a training loop's eval hook) must not kill the arrows
        snap = field_snapshot(critic, fake, fake, grid=8)
    assert critic.training and all(m.training for m in critic.modules())
    torch.testing.assert_close(bn.running_mean, running)  # the probe grid did not leak into BN stats
    assert all(p.grad is None for p in critic.parameters())
    assert np.linalg.norm(np.array(snap["arrows"]["non_saturating"]), axis=1).max() > 0


# --------------------------------------------------------------------------- field plot


def _red_pixels(arr: np.ndarray) -> int:
    r, g, b = (arr[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g < 110) & (b < 110)).sum())


def test_field_plot_png_json_and_shared_arrow_scale(tmp_path: Path) -> None:
    # D wins everywhere the fakes are (h ≈ -20): saturating arrows vanish, non-saturating ones do not
    critic = _linear_critic((0.3, -0.4), -20.0)
    gen = torch.Generator().manual_seed(5)
    fake = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.5
    fake[3] = float("nan")  # a diverged sample must not break the JSON or the plot
    real = torch.randn(40, 2, generator=gen, dtype=torch.float64) * 0.5 + 2
    snap = field_snapshot(critic, real, fake, grid=32)
    png, js = tmp_path / "field.png", tmp_path / "field.json"
    save_field_plot(snap, png, js, title="h ≈ -20")

    loaded = json.loads(js.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    assert loaded == snap
    assert loaded["fake"][3] == [None, None]
    assert set(loaded["arrows"]) == {"saturating", "non_saturating"}

    with Image.open(png) as img:
        img.load()
        assert img.format == "PNG"
        assert img.size == (1100, 500)
        arr = np.asarray(img.convert("RGB"))
    assert _only_files(tmp_path) == {"field.png", "field.json"}

    # Fake points are drawn red in both panels, arrows only where they have length. Baseline: the
    # same plot with every arrow zeroed, i.e. the red of the points alone.
    bare = json.loads(json.dumps(snap))
    for name in bare["arrows"]:
        bare["arrows"][name] = [[0.0, 0.0] for _ in bare["arrows"][name]]
    save_field_plot(bare, tmp_path / "bare.png", tmp_path / "bare.json")
    base = np.asarray(Image.open(tmp_path / "bare.png").convert("RGB"))
    points_only = _red_pixels(base[:, :500])
    left, right = _red_pixels(arr[:, :500]), _red_pixels(arr[:, 500:1000])
    # A per-panel scale (or one taken from the smaller arrows) would draw visible saturating arrows;
    # the common scale from the larger set leaves the saturating panel with bare points.
    assert left <= 1.05 * points_only + 10, (left, points_only)
    assert right > 2 * points_only, (right, points_only)


def test_field_plot_rejects_nan_before_writing(tmp_path: Path) -> None:
    snap = field_snapshot(_linear_critic((1.0, 0.0), 0.0).float(), torch.zeros(2, 2), torch.zeros(2, 2), grid=4)
    snap["fake_logit"][0] = math.nan
    with pytest.raises(ValueError):
        save_field_plot(snap, tmp_path / "f.png", tmp_path / "f.json")
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_field_snapshot_on_cuda() -> None:
    critic = _linear_critic((0.7, -1.3), 0.4).cuda()
    fake = torch.randn(20, 2, dtype=torch.float64, device="cuda")
    snap = field_snapshot(critic, fake, fake, grid=8, digits=15)
    h = (fake @ torch.tensor([0.7, -1.3], dtype=torch.float64, device="cuda") + 0.4).cpu()
    ns = torch.tensor(snap["arrows"]["non_saturating"], dtype=torch.float64)
    torch.testing.assert_close(
        ns, (1 - torch.sigmoid(h)).unsqueeze(1) * torch.tensor([0.7, -1.3]).double(), atol=1e-6, rtol=0
    )
    assert critic.weight.grad is None


# --------------------------------------------------------------------------- retention


def _touch_steps(folder: Path, steps: list[int], suffixes: tuple[str, ...]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for step in steps:
        for suffix in suffixes:
            (folder / f"step_{step:08d}{suffix}").write_bytes(b"x")


def test_prune_samples_keeps_the_first_and_the_newest_steps_with_all_their_files(tmp_path: Path) -> None:
    """A 2-D GAN writes a PNG and a JSON per sample step: they go or stay together. Temp files of writes in
    progress and foreign files are never touched, and a missing folder is no error."""
    folder = tmp_path / "samples"
    _touch_steps(folder, [10, 20, 30, 40, 50, 60], (".png", ".json"))
    (folder / ".tmp-abc-step_00000070.png").write_bytes(b"partial")
    (folder / "notes.txt").write_bytes(b"mine")
    removed = samples.prune_samples(folder, keep=3)
    assert sorted(p.name for p in removed) == [f"step_{s:08d}{x}" for s in (20, 30) for x in (".json", ".png")]
    assert _only_files(folder) == {f"step_{s:08d}{x}" for s in (10, 40, 50, 60) for x in (".json", ".png")} | {
        ".tmp-abc-step_00000070.png", "notes.txt"}
    assert samples.prune_samples(tmp_path / "missing", keep=3) == []
    with pytest.raises(ValueError, match="at least 1"):
        samples.prune_samples(folder, keep=0)


def test_headless_run_with_a_sample_every_step_keeps_only_keep_samples_of_them(tmp_path: Path) -> None:
    """``sample_every=1`` used to keep every sample for ever (≈ 3 GiB/h per run). A real ``gradwatch train``
    process with ``keep_samples=4`` ends with its first sample and its newest four on disk, while its events
    still announce every step's sample."""
    import subprocess
    import sys

    cfg = {
        "kind": "vae", "data": {"name": "digits"}, "model": {"width": 16, "depth": 1, "latent_dim": 2},
        "train": {"steps": 30, "batch_size": 16, "seed": 3},
        "intervals": {"sample_every": 1, "eval_every": 1000, "checkpoint_every": 1000, "keep_samples": 4},
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "app.cli", "train", str(path), "--out", str(out)],
                          cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _only_files(out / "samples") == {f"step_{s:08d}.png" for s in (1, 27, 28, 29, 30)}
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["type"] == "sample"] == list(range(1, 31))
