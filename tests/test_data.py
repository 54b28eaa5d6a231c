"""Datasets: seeded streams, the PacGAN geometries, and reading a user's local files."""

from __future__ import annotations

import gzip
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import DataError, grid25_modes, load_dataset, ring8_modes

CPU = torch.device("cpu")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_ring_and_grid_geometry_follow_pacgan() -> None:
    ring = ring8_modes()
    assert ring.centres.shape == (8, 2) and ring.std == 0.01
    assert torch.allclose(ring.centres.norm(dim=1), torch.ones(8))
    grid = grid25_modes()
    assert grid.centres.shape == (25, 2) and grid.std == 0.05
    assert sorted(set(grid.centres[:, 0].tolist())) == [-4.0, -2.0, 0.0, 2.0, 4.0]
    scaled = ring8_modes(2.0)
    assert scaled.std == 0.02 and torch.allclose(scaled.centres, 2 * ring.centres)


@pytest.mark.parametrize("name", ["ring8", "grid25", "spiral", "moons"])
def test_two_d_streams_are_seeded_and_shaped(name: str) -> None:
    data = load_dataset(DataConfig(name=name), CPU)
    a, b, c = data.sample(500, gen(0)), data.sample(500, gen(0)), data.sample(500, gen(1))
    assert a.shape == (500, 2) and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ring_samples_sit_on_their_modes() -> None:
    data = load_dataset(DataConfig(name="ring8", scale=2.0), CPU)
    x = data.sample(4000, gen(0))
    assert data.modes is not None
    nearest = torch.cdist(x, data.modes.centres).min(dim=1).values
    assert (nearest < 4 * data.modes.std).float().mean() > 0.999
    assert torch.cdist(x, data.modes.centres).argmin(dim=1).unique().numel() == 8


def test_digits_are_real_handwriting_in_tanh_range() -> None:
    data = load_dataset(DataConfig(name="digits"), CPU)
    assert data.points is not None and data.labels is not None
    assert data.points.shape == (1797, 1, 8, 8) and data.shape == (1, 8, 8)
    assert data.points.min() == -1.0 and data.points.max() == 1.0
    assert sorted(data.labels.unique().tolist()) == list(range(10))
    assert torch.equal(data.sample(64, gen(3)), data.sample(64, gen(3)))


def test_mnist_idx_folder_is_read_and_resized(tmp_path: Path) -> None:
    images = np.zeros((5, 28, 28), dtype=np.uint8)
    images[:, 10:18, 10:18] = 255
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(5))
    data = load_dataset(DataConfig(name="mnist_idx", path=str(tmp_path)), CPU)
    assert data.points is not None and data.labels is not None
    assert data.shape == (1, 28, 28) and data.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.points[0, 0, 0, 0] == -1.0 and data.points[0, 0, 14, 14] == 1.0
    small = load_dataset(DataConfig(name="mnist_idx", path=str(tmp_path), image_size=32), CPU)
    assert small.shape == (1, 32, 32)


def test_mnist_idx_errors_name_the_path_field(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path: no file matching"):
        load_dataset(DataConfig(name="mnist_idx", path=str(tmp_path)), CPU)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"not an idx file at all")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x07")
    with pytest.raises(DataError, match=r"data\.path: .* is not an IDX file"):
        load_dataset(DataConfig(name="mnist_idx", path=str(tmp_path)), CPU)
    with pytest.raises(DataError, match=r"data\.path: .* is not a folder"):
        load_dataset(DataConfig(name="mnist_idx", path=str(tmp_path / "missing")), CPU)


def test_image_folder_uses_subfolders_as_classes(tmp_path: Path) -> None:
    for label, shade in (("cats", 0), ("dogs", 255)):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 40), (shade, shade, shade)).save(tmp_path / label / f"{i}.png")
    grey = load_dataset(DataConfig(name="image_folder", path=str(tmp_path)), CPU)
    assert grey.points is not None and grey.labels is not None
    assert grey.shape == (1, 32, 32)
    assert grey.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert math.isclose(grey.points[0].mean().item(), -1.0) and math.isclose(grey.points[-1].mean().item(), 1.0)
    rgb = load_dataset(DataConfig(name="image_folder", path=str(tmp_path), channels=3, image_size=28), CPU)
    assert rgb.shape == (3, 28, 28)


def test_empty_image_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.path: no images"):
        load_dataset(DataConfig(name="image_folder", path=str(tmp_path)), CPU)


def _big_compressible_png(path: Path, rng: np.random.Generator, side: int = 4000) -> None:
    """A ``side``² greyscale PNG of 8×8 flat blocks: megapixels on decode, kilobytes on disk (a decompression lure)."""
    blocks = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    Image.fromarray(np.kron(blocks, np.ones((side // 8, side // 8), dtype=np.uint8))).save(path, compress_level=9)


_PEAK_GROWTH_SCRIPT = """
import json, resource, sys
import torch
from trainer.config import DataConfig
from trainer.data import load_dataset
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
data = load_dataset(DataConfig(name="image_folder", path=sys.argv[1], image_size=32), torch.device("cpu"))
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "shape": list(data.points.shape)}))
"""


def test_image_folder_of_huge_images_loads_without_decoding_them_all_at_full_size(tmp_path: Path) -> None:
    """Eight 4000×4000 PNGs (a few kB each) used to cost 1 GiB of RSS: every image decoded to full-size floats
    before any shrinking. Loaded through the run's own path (``load_dataset``) in a fresh process, the peak now
    grows by one full-size decode (16 MB for greyscale) plus the small result, far under the bound."""
    import json
    import subprocess
    import sys

    rng = np.random.default_rng(12)
    for i in range(8):
        _big_compressible_png(tmp_path / f"{i}.png", rng)
    assert sum(p.stat().st_size for p in tmp_path.iterdir()) < 2_000_000  # tiny on disk, as in the issue
    done = subprocess.run([sys.executable, "-c", _PEAK_GROWTH_SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120, check=True, cwd=Path(__file__).resolve().parents[1],
                          env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["shape"] == [8, 1, 32, 32]
    growth_mib = report["growth_kib"] / 1024  # Linux reports ru_maxrss in KiB
    assert growth_mib < 150, f"loading 8 images grew the peak RSS by {growth_mib:.0f} MiB"


def test_image_folder_shrinks_each_image_faithfully(tmp_path: Path) -> None:
    """The early shrink keeps the picture: a 4000×2000 image, dark left half and light right half, is the same
    two halves at 32×32 (stretched to a square, as before), and a JPEG decoded at reduced scale agrees."""
    arr = np.zeros((2000, 4000, 3), dtype=np.uint8)
    arr[:, 2000:] = 255
    Image.fromarray(arr).save(tmp_path / "a.png")
    Image.fromarray(arr).save(tmp_path / "b.jpg", quality=95)
    data = load_dataset(DataConfig(name="image_folder", path=str(tmp_path), channels=3), CPU)
    assert data.points is not None and data.points.shape == (2, 3, 32, 32)
    for img in data.points:
        assert img[:, :, :14].max().item() < -0.95 and img[:, :, 18:].min().item() > 0.95


def test_image_over_the_pixel_bound_is_refused_by_name_before_decoding(tmp_path: Path) -> None:
    """A small file can declare a huge image: the header is checked against the bound before any decoding, and
    the error names the file. PIL's process-wide limit is left as it was."""
    import zlib

    import trainer.data as data_module

    Image.new("L", (40, 40)).save(tmp_path / "fine.png")
    side = 10_000  # 100 Mpixel, over PIL's 89.5 Mpixel bomb threshold; one filter byte per row, all zeros
    raw = zlib.compress(bytes((side + 1) * side), 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
           + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bomb.png").write_bytes(png)
    limit_before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError, match=r"data\.path: sub/bomb\.png is 10000×10000 = 100,000,000 pixels, over"):
        load_dataset(DataConfig(name="image_folder", path=str(tmp_path)), CPU)
    assert Image.MAX_IMAGE_PIXELS == limit_before == data_module.MAX_IMAGE_PIXELS


def test_unreadable_image_is_a_clear_error_naming_it(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DataError, match=r"data\.path: cannot read image broken\.png"):
        load_dataset(DataConfig(name="image_folder", path=str(tmp_path)), CPU)
