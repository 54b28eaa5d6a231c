"""Sample-quality evaluation: the PacGAN/VEEGAN protocol on 2-D mixtures, and
classifier-feature metrics (classes, FD, precision/recall/density/coverage) on
image data.

The 2-D protocol is a closed-form computation on mode centres and needs no
model. Image metrics need an embedding; ImageNet-trained Inception features
(FID) mean nothing on 8×8 digits and would need a download, so a small conv
classifier is trained on the run's own dataset once and cached on disk, keyed
by a hash of the data. See docs/evaluation.md for the exact definitions.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import linalg
from torch import Tensor, nn

from trainer.data import Modes
from trainer.files import atomic_write

logger = logging.getLogger(__name__)

#: Generator samples drawn per 2-D evaluation (PacGAN/VEEGAN protocol).
MODE_EVAL_SAMPLES = 2500
#: A sample is high quality when it lies closer than this many mode stds to its nearest centre.
HQ_STDS = 3.0
#: A predicted class counts towards ``eval/classes`` only with at least this share of the samples...
CLASS_MIN_SHARE = 0.01
#: ...and at least this many samples, so that one stray prediction is not a "class".
CLASS_MIN_COUNT = 2
#: Nearest-neighbour k for precision/recall/density/coverage (Kynkäänniemi 2019, Naeem 2020).
PRDC_K = 5
#: Bump when the classifier's architecture or training recipe changes: old cache files are then ignored.
CLASSIFIER_VERSION = "feature-classifier-v2"
#: Width of the penultimate layer that serves as the embedding.
FEATURE_DIM = 64

# Training recipe. Small and fixed so that the classifier trains in seconds on a CPU for
# digits and in well under a minute for MNIST-sized sets (which hit the step cap).
_BATCH = 128
_LR = 8e-3
_WARMUP_STEPS = 20
_MIN_STEPS = 400
_MAX_STEPS = 1000
_EPOCHS = 15
_HOLDOUT_SHARE = 0.1
_EMBED_CHUNK = 1024
# pytorch-fid's regulariser for the matrix square root of near-singular covariance products.
_FD_EPS = 1e-6


# --------------------------------------------------------------------------- 2-D mixtures


def mode_metrics(samples: Tensor, modes: Modes) -> dict[str, float]:
    """PacGAN/VEEGAN mode coverage of 2-D generator samples.

    Returns ``eval/modes`` (modes with at least one high-quality sample nearest
    to them), ``eval/hq_frac`` (share of samples closer than 3 stds to their
    nearest centre) and ``eval/rev_kl`` (log K − entropy of the high-quality
    samples' mode histogram, i.e. KL(generated histogram ‖ uniform)).

    With no high-quality sample the histogram is empty and the KL undefined;
    we then report log K, the largest value the KL can take (all mass on one
    mode), so that the chart shows the worst case instead of a gap exactly when
    the generator is at its worst. ``eval/modes`` = 0 and ``eval/hq_frac`` = 0
    tell that case apart from a one-mode collapse. Non-finite samples (a
    diverged generator) are simply never high quality.
    """
    if samples.ndim != 2 or samples.shape[1] != 2:
        raise ValueError(f"samples must have shape (N, 2), got {tuple(samples.shape)}")
    if samples.shape[0] == 0:
        raise ValueError("samples is empty")
    x = samples.detach()
    if not x.is_floating_point() or x.dtype in (torch.float16, torch.bfloat16):
        # Half precision cannot resolve 0.03 around a centre at radius 4·scale.
        x = x.float()
    centres = modes.centres.to(device=x.device, dtype=x.dtype)
    k = centres.shape[0]
    # The mm-based cdist path loses ~1e-3 near zero distance to cancellation; the
    # direct path is exact enough and cheap for K ≤ 25 centres in two dimensions.
    dist = torch.cdist(x, centres, compute_mode="donot_use_mm_for_euclid_dist")
    nearest_dist, nearest = dist.min(dim=1)
    hq = nearest_dist < HQ_STDS * modes.std  # NaN compares False: diverged samples are not HQ
    counts = torch.bincount(nearest[hq], minlength=k).cpu().to(torch.float64)
    n_hq = float(counts.sum().item())
    if n_hq > 0:
        p = counts[counts > 0] / n_hq
        entropy = float(-(p * p.log()).sum().item())
        # Rounding can push log K − H a hair below zero for a perfectly uniform histogram.
        rev_kl = max(0.0, math.log(k) - entropy)
    else:
        rev_kl = math.log(k)
    return {
        "eval/modes": float((counts > 0).sum().item()),
        "eval/hq_frac": n_hq / samples.shape[0],
        "eval/rev_kl": rev_kl,
    }


# --------------------------------------------------------------------------- classifier


class FeatureClassifier(nn.Module):
    """A small convnet whose penultimate layer is the embedding for image metrics.

    ``forward`` gives ``num_classes + 1`` logits: the dataset's classes, then a
    "junk" class trained on structureless images (see ``_junk``), so that the
    embedding separates noise from data, which precision and FD rely on.
    No batch norm: the network behaves identically in train and eval mode, and
    a batch of collapsed fakes cannot shift its own normalisation.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        #: Accuracy on the held-out share of the training data, when there was one.
        self.heldout_accuracy: float | None = None
        # 28- and 32-pixel images start with a strided convolution: 4× less compute in the
        # widest layers, which keeps first-time training on MNIST within a CPU minute.
        stem_stride = 2 if image_size >= 16 else 1
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=stem_stride, padding=1),
            nn.SiLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1),
            nn.SiLU(),
            # Fixed 2×2 grid whatever the input size.
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 4, feature_dim),
            nn.SiLU(),
        )
        # One extra output, index ``num_classes``, for "not like the data" (see _junk).
        self.head = nn.Linear(feature_dim, num_classes + 1)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (N, feature_dim): what the class decision is linear in."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits over the dataset's classes plus the junk class (last index)."""
        return self.head(self.body(x))


def _cache_key(points: Tensor, labels: Tensor, seed: int) -> str:
    h = hashlib.sha256()
    h.update(CLASSIFIER_VERSION.encode())
    h.update(f"|{tuple(points.shape)}|{seed}|".encode())
    # Hash the numpy buffer directly: no second copy of a 60k-image dataset.
    h.update(np.ascontiguousarray(points.detach().to("cpu", torch.float32).numpy()).data)
    h.update(np.ascontiguousarray(labels.detach().to("cpu", torch.int64).numpy()).data)
    return h.hexdigest()[:32]


def _check_inputs(points: Tensor, labels: Tensor) -> None:
    if points.ndim != 4:
        raise ValueError(f"points must be images (N, C, H, W), got shape {tuple(points.shape)}")
    if points.shape[2] != points.shape[3]:
        raise ValueError(f"images must be square, got {points.shape[2]}×{points.shape[3]}")
    if labels.ndim != 1 or labels.shape[0] != points.shape[0]:
        raise ValueError("labels must be a 1-D tensor with one label per image")
    if points.shape[0] == 0:
        raise ValueError("points is empty")
    if labels.dtype.is_floating_point or int(labels.min().item()) < 0:
        raise ValueError("labels must be non-negative integers")


def load_or_train_classifier(points: Tensor, labels: Tensor, cache_dir: Path, *, seed: int = 0) -> FeatureClassifier:
    """The feature classifier for this exact dataset, trained once and cached.

    The cache file name is a hash of the data, labels, seed and recipe version,
    so a changed dataset can never pick up a stale classifier. A cache file that
    cannot be read (truncated, foreign, wrong version) is retrained over, and a
    cache that cannot be written costs only the retraining next time. The
    returned module is on ``points.device``, in eval mode, with frozen weights.

    A single-class dataset (an image folder without subfolders) still trains:
    data against junk, which gives features for FD and PRDC; ``image_metrics``
    then omits ``eval/classes``, which would always read 1.
    """
    _check_inputs(points, labels)
    cache_dir = Path(cache_dir)
    key = _cache_key(points, labels, seed)
    path = cache_dir / f"classifier-{key}.pt"
    num_classes = max(int(labels.max().item()) + 1, 1)
    shape = (int(points.shape[1]), int(points.shape[2]), num_classes)

    model = _load_cached(path, key, shape)
    if model is None:
        model = _train(points, labels, shape, seed)
        _save_atomic(path, model, key, seed)
    model.to(points.device).eval().requires_grad_(False)
    return model


def _load_cached(path: Path, key: str, shape: tuple[int, int, int]) -> FeatureClassifier | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        if meta["version"] != CLASSIFIER_VERSION or meta["key"] != key:
            raise ValueError("cache metadata does not match this dataset")
        model = FeatureClassifier(shape[0], shape[1], shape[2], int(meta["feature_dim"]))
        model.load_state_dict(blob["state_dict"])
        acc = meta.get("heldout_accuracy")
        model.heldout_accuracy = float(acc) if acc is not None else None
        return model
    except Exception as exc:  # any unreadable cache (truncated, foreign, stale) is simply rebuilt
        logger.warning("ignoring unreadable classifier cache %s (%s); retraining", path, exc)
        return None


def _save_atomic(path: Path, model: FeatureClassifier, key: str, seed: int) -> None:
    # Plain tensors and primitives only, so weights_only=True can load it back.
    meta: dict[str, Any] = {
        "version": CLASSIFIER_VERSION,
        "key": key,
        "seed": seed,
        "in_channels": model.in_channels,
        "image_size": model.image_size,
        "num_classes": model.num_classes,
        "feature_dim": model.feature_dim,
        "heldout_accuracy": model.heldout_accuracy,
    }
    state = {name: t.detach().cpu().clone() for name, t in model.state_dict().items()}
    try:
        # Concurrent workers never see a half-written file, and whichever rename lands last wins with an
        # equally valid classifier.
        atomic_write(path, lambda fh: torch.save({"state_dict": state, "meta": meta}, fh))
    except OSError as exc:
        # The classifier is trained and usable; failing to cache it must not fail the run.
        logger.warning("could not write classifier cache %s: %s", path, exc)


def _train(points: Tensor, labels: Tensor, shape: tuple[int, int, int], seed: int) -> FeatureClassifier:
    device = points.device
    # Weight init draws from the global CPU generator; fork it so that the caller's
    # random stream (the run's reproducible noise) is left exactly as it was. CUDA
    # generators are never touched: the model is built on the CPU and moved.
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        model = FeatureClassifier(*shape)
    gen = torch.Generator().manual_seed(seed)
    n = points.shape[0]
    perm = torch.randperm(n, generator=gen)
    n_hold = int(n * _HOLDOUT_SHARE) if n >= 50 else 0
    hold_idx, train_idx = perm[:n_hold].to(device), perm[n_hold:].to(device)
    x_train, y_train = points[train_idx].detach(), labels[train_idx].to(torch.int64)

    model.to(device).train()
    steps = min(_MAX_STEPS, max(_MIN_STEPS, math.ceil(_EPOCHS * x_train.shape[0] / _BATCH)))
    opt = torch.optim.Adam(model.parameters(), lr=_LR)
    # A high rate with a short warm-up and cosine decay to zero converges reliably in a small,
    # fixed step budget (digits, 5 seeds, before the junk class: 96.4–98.3 % held out, against
    # 94.4–96.7 % at 3e-3 without warm-up).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / _WARMUP_STEPS) * 0.5 * (1.0 + math.cos(math.pi * t / steps))
    )
    loss_fn = nn.CrossEntropyLoss()
    order = torch.empty(0, dtype=torch.int64)
    pos = 0
    with torch.enable_grad():
        for _ in range(steps):
            if pos + _BATCH > order.numel():
                order = torch.randperm(x_train.shape[0], generator=gen)
                pos = 0
            idx = order[pos : pos + _BATCH].to(device)
            pos += _BATCH
            opt.zero_grad(set_to_none=True)
            xb, yb = x_train[idx], y_train[idx]
            junk = _junk(xb[: _BATCH // 4], gen)
            inputs = torch.cat([_jitter(xb, gen), junk])
            targets = torch.cat([yb, torch.full((junk.shape[0],), shape[2], dtype=torch.int64, device=device)])
            loss = loss_fn(model(inputs), targets)  # junk is a fifth of each batch
            loss.backward()
            opt.step()
            sched.step()

    model.eval()
    if n_hold:
        with torch.no_grad():
            logits = _embed(model, points[hold_idx])[1]
        model.heldout_accuracy = float((logits.argmax(1) == labels[hold_idx]).double().mean().item())
    return model


def _junk(x: Tensor, gen: torch.Generator) -> Tensor:
    """Structureless images for the extra class.

    A classifier trained on digits alone has no reason to place noise far from
    digits in feature space (noise lands among the 8s), which made precision
    lenient for exactly the outputs an untrained generator makes. Three kinds:
    uniform noise, smooth random blobs, and real images with their pixels
    shuffled (right intensity histogram, no shape).
    """
    n, c, h, w = x.shape
    third = n // 3
    noise = torch.rand(third, c, h, w, generator=gen).to(x.device) * 2 - 1
    coarse = torch.rand(third, c, max(2, h // 4), max(2, w // 4), generator=gen).to(x.device) * 2 - 1
    blobs = nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    rest = x[2 * third :].flatten(1)
    order = torch.rand(rest.shape, generator=gen).to(x.device).argsort(dim=1)
    shuffled = rest.gather(1, order).view(-1, c, h, w)
    return torch.cat([noise, blobs, shuffled])


def _jitter(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift each image by up to one pixel: +1 point of held-out accuracy on digits for free.

    Replicate padding rather than a constant, because an image folder's background need not be −1.
    """
    n, c, h, w = x.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    dy = torch.randint(0, 3, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 3, (n,), generator=gen).to(x.device)
    rows = torch.arange(h, device=x.device)[None, :] + dy[:, None]
    cols = torch.arange(w, device=x.device)[None, :] + dx[:, None]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows[:, None, :, None], cols[:, None, None, :]]


def _embed(model: FeatureClassifier, x: Tensor) -> tuple[Tensor, Tensor]:
    """Features and logits in chunks, so a 60k real set does not build one giant activation."""
    device = next(model.parameters()).device
    feats, logits = [], []
    for chunk in x.split(_EMBED_CHUNK):
        f = model.features(chunk.to(device=device, dtype=torch.float32))
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)


# --------------------------------------------------------------------------- image metrics


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (rows are samples).

    ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa Σb)^{1/2}), computed as pytorch-fid does:
    in float64, with ``eps`` added to both diagonals when the square root of a
    near-singular product is not finite, and the real part kept when round-off
    leaves tiny imaginary parts. Returns NaN when the fit is hopeless (caller
    omits the key); small negative round-off is clamped to 0.
    """
    xa = _as_float64(a)
    xb = _as_float64(b)
    if xa.ndim != 2 or xb.ndim != 2 or xa.shape[1] != xb.shape[1]:
        raise ValueError("feature sets must be 2-D with the same number of columns")
    if xa.shape[0] < 2 or xb.shape[0] < 2:
        return math.nan
    mu_a, mu_b = xa.mean(axis=0), xb.mean(axis=0)
    sigma_a = np.atleast_2d(np.cov(xa, rowvar=False))
    sigma_b = np.atleast_2d(np.cov(xb, rowvar=False))
    diff = mu_a - mu_b
    # Singular covariances (collapsed fakes, fewer samples than features) are expected here
    # and handled by the eps retry below; scipy's warning would only spam the worker log.
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma_a @ sigma_b)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma_a.shape[0]) * _FD_EPS
            covmean = linalg.sqrtm((sigma_a + offset) @ (sigma_b + offset))
    if np.iscomplexobj(covmean):
        # pytorch-fid raises here; a live dashboard should rather drop one reading.
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            return math.nan
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * np.trace(covmean))
    return max(0.0, fd) if math.isfinite(fd) else math.nan


def _as_float64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def image_metrics(fake: Tensor, real: Tensor, classifier: FeatureClassifier, *, k: int = PRDC_K) -> dict[str, float]:
    """Classifier-feature metrics of generated images against real ones.

    ``eval/classes``: dataset classes predicted for at least max(2, 1 %) of the
    fakes, junk predictions counting for none (omitted for a one-class dataset); ``eval/fd``: Fréchet distance of the
    features; ``eval/precision``, ``eval/recall``, ``eval/density``,
    ``eval/coverage``: k-NN manifold metrics on the same features. A key whose
    value is undefined (too few samples, a hopeless covariance) is omitted, and
    if any fake is non-finite (a diverged generator) nothing is reported: the
    trainer's ``diverged`` alert says it better than a number would. PRDC builds
    N×N distance matrices, so keep both sets to a few thousand images.
    """
    if fake.ndim != 4 or real.ndim != 4 or fake.shape[1:] != real.shape[1:]:
        raise ValueError(
            f"fake and real must be image batches of one shape, got {tuple(fake.shape)} and {tuple(real.shape)}"
        )
    if k < 1:
        raise ValueError("k must be positive")
    if not bool(torch.isfinite(real).all()):
        raise ValueError("real images contain non-finite values")
    if fake.shape[0] == 0 or not bool(torch.isfinite(fake).all()):
        return {}

    was_training = classifier.training
    classifier.eval()
    try:
        with torch.no_grad():
            fake_feat, fake_logits = _embed(classifier, fake.detach())
            real_feat, _ = _embed(classifier, real.detach())
    finally:
        classifier.train(was_training)

    out: dict[str, float] = {}
    if classifier.num_classes >= 2:
        # The junk class (last index) is dropped: noise is not a class the generator covers.
        counts = torch.bincount(fake_logits.argmax(dim=1), minlength=classifier.num_classes + 1)[:-1]
        need = max(CLASS_MIN_COUNT, math.ceil(CLASS_MIN_SHARE * fake.shape[0]))
        out["eval/classes"] = float((counts >= need).sum().item())

    fd = frechet_distance(real_feat, fake_feat)
    if math.isfinite(fd):
        out["eval/fd"] = fd

    real_np = real_feat.cpu().numpy().astype(np.float32)
    fake_np = fake_feat.cpu().numpy().astype(np.float32)
    if real_np.shape[0] > k and fake_np.shape[0] > k:
        from prdc import compute_prdc

        # compute_prdc prints the sample counts; keep library output off the worker's stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            prdc = compute_prdc(real_features=real_np, fake_features=fake_np, nearest_k=k)
        for name in ("precision", "recall", "density", "coverage"):
            value = float(prdc[name])
            if math.isfinite(value):
                out[f"eval/{name}"] = value
    return out
