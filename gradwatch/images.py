"""Images a script logs, made into the same PNG sample grids the built-in runs write."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from trainer.samples import save_image_grid

MAX_IMAGES = 256
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class Image:
    """An image or a batch of images to log, as ``wandb.Image`` wraps one: ``run.log({"fake": gradwatch.Image(x)})``.

    ``data``: a tensor (N, C, H, W), (C, H, W) or (H, W); a NumPy array, (H, W, C) or (H, W) as images are
    usually stored; or a PIL image. ``caption`` is accepted for compatibility and kept in the frame.
    """

    def __init__(self, data: Any, caption: str | None = None) -> None:
        self.data = data
        self.caption = caption

    def tensor(self) -> Tensor:
        data = self.data
        if hasattr(data, "convert") and hasattr(data, "size") and not isinstance(data, (Tensor, np.ndarray)):
            data = np.asarray(data.convert("RGB"))  # a PIL image
        if isinstance(data, np.ndarray):
            array = data
            if array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3, 4):
                array = np.moveaxis(array, -1, 0)  # H, W, C → C, H, W
            return torch.as_tensor(np.ascontiguousarray(array))
        if isinstance(data, Tensor):
            return data
        raise TypeError(f"gradwatch.Image: cannot make an image of a {type(data).__name__}")


def as_batch(images: Any) -> Tensor:
    """(N, C, H, W) float tensor on the CPU, C = 1 or 3, values mapped to [-1, 1] (see :func:`to_unit_range`)."""
    x = images.tensor() if isinstance(images, Image) else images
    if isinstance(x, np.ndarray):
        x = Image(x).tensor()
    if not isinstance(x, Tensor):
        raise TypeError(f"log_images: expected a tensor, an array or gradwatch.Image, got {type(images).__name__}")
    x = x.detach()
    if x.dim() == 2:
        x = x[None, None]
    elif x.dim() == 3:
        x = x[None]
    if x.dim() != 4:
        raise ValueError(f"log_images: expected images of shape (N, C, H, W), (C, H, W) or (H, W), "
                         f"got {tuple(x.shape)}")
    if x.shape[1] == 4:
        x = x[:, :3]  # drop alpha
    if x.shape[1] not in (1, 3):
        raise ValueError(f"log_images: images need 1 or 3 channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    return to_unit_range(x[:MAX_IMAGES].float().cpu())


def to_unit_range(x: Tensor) -> Tensor:
    """Map a batch to [-1, 1] by what its values look like: a generator's tanh output ([-1, 1]) as is,
    [0, 1] and 0-255 pixels scaled, anything else min-max normalised (as ``torchvision``'s ``normalize=True``)."""
    finite = x[torch.isfinite(x)]
    if finite.numel() == 0:
        return torch.zeros_like(x)
    lo, hi = float(finite.min()), float(finite.max())
    if lo >= 0.0 and hi <= 1.0:
        return x * 2.0 - 1.0
    if lo >= -1.0 and hi <= 1.0:
        return x
    if lo >= 0.0 and hi <= 255.0:
        return x / 127.5 - 1.0
    span = hi - lo if hi > lo else 1.0
    return (x - lo) / span * 2.0 - 1.0


def file_name(step: int, label: str, suffix: str) -> str:
    """``step_00000500.png`` for the default label, ``step_00000500_recon.png`` for another one."""
    base = f"step_{step:08d}"
    if label in ("", "samples"):
        return base + suffix
    return f"{base}_{_UNSAFE.sub('-', label).strip('-.')[:60] or 'image'}{suffix}"


def write_grid(images: Any, path: Path) -> None:
    save_image_grid(as_batch(images), path)
