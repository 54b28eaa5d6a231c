"""Sample artefacts a run writes for the browser: image grids and 2-D GAN field snapshots.

Everything here is written atomically (:func:`trainer.files.atomic_write`)
because the server serves these files while the worker keeps rewriting them:
a reader must see either the old file or the new one, never half a PNG.

The 2-D field snapshot is the picture behind SPEC §1: for every fake point it
records where one generator step would move it under the saturating and the
non-saturating loss. Both arrows share ∇ₓh and differ only by the per-sample
weight σ(h) versus 1 − σ(h), so when D wins (h ≪ 0) the saturating arrows
shrink to nothing while the non-saturating ones keep their length. The plot
draws both panels at one common arrow scale so that difference is visible
rather than normalised away.

matplotlib is used through ``Figure`` + ``FigureCanvasAgg`` only: no pyplot
and no global backend switch, so importing this module never changes the
plotting state of whoever else runs in the process.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from trainer.files import atomic_write, is_temp_file
from trainer.losses import SHADOW_PAIR, dloss_dh

#: Each image in a grid is upscaled (nearest neighbour) until its shorter side is at least this many pixels.
MIN_TILE_PX = 32
#: Padding between grid tiles, in output pixels.
GRID_PAD_PX = 2
#: Grey level of the padding: mid-dark, so it separates both black-background digits and white images.
GRID_PAD_VALUE = 96
#: At most this many real and this many fake points go into a snapshot, so its JSON stays small.
MAX_SNAPSHOT_POINTS = 1000
#: Margin added around the data when the extent is chosen automatically (fraction of the half-width).
EXTENT_MARGIN = 0.15
#: Critic evaluations on the grid are batched at most this large, to bound memory for big grids.
_GRID_CHUNK = 16384
#: The reference arrow length (see :func:`_common_arrow_scale`) is drawn as this fraction of the panel width.
_ARROW_FRACTION = 0.08


#: A sample file's name: its step, then the kind (``step_00000500.png``, ``step_00000500.json``).
_SAMPLE_NAME = re.compile(r"^step_(\d+)\.[a-z]+$")


# --------------------------------------------------------------------------- retention


def prune_samples(folder: Path, keep: int) -> list[Path]:
    """Keep the samples of the run's first step and of its newest ``keep`` steps in ``folder``; remove the rest.

    Without this, ``sample_every=1`` wrote about 3 GiB an hour per run, for ever. A sample step may have several
    files (a 2-D GAN writes the plot and its JSON): they are kept or removed together. The first step stays
    because it shows where the run started. Temp files of writes in progress and files not named like samples are
    left alone. The trainer calls this after each sample it writes; the server can call it on its own copy.
    Returns the removed paths.
    """
    if keep < 1:
        raise ValueError(f"keep must be at least 1, got {keep}")
    by_step: dict[int, list[Path]] = {}
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    for path in entries:
        match = _SAMPLE_NAME.match(path.name)
        if match and not is_temp_file(path):
            by_step.setdefault(int(match.group(1)), []).append(path)
    steps = sorted(by_step)
    kept = {steps[0], *steps[-keep:]} if steps else set()
    removed = []
    for step in steps:
        if step not in kept:
            for path in by_step[step]:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed.append(path)
    return removed


# --------------------------------------------------------------------------- image grids


def _to_uint8(images: Tensor) -> np.ndarray:
    """[-1, 1] floats to 0…255 bytes, (N, H, W, C); NaN becomes mid-grey rather than garbage."""
    x = images.detach().to(device="cpu", dtype=torch.float64)
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp(-1.0, 1.0)
    arr = torch.round((x + 1.0) * 127.5).to(torch.uint8).numpy()
    return np.ascontiguousarray(arr.transpose(0, 2, 3, 1))


def grid_layout(n: int, height: int, width: int, nrow: int | None = None) -> tuple[int, int, int, int, int]:
    """Columns, rows, upscale factor and output (width, height) of a grid of ``n`` images.

    Exposed so callers (and tests) can predict the PNG size without decoding it.
    ``nrow`` is the number of images per row, as in torchvision's ``make_grid``.
    """
    if n <= 0:
        raise ValueError("an image grid needs at least one image")
    cols = nrow if nrow is not None else math.ceil(math.sqrt(n))
    if cols <= 0:
        raise ValueError(f"nrow must be positive, got {nrow}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    factor = max(1, math.ceil(MIN_TILE_PX / min(height, width)))
    out_w = cols * width * factor + (cols + 1) * GRID_PAD_PX
    out_h = rows * height * factor + (rows + 1) * GRID_PAD_PX
    return cols, rows, factor, out_w, out_h


def save_image_grid(images: Tensor, path: Path, *, nrow: int | None = None) -> None:
    """Write ``images`` (N, C, H, W) in [-1, 1], C = 1 or 3, as one PNG grid.

    Images are upscaled with nearest neighbour because the datasets are tiny
    (8×8 digits) and a browser's smooth scaling would blur them into mush.
    Values map linearly: −1 → 0, 1 → 255; out-of-range values are clipped.
    """
    from PIL import Image  # local: only the worker that writes samples pays for Pillow

    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images of shape (N, 1|3, H, W), got {tuple(images.shape)}")
    n, channels, height, width = (int(s) for s in images.shape)
    if height == 0 or width == 0:
        raise ValueError(f"images must have a non-empty size, got {height}×{width}")
    cols, _rows, factor, out_w, out_h = grid_layout(n, height, width, nrow)

    tiles = _to_uint8(images)
    if factor > 1:
        tiles = tiles.repeat(factor, axis=1).repeat(factor, axis=2)
    tile_h, tile_w = height * factor, width * factor
    canvas = np.full((out_h, out_w, channels), GRID_PAD_VALUE, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        y = GRID_PAD_PX + r * (tile_h + GRID_PAD_PX)
        x = GRID_PAD_PX + c * (tile_w + GRID_PAD_PX)
        canvas[y : y + tile_h, x : x + tile_w] = tiles[i]

    img = Image.fromarray(canvas[:, :, 0], mode="L") if channels == 1 else Image.fromarray(canvas, mode="RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    atomic_write(Path(path), buf.getvalue())


# --------------------------------------------------------------------------- 2-D field snapshot


def _round_list(values: Tensor | np.ndarray, digits: int) -> Any:
    """Nested lists of floats with ``digits`` significant digits; non-finite values become ``None``.

    Significant (not fixed) digits, so a vanishing saturating arrow of 2e-9 is
    kept as a tiny non-zero number instead of collapsing to 0.0; ``None``
    because strict JSON has no NaN and a diverged run must still produce a
    file the browser can parse.
    """
    arr = values.detach().to(device="cpu", dtype=torch.float64).numpy() if isinstance(values, Tensor) else values
    arr = np.asarray(arr, dtype=np.float64)

    def one(v: float) -> float | None:
        return float(f"{v:.{digits}g}") if math.isfinite(v) else None

    if arr.ndim == 0:
        return one(float(arr))
    nested: list[Any] = [one(v) for v in arr.reshape(-1).tolist()]
    for size in reversed(arr.shape[1:]):
        nested = [nested[i : i + size] for i in range(0, len(nested), size)]
    return nested


def _auto_extent(points: Sequence[Tensor]) -> tuple[float, float, float, float]:
    """A square window around all finite points plus a margin.

    Square, so arrow directions and lengths are not distorted by unequal axis
    scales; centred on the data (not the origin) so off-centre sets such as
    moons are not squeezed into a corner.
    """
    finite = [p[torch.isfinite(p).all(dim=1)] for p in points if p.numel() > 0]
    finite = [p for p in finite if p.shape[0] > 0]
    if not finite:
        return (-1.0, 1.0, -1.0, 1.0)
    allp = torch.cat([p.to(device="cpu", dtype=torch.float64) for p in finite])
    lo, hi = allp.min(dim=0).values, allp.max(dim=0).values
    centre = (lo + hi) / 2
    half = float((hi - lo).max()) / 2
    half = max(half * (1.0 + EXTENT_MARGIN), 1e-3)
    cx, cy = float(centre[0]), float(centre[1])
    return (cx - half, cx + half, cy - half, cy + half)


@contextlib.contextmanager
def _eval_mode(critic: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Run a module critic in eval mode and restore every submodule's flag afterwards.

    In train mode a BatchNorm critic would fold the probe grid into its running
    statistics (changing training) and couple samples in the batch (so the
    summed-h gradient would no longer be per-point); dropout would add noise.
    """
    if not isinstance(critic, nn.Module):
        yield
        return
    flags = [(m, m.training) for m in critic.modules()]
    critic.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _logits(critic: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Critic output as a flat (N,) vector; (N, 1) heads such as ``nn.Linear(2, 1)`` are accepted."""
    h = critic(x)
    if h.numel() != x.shape[0]:
        raise ValueError(f"critic must return one logit per point: got shape {tuple(h.shape)} for {x.shape[0]} points")
    return h.reshape(-1)


def field_snapshot(
    critic: Callable[[Tensor], Tensor],
    real: Tensor,
    fake: Tensor,
    *,
    grid: int = 64,
    extent: float | None = None,
    digits: int = 5,
) -> dict[str, Any]:
    """What D believes on the plane and where each fake point would be pushed, as plain JSON-able data.

    ``critic`` maps (N, 2) → (N,) logits h (D before the sigmoid). ``extent``
    ``e`` gives the window [−e, e]²; ``None`` picks a square one around the
    data. ``digits`` significant digits keep the JSON small (~80–150 kB at the
    defaults).

    Keys: ``extent`` [xmin, xmax, ymin, ymax]; ``grid_x``, ``grid_y``;
    ``d_prob`` with ``d_prob[j][i] = σ(h(grid_x[i], grid_y[j]))`` (rows are y,
    as an image with origin at the bottom); ``real``, ``fake`` points (the
    first :data:`MAX_SNAPSHOT_POINTS` of each); ``fake_logit``; ``arrows``
    ``{loss: [[dx, dy], ...]}`` = −∂loss_i/∂x_i = −(∂loss/∂h)(h_i)·∇ₓh(x_i)
    for both losses of :data:`~trainer.losses.SHADOW_PAIR`; ``arrow_mean``
    (mean arrow length per loss, at full precision). Non-finite numbers
    (a diverged run) are ``None``.

    The critic's parameters never receive ``.grad``: the input gradient comes
    from ``torch.autograd.grad`` with respect to a leaf copy of the points only.
    """
    if grid < 2:
        raise ValueError(f"grid must be at least 2, got {grid}")
    for name, pts in (("real", real), ("fake", fake)):
        if pts.dim() != 2 or pts.shape[1] != 2:
            raise ValueError(f"{name} must have shape (N, 2), got {tuple(pts.shape)}")
    real = real.detach()[:MAX_SNAPSHOT_POINTS]
    fake = fake.detach()[:MAX_SNAPSHOT_POINTS]
    if extent is None:
        xmin, xmax, ymin, ymax = _auto_extent([real, fake])
    else:
        if not (math.isfinite(extent) and extent > 0):
            raise ValueError(f"extent must be a positive number, got {extent}")
        xmin, xmax, ymin, ymax = -float(extent), float(extent), -float(extent), float(extent)

    dtype = fake.dtype if fake.is_floating_point() else torch.float32
    device = fake.device
    gx = torch.linspace(xmin, xmax, grid, dtype=dtype, device=device)
    gy = torch.linspace(ymin, ymax, grid, dtype=dtype, device=device)
    yy, xx = torch.meshgrid(gy, gx, indexing="ij")  # row j ↔ gy[j], column i ↔ gx[i]
    plane = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)

    with _eval_mode(critic):
        with torch.no_grad():
            h_grid = torch.cat([_logits(critic, chunk) for chunk in plane.split(_GRID_CHUNK)])
        d_prob = torch.sigmoid(h_grid).reshape(grid, grid)

        with torch.enable_grad():
            x = fake.to(dtype).clone().requires_grad_(True)
            h = _logits(critic, x)
            if h.requires_grad:
                (dh_dx,) = torch.autograd.grad(h.sum(), x)
            else:  # a constant critic has no input gradient; report zero arrows rather than fail
                dh_dx = torch.zeros_like(x)
        h = h.detach()

    arrows: dict[str, Any] = {}
    arrow_mean: dict[str, float | None] = {}
    for loss_name in SHADOW_PAIR:
        step = -dloss_dh(loss_name, h).unsqueeze(1) * dh_dx
        arrows[loss_name] = _round_list(step, digits)
        lengths = step.norm(dim=1)
        lengths = lengths[torch.isfinite(lengths)]
        arrow_mean[loss_name] = float(lengths.mean()) if lengths.numel() else None

    return {
        "extent": _round_list(torch.tensor([xmin, xmax, ymin, ymax]), digits),
        "grid_x": _round_list(gx, digits),
        "grid_y": _round_list(gy, digits),
        "d_prob": _round_list(d_prob, digits),
        "real": _round_list(real, digits),
        "fake": _round_list(fake, digits),
        "fake_logit": _round_list(h, digits),
        "arrows": arrows,
        "arrow_mean": arrow_mean,
    }


# --------------------------------------------------------------------------- field plot


def _points(rows: Any) -> np.ndarray:
    """(N, 2) float array from JSON-ish rows; ``None`` becomes NaN so it can be masked out."""
    arr = np.array([[np.nan if v is None else v for v in row] for row in rows or []], dtype=np.float64)
    return arr.reshape(-1, 2)


def _common_arrow_scale(arrow_sets: Sequence[np.ndarray], width: float) -> float:
    """One quiver ``scale`` (gradient units per data unit) shared by both panels.

    Taken from whichever loss has the larger arrows (95th percentile, so one
    outlier does not shrink the rest), mapped to a fixed fraction of the panel
    width. Sharing it is the point of the picture: normalising each panel on
    its own would make vanished saturating gradients look as healthy as the
    non-saturating ones.
    """
    refs = []
    for arr in arrow_sets:
        lengths = np.linalg.norm(arr, axis=1)
        lengths = lengths[np.isfinite(lengths)]
        if lengths.size:
            refs.append(float(np.percentile(lengths, 95)))
    ref = max(refs, default=0.0)
    if not (ref > 0 and math.isfinite(ref)):
        return 1.0  # every arrow is zero: any scale draws nothing
    return ref / (_ARROW_FRACTION * width)


def save_field_plot(snapshot: dict[str, Any], png_path: Path, json_path: Path, *, title: str = "") -> None:
    """Render a :func:`field_snapshot` as a two-panel PNG and store the snapshot as JSON beside it.

    The PNG is what a sample gallery shows; the JSON lets the browser redraw
    the same field interactively. Both panels use the same arrow scale so a
    vanishing saturating gradient shows up as missing arrows.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # Serialise first: a snapshot that is not strict JSON fails before any work or either file is touched.
    payload = json.dumps(snapshot, allow_nan=False, separators=(",", ":")).encode("utf-8")
    xmin, xmax, ymin, ymax = (float(v) for v in snapshot["extent"])
    d_prob = np.array([[np.nan if v is None else v for v in row] for row in snapshot["d_prob"]], dtype=np.float64)
    real = _points(snapshot.get("real"))
    fake = _points(snapshot.get("fake"))
    arrow_sets = {name: _points(snapshot["arrows"][name]) for name in SHADOW_PAIR}
    scale = _common_arrow_scale(list(arrow_sets.values()), xmax - xmin)

    fig = Figure(figsize=(11, 5), dpi=100)
    FigureCanvasAgg(fig)
    # Fixed margins rather than constrained layout, which draws the figure twice (half the cost of a plot).
    fig.subplots_adjust(left=0.05, right=0.88, bottom=0.08, top=0.86, wspace=0.12)
    axes = fig.subplots(1, 2, sharex=True, sharey=True)
    image = None
    for ax, name in zip(axes, SHADOW_PAIR, strict=True):
        image = ax.imshow(
            d_prob,
            origin="lower",
            extent=(xmin, xmax, ymin, ymax),
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            interpolation="bilinear",
            aspect="equal",
        )
        if real.size:
            ax.scatter(real[:, 0], real[:, 1], s=6, c="white", edgecolors="none", alpha=0.8, label="real")
        if fake.size:
            ax.scatter(fake[:, 0], fake[:, 1], s=8, c="#ff3b30", edgecolors="none", label="fake")
        arrows = arrow_sets[name]
        ok = np.isfinite(arrows).all(axis=1) & np.isfinite(fake).all(axis=1) if len(arrows) == len(fake) else None
        if ok is not None and ok.any():
            ax.quiver(
                fake[ok, 0],
                fake[ok, 1],
                arrows[ok, 0],
                arrows[ok, 1],
                angles="xy",
                scale_units="xy",
                scale=scale,
                color="#ff3b30",
                width=0.003,
                minlength=0.0,  # a vanished gradient must vanish, not become a dot
            )
        lengths = np.linalg.norm(arrows, axis=1) if arrows.size else np.zeros(0)
        lengths = lengths[np.isfinite(lengths)]
        mean_len = f"{lengths.mean():.3g}" if lengths.size else "n/a"
        ax.set_title(f"{name.replace('_', '-')}   mean |step| = {mean_len}")
        ax.set_xlim(xmin, xmax)
        ax.set_ylim(ymin, ymax)
    axes[0].legend(loc="upper right", fontsize=8, framealpha=0.6, markerscale=2)
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.9, 0.12, 0.015, 0.7)), label="D(x) = σ(h)")
    if title:
        fig.suptitle(title)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write(Path(png_path), buf.getvalue())
    atomic_write(Path(json_path), payload)
