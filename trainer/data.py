"""Training data: seeded 2-D toy distributions and small image sets.

Every dataset draws batches from a caller-owned ``torch.Generator`` and keeps
no random state of its own, so the generator's state *is* the data stream:
same seed ⇒ same batches, and a checkpoint that saves the generator state
resumes the exact same stream.

Images are scaled to [-1, 1] (the range of a tanh generator). 2-D mixtures
carry their mode centres and spread for the PacGAN/VEEGAN evaluation.
"""

from __future__ import annotations

import gzip
import math
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from trainer.config import DataConfig

_IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"})
#: Upper bound on images read from a user folder, so a huge folder cannot exhaust memory.
MAX_FOLDER_IMAGES = 200_000
#: Largest image read from a user folder, in pixels: PIL's own decompression-bomb threshold, checked per file
#: before decoding (a full-size decode of this many RGB pixels is about 270 MB, held for one image at a time).
MAX_IMAGE_PIXELS = 89_478_485


class DataError(ValueError):
    """The data named by a config cannot be read; the message names the field."""


@dataclass(frozen=True)
class Modes:
    """Mode centres and per-mode standard deviation of a Gaussian mixture."""

    centres: Tensor  # (K, 2), on the CPU
    std: float


@dataclass
class Dataset:
    """A source of training batches.

    ``points`` is set for finite datasets (images), ``None`` for 2-D mixtures
    that are sampled afresh each batch.
    """

    name: str
    shape: tuple[int, ...]
    device: torch.device
    points: Tensor | None = None
    labels: Tensor | None = None
    modes: Modes | None = None
    scale: float = 1.0
    # Mode centres copied to the device once: a host→device copy per batch
    # would make every training step wait for the GPU.
    _centres: Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.modes is not None:
            self._centres = self.modes.centres.to(self.device)

    @property
    def is_2d(self) -> bool:
        return self.shape == (2,)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """A batch of ``n`` samples on ``self.device``, drawn with ``generator``."""
        if self.points is not None:
            idx = torch.randint(0, self.points.shape[0], (n,), device=self.device, generator=generator)
            return self.points[idx]
        if self.modes is not None and self._centres is not None:
            pick = torch.randint(0, self._centres.shape[0], (n,), device=self.device, generator=generator)
            noise = torch.randn(n, 2, device=self.device, generator=generator)
            return self._centres[pick] + self.modes.std * noise
        return _sample_2d(self.name, n, self.scale, self.device, generator)


def ring8_modes(scale: float = 1.0) -> Modes:
    """PacGAN's ring: 8 modes on a circle of radius 1, std 0.01."""
    angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    centres = torch.stack([angles.cos(), angles.sin()], dim=1) * scale
    return Modes(centres.float(), 0.01 * scale)


def grid25_modes(scale: float = 1.0) -> Modes:
    """PacGAN's grid: 5×5 modes at spacing 2 (−4 … 4), std 0.05."""
    axis = torch.arange(-4.0, 5.0, 2.0, dtype=torch.float64)
    gx, gy = torch.meshgrid(axis, axis, indexing="ij")
    centres = torch.stack([gx.flatten(), gy.flatten()], dim=1) * scale
    return Modes(centres.float(), 0.05 * scale)


def _sample_2d(name: str, n: int, scale: float, device: torch.device, gen: torch.Generator) -> Tensor:
    if name == "spiral":
        # One arm of an Archimedean spiral, radius growing with the angle.
        t = torch.rand(n, device=device, generator=gen) * (3 * math.pi) + 0.5 * math.pi
        r = t / (3.5 * math.pi)
        noise = torch.randn(n, 2, device=device, generator=gen) * 0.02
        return (torch.stack([r * t.cos(), r * t.sin()], dim=1) + noise) * scale
    if name == "moons":
        # scikit-learn's two interleaving half circles, centred on the origin.
        upper = torch.rand(n, device=device, generator=gen) < 0.5
        t = torch.rand(n, device=device, generator=gen) * math.pi
        x = torch.where(upper, t.cos(), 1.0 - t.cos()) - 0.5
        y = torch.where(upper, t.sin(), 0.5 - t.sin()) - 0.25
        noise = torch.randn(n, 2, device=device, generator=gen) * 0.05
        return (torch.stack([x, y], dim=1) + noise) * scale
    raise DataError(f"data.name: unknown 2-D dataset {name!r}")


def load_dataset(cfg: DataConfig, device: torch.device) -> Dataset:
    """Build the dataset a config names, on ``device``."""
    if cfg.is_2d:
        modes = {"ring8": ring8_modes, "grid25": grid25_modes}.get(cfg.name)
        return Dataset(cfg.name, (2,), device, modes=modes(cfg.scale) if modes else None, scale=cfg.scale)
    if cfg.name == "digits":
        images, labels = _load_digits()
    elif cfg.name == "mnist_idx":
        images, labels = _load_mnist_idx(Path(cfg.path or ""))
    else:
        images, labels = _load_image_folder(Path(cfg.path or ""), cfg.resolved_channels, cfg.resolved_image_size)
    size = cfg.resolved_image_size
    if images.shape[-1] != size:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
    points = (images.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
    return Dataset(cfg.name, tuple(points.shape[1:]), device, points=points.to(device), labels=labels.to(device))


def _load_digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 8×8 handwritten digits (grey levels 0–16), shipped in the wheel."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) / 16.0).unsqueeze(1)
    return images, torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        header = fh.read(4)
        if len(header) != 4 or header[0] != 0 or header[1] != 0:
            raise DataError(f"data.path: {path.name} is not an IDX file")
        dtype_code, ndim = header[2], header[3]
        if dtype_code != 0x08:
            raise DataError(f"data.path: {path.name} holds type 0x{dtype_code:02x}; only unsigned bytes are read")
        dims = struct.unpack(f">{ndim}I", fh.read(4 * ndim))
        count = int(np.prod(dims))
        data = np.frombuffer(fh.read(count), dtype=np.uint8)
    if data.size != count:
        raise DataError(f"data.path: {path.name} is truncated")
    return data.reshape(dims)


def _load_mnist_idx(folder: Path) -> tuple[Tensor, Tensor]:
    """MNIST-format IDX files (``train-images-idx3-ubyte`` and labels, optionally gzipped)."""
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    images_file = _find_one(folder, "*images*idx3*")
    labels_file = _find_one(folder, "*labels*idx1*")
    images = _read_idx(images_file)
    if images.ndim != 3:
        raise DataError(f"data.path: {images_file.name} is not a stack of 2-D images")
    labels = _read_idx(labels_file)
    if labels.shape[0] != images.shape[0]:
        raise DataError("data.path: image and label files disagree on the number of items")
    tensor = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return tensor, torch.from_numpy(labels.astype(np.int64))


def _find_one(folder: Path, pattern: str) -> Path:
    # Prefer the training split when both train and t10k files are present.
    found = sorted(folder.glob(pattern), key=lambda p: ("t10k" in p.name, p.name))
    if not found:
        raise DataError(f"data.path: no file matching {pattern!r} in {folder}")
    return found[0]


def _load_image_folder(folder: Path, channels: int, size: int) -> tuple[Tensor, Tensor]:
    """Every image under ``folder`` at ``size``×``size``; the first-level subfolder names become class labels.

    Images are decoded one at a time and shrunk at once, into one preallocated byte array: memory is the small
    result plus a single full-size decode, whatever the files hold. Decoding them all at full size first made
    eight 4000×4000 PNGs (186 kB on disk) cost 1 GiB.
    """
    if not folder.is_dir():
        raise DataError(f"data.path: {folder} is not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DataError(f"data.path: no images in {folder}")
    files = files[:MAX_FOLDER_IMAGES]
    classes = sorted({p.relative_to(folder).parts[0] for p in files if len(p.relative_to(folder).parts) > 1})
    index = {name: i for i, name in enumerate(classes)}
    pixels = np.empty((len(files), size, size, channels), dtype=np.uint8)
    labels = []
    for i, path in enumerate(files):
        arr = _read_small_image(path, folder, "L" if channels == 1 else "RGB", size)
        pixels[i] = arr if arr.ndim == 3 else arr[..., None]
        parts = path.relative_to(folder).parts
        labels.append(index[parts[0]] if len(parts) > 1 else 0)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0).contiguous()
    return images, torch.tensor(labels, dtype=torch.int64)


def _read_small_image(path: Path, folder: Path, mode: str, size: int) -> np.ndarray:
    """One image as ``size``×``size`` bytes in ``mode``, never holding more than one full-size decode.

    The pixel count is checked from the header, before anything is decoded, against this module's own bound
    (not PIL's global ``Image.MAX_IMAGE_PIXELS``, which would change it for everything else in the process): a
    few kilobytes of PNG can declare a 50,000×50,000 image. JPEGs are decoded at a reduced scale
    (``Image.draft``); other formats are decoded once, then reduced by whole factors and resized.
    """
    from PIL import Image, UnidentifiedImageError

    name = path.relative_to(folder)
    try:
        with warnings.catch_warnings():
            # The bound below is this module's own check; PIL's warning for the same thing would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            width, height = opened.size
            if width * height > MAX_IMAGE_PIXELS:
                raise DataError(f"data.path: {name} is {width}×{height} = {width * height:,} pixels, over the "
                                f"{MAX_IMAGE_PIXELS:,}-pixel limit for one image")
            opened.draft(mode, (size, size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale, still at least size²
            img = opened.convert(mode)
        factor = min(img.size) // (2 * size)
        if factor > 1:
            img = img.reduce(factor)  # box average by a whole factor, cheap, keeping at least 2× the target
        small = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    except DataError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(f"data.path: cannot read image {name}: {exc}") from exc
    return np.asarray(small, dtype=np.uint8)
