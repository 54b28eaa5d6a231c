"""Evaluation metrics: the PacGAN/VEEGAN 2-D protocol, FD, and the cached feature classifier.

The 2-D cases are built by hand so that the expected numbers are known exactly;
the image cases use scikit-learn's digits with a classifier trained once per
module on a fixed 80 % split (the other 20 % measures its accuracy).
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import Tensor

from trainer import evaluation
from trainer.config import DataConfig
from trainer.data import Modes, grid25_modes, load_dataset, ring8_modes
from trainer.evaluation import (
    MODE_EVAL_SAMPLES,
    FeatureClassifier,
    frechet_distance,
    image_metrics,
    load_or_train_classifier,
    mode_metrics,
)

# --------------------------------------------------------------------------- 2-D protocol


def _at_centres(modes: Modes, which: list[int], per_mode: int = 10) -> Tensor:
    return modes.centres[torch.tensor(which)].repeat_interleave(per_mode, dim=0)


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


def test_protocol_sample_count_is_pacgans() -> None:
    assert MODE_EVAL_SAMPLES == 2500


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_samples_on_every_ring_centre_capture_all_modes(scale: float) -> None:
    modes = ring8_modes(scale)
    m = mode_metrics(_at_centres(modes, list(range(8))), modes)
    assert m["eval/modes"] == 8.0
    assert m["eval/hq_frac"] == 1.0
    assert m["eval/rev_kl"] == pytest.approx(0.0, abs=1e-9)
    assert all(type(v) is float for v in m.values())


def test_samples_on_one_centre_are_one_mode_with_maximal_kl() -> None:
    modes = ring8_modes()
    m = mode_metrics(_at_centres(modes, [3], per_mode=100), modes)
    assert m == {"eval/modes": 1.0, "eval/hq_frac": 1.0, "eval/rev_kl": pytest.approx(math.log(8))}


def test_samples_far_from_every_mode_are_not_high_quality() -> None:
    # The ring's centre is at distance 1 = 100 std from every mode.
    modes = ring8_modes()
    m = mode_metrics(torch.zeros(MODE_EVAL_SAMPLES, 2), modes)
    assert m["eval/modes"] == 0.0
    assert m["eval/hq_frac"] == 0.0
    # Documented convention: an empty histogram reports the KL's supremum, log K.
    assert m["eval/rev_kl"] == pytest.approx(math.log(8))


@pytest.mark.parametrize("dataset", ["ring8", "grid25"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_high_quality_threshold_is_three_stds(dataset: str, scale: float) -> None:
    modes = ring8_modes(scale) if dataset == "ring8" else grid25_modes(scale)
    centre = modes.centres[5]
    direction = torch.tensor([0.6, 0.8])  # unit length, off-axis on purpose
    inside = centre + 2.9 * modes.std * direction
    outside = centre + 3.1 * modes.std * direction
    m = mode_metrics(torch.stack([inside, outside]), modes)
    assert m["eval/hq_frac"] == 0.5
    assert m["eval/modes"] == 1.0


def test_grid25_known_subset() -> None:
    modes = grid25_modes()
    counts = {0: 10, 3: 20, 7: 30, 12: 40, 24: 100}
    pts = torch.cat([_at_centres(modes, [i], per_mode=c) for i, c in counts.items()])
    # Off-grid points: (1, 1) lies √2 from four centres, far beyond 3 × 0.05.
    junk = torch.ones(50, 2)
    m = mode_metrics(torch.cat([pts, junk]), modes)
    assert m["eval/modes"] == 5.0
    assert m["eval/hq_frac"] == pytest.approx(200 / 250)
    assert m["eval/rev_kl"] == pytest.approx(math.log(25) - _entropy(list(counts.values())), abs=1e-9)


def test_high_quality_sample_counts_for_its_nearest_mode_only() -> None:
    # Two samples near mode 0 of the grid, none near mode 1: one mode, not two.
    modes = grid25_modes()
    near = modes.centres[0] + torch.tensor([0.1, 0.0])
    m = mode_metrics(torch.stack([near, near]), modes)
    assert m["eval/modes"] == 1.0


@pytest.mark.parametrize("scale", [1.0, 2.0])  # 1.0: PacGAN's own layout (gradwatch reproduce); 2.0: the presets'
@pytest.mark.parametrize("name", ["ring8", "grid25"])
def test_true_data_scores_as_expected(name: str, scale: float) -> None:
    # A perfect generator (samples of the true mixture): every mode, a reverse KL near 0, and high quality for
    # P(‖N(0, σ²I₂)‖ < 3σ) = P(χ²₂ < 9) = 1 − e^{−9/2} ≈ 0.9889 of samples. Not 99.7 %: that is the one-dimensional
    # three-sigma rule, and the protocol measures the distance in the plane.
    data = load_dataset(DataConfig(name=name, scale=scale), torch.device("cpu"))
    assert data.modes is not None
    x = data.sample(MODE_EVAL_SAMPLES, torch.Generator().manual_seed(0))
    m = mode_metrics(x, data.modes)
    k = data.modes.centres.shape[0]
    assert m["eval/modes"] == float(k)
    assert m["eval/hq_frac"] == pytest.approx(1 - math.exp(-4.5), abs=0.008)
    assert 0.0 <= m["eval/rev_kl"] < 0.02


def test_non_finite_samples_are_never_high_quality() -> None:
    modes = ring8_modes()
    x = torch.cat([_at_centres(modes, [0, 1], per_mode=1), torch.full((2, 2), math.nan), torch.full((1, 2), math.inf)])
    m = mode_metrics(x, modes)
    assert m["eval/modes"] == 2.0
    assert m["eval/hq_frac"] == pytest.approx(2 / 5)
    assert all(math.isfinite(v) for v in m.values())


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes(dtype: torch.dtype) -> None:
    modes = ring8_modes()
    m = mode_metrics(_at_centres(modes, list(range(8))).to(dtype), modes)
    assert m["eval/modes"] == 8.0
    assert m["eval/hq_frac"] == 1.0


def test_rejects_wrong_shapes() -> None:
    with pytest.raises(ValueError):
        mode_metrics(torch.zeros(10, 3), ring8_modes())
    with pytest.raises(ValueError):
        mode_metrics(torch.zeros(0, 2), ring8_modes())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_mode_metrics_on_gpu_match_cpu() -> None:
    data = load_dataset(DataConfig(name="grid25"), torch.device("cpu"))
    assert data.modes is not None
    x = data.sample(MODE_EVAL_SAMPLES, torch.Generator().manual_seed(1))
    assert mode_metrics(x.cuda(), data.modes) == pytest.approx(mode_metrics(x, data.modes))


# --------------------------------------------------------------------------- Fréchet distance


def _gaussian(n: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dim, dim)) / math.sqrt(dim)
    return rng.normal(size=(n, dim)) @ mix


def test_fd_of_a_set_with_itself_is_zero() -> None:
    x = _gaussian(1000, 32, 0)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fd_of_a_mean_shift_is_the_squared_shift() -> None:
    x = _gaussian(1000, 32, 1)
    delta = np.random.default_rng(2).normal(size=32)
    # Identical covariances: the trace term vanishes and FD = ‖Δμ‖² exactly.
    assert frechet_distance(x, x + delta) == pytest.approx(float(delta @ delta), rel=1e-6)
    assert frechet_distance(x, x + 2 * delta) == pytest.approx(4 * float(delta @ delta), rel=1e-6)


def test_fd_of_a_scaled_set_follows_the_closed_form() -> None:
    # Σ₂ = 4Σ₁, same mean: Tr(Σ₁ + 4Σ₁ − 2·2Σ₁) = Tr(Σ₁).
    x = _gaussian(2000, 16, 3)
    x = x - x.mean(axis=0)
    assert frechet_distance(x, 2 * x) == pytest.approx(float(np.trace(np.cov(x, rowvar=False))), rel=1e-6)


def test_fd_accepts_tensors_and_survives_rank_deficiency() -> None:
    x = _gaussian(20, 64, 4)  # fewer samples than dimensions: singular covariances
    y = _gaussian(20, 64, 5)
    fd = frechet_distance(torch.from_numpy(x).float(), torch.from_numpy(y).float())
    assert math.isfinite(fd) and fd > 0
    assert fd == pytest.approx(frechet_distance(x, y), rel=1e-4)
    assert math.isnan(frechet_distance(x[:1], y))  # one sample: no covariance at all


# --------------------------------------------------------------------------- classifier and image metrics


class Digits:
    def __init__(self, cache_dir: Path) -> None:
        data = load_dataset(DataConfig(name="digits"), torch.device("cpu"))
        assert data.points is not None and data.labels is not None
        self.x, self.y = data.points, data.labels
        perm = torch.randperm(self.x.shape[0], generator=torch.Generator().manual_seed(1234))
        cut = int(0.8 * self.x.shape[0])
        self.train_idx, self.test_idx = perm[:cut], perm[cut:]
        self.cache_dir = cache_dir
        self.rng_before = torch.get_rng_state()
        start = time.perf_counter()
        self.clf = load_or_train_classifier(self.x[self.train_idx], self.y[self.train_idx], cache_dir)
        self.train_seconds = time.perf_counter() - start
        self.rng_after = torch.get_rng_state()
        (self.cache_file,) = cache_dir.glob("classifier-*.pt")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Digits:
    return Digits(tmp_path_factory.mktemp("classifier"))


def _state_equal(a: FeatureClassifier, b: FeatureClassifier) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_classifier_is_accurate_on_held_out_digits(digits: Digits) -> None:
    with torch.no_grad():
        pred = digits.clf(digits.x[digits.test_idx]).argmax(dim=1)
    accuracy = (pred == digits.y[digits.test_idx]).double().mean().item()
    assert accuracy >= 0.95
    assert digits.clf.heldout_accuracy is not None and digits.clf.heldout_accuracy >= 0.9
    assert digits.clf.features(digits.x[:3]).shape == (3, digits.clf.feature_dim)
    assert digits.clf(digits.x[:3]).shape == (3, 11)  # ten digits and the junk class
    assert 64 <= digits.clf.feature_dim <= 128
    assert not digits.clf.training
    assert not any(p.requires_grad for p in digits.clf.parameters())


def test_training_leaves_the_global_rng_alone(digits: Digits) -> None:
    assert torch.equal(digits.rng_before, digits.rng_after)


def test_second_call_loads_from_cache(digits: Digits, monkeypatch: pytest.MonkeyPatch) -> None:
    path = digits.cache_file
    stamp = path.stat().st_mtime_ns
    listing = sorted(p.name for p in digits.cache_dir.iterdir())

    def no_training(*args: object) -> FeatureClassifier:
        raise AssertionError("retrained despite a valid cache")

    monkeypatch.setattr(evaluation, "_train", no_training)
    again = load_or_train_classifier(digits.x[digits.train_idx], digits.y[digits.train_idx], digits.cache_dir)
    assert _state_equal(again, digits.clf)
    assert again.heldout_accuracy == digits.clf.heldout_accuracy
    assert path.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in digits.cache_dir.iterdir()) == listing  # no temp file left behind
    # The file is plain tensors and primitives.
    blob = torch.load(path, weights_only=True)
    assert set(blob) == {"state_dict", "meta"}


def test_cache_key_follows_data_and_seed(digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copy(digits.cache_file, tmp_path / digits.cache_file.name)
    calls: list[int] = []

    def counting(points: Tensor, labels: Tensor, shape: tuple[int, int, int], seed: int) -> FeatureClassifier:
        calls.append(seed)
        # An untrained stand-in keeps this test fast; only whether training happens matters.
        return FeatureClassifier(*shape)

    monkeypatch.setattr(evaluation, "_train", counting)
    x, y = digits.x[digits.train_idx], digits.y[digits.train_idx]
    load_or_train_classifier(x, y, tmp_path)  # the copied cache file is found
    load_or_train_classifier(x, y, tmp_path, seed=1)
    x2 = x.clone()
    x2[0, 0, 0, 0] += 0.5
    load_or_train_classifier(x2, y, tmp_path)
    y2 = y.clone()
    y2[0] = (y2[0] + 1) % 10
    load_or_train_classifier(x, y2, tmp_path)
    assert calls == [1, 0, 0]


def test_training_is_deterministic_given_the_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "_MIN_STEPS", 60)  # a short run is enough to compare weights
    x = torch.rand(100, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    y = torch.arange(100) % 3
    a = load_or_train_classifier(x, y, tmp_path / "a")
    b = load_or_train_classifier(x, y, tmp_path / "b")
    c = load_or_train_classifier(x, y, tmp_path / "c", seed=1)
    assert _state_equal(a, b)
    assert not _state_equal(a, c)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "stale_version"])
def test_damaged_cache_falls_back_to_training(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path = tmp_path / digits.cache_file.name
    shutil.copy(digits.cache_file, path)
    if damage == "garbage":
        path.write_bytes(b"not a torch file" * 100)
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        blob = torch.load(path, weights_only=True)
        blob["meta"]["version"] = "feature-classifier-v0"
        torch.save(blob, path)
    calls: list[int] = []

    def stub(points: Tensor, labels: Tensor, shape: tuple[int, int, int], seed: int) -> FeatureClassifier:
        calls.append(seed)
        return FeatureClassifier(*shape)

    monkeypatch.setattr(evaluation, "_train", stub)
    clf = load_or_train_classifier(digits.x[digits.train_idx], digits.y[digits.train_idx], tmp_path)
    assert calls == [0]
    assert clf.num_classes == 10
    # The bad file was replaced by a good one, and nothing else was left in the folder.
    assert torch.load(path, weights_only=True)["meta"]["version"] == evaluation.CLASSIFIER_VERSION
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_unwritable_cache_still_returns_a_classifier(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluation, "_train", lambda points, labels, shape, seed: FeatureClassifier(*shape))
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    x = torch.rand(60, 1, 8, 8) * 2 - 1
    clf = load_or_train_classifier(x, torch.zeros(60, dtype=torch.int64), blocker / "cache")
    assert clf.features(x).shape == (60, clf.feature_dim)


def test_one_class_dataset_keeps_features_but_drops_classes(
    digits: Digits, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An image folder without subfolders: every label 0. Here: the zeros of digits.
    monkeypatch.setattr(evaluation, "_MIN_STEPS", 150)  # data against junk is learnt quickly
    zeros = digits.x[digits.y == 0]
    clf = load_or_train_classifier(zeros, torch.zeros(zeros.shape[0], dtype=torch.int64), tmp_path)
    assert clf.num_classes == 1
    assert clf.heldout_accuracy is not None and clf.heldout_accuracy >= 0.9  # real zeros are not junk
    real, fake = zeros[:90], zeros[90:]
    m = image_metrics(fake, real, clf)
    assert "eval/classes" not in m
    _finite_floats(m)
    assert m["eval/precision"] > 0.8
    noise = torch.rand(90, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m_noise = image_metrics(noise, real, clf)
    assert m_noise["eval/precision"] < 0.1
    assert m_noise["eval/fd"] > 10 * m["eval/fd"]


def _finite_floats(m: dict[str, float]) -> None:
    assert all(type(v) is float and math.isfinite(v) for v in m.values()), m


def test_real_digits_score_as_real(digits: Digits) -> None:
    fake = digits.x[digits.test_idx]  # unseen real digits, all classes
    real = digits.x[digits.train_idx][: fake.shape[0]]  # equal sizes: coverage and density expect 1
    m = image_metrics(fake, real, digits.clf)
    _finite_floats(m)
    assert m["eval/classes"] == 10.0
    assert m["eval/precision"] > 0.85
    assert m["eval/recall"] > 0.85
    assert m["eval/coverage"] > 0.8
    assert 0.6 < m["eval/density"] < 1.5


def test_noise_scores_as_noise(digits: Digits) -> None:
    real = digits.x[digits.train_idx][:1000]
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    m_noise = image_metrics(noise, real, digits.clf)
    m_real = image_metrics(digits.x[digits.test_idx], real, digits.clf)
    _finite_floats(m_noise)
    # Noise is classified as junk, which is no class at all.
    assert m_noise["eval/classes"] <= 1.0
    assert m_noise["eval/precision"] < 0.05
    assert m_noise["eval/density"] < 0.05
    assert m_noise["eval/recall"] < 0.05
    assert m_noise["eval/coverage"] < 0.05
    assert m_noise["eval/fd"] > 20 * m_real["eval/fd"]


def test_collapsed_generator_shows_one_class(digits: Digits) -> None:
    real = digits.x[digits.train_idx][:1000]
    sixes = digits.x[digits.y == 6]  # the class this classifier never confuses
    m = image_metrics(sixes, real, digits.clf)
    assert m["eval/classes"] == 1.0
    assert m["eval/precision"] > 0.8  # every sample looks real...
    assert m["eval/recall"] < 0.3  # ...but covers a tenth of the data
    assert m["eval/coverage"] < 0.3


def test_image_metrics_edge_cases(digits: Digits) -> None:
    real = digits.x[digits.train_idx][:200]
    digits.clf.train()
    few = image_metrics(digits.x[digits.test_idx][:4], real, digits.clf)
    assert digits.clf.training  # the caller's mode is restored
    digits.clf.eval()
    _finite_floats(few)
    assert "eval/precision" not in few  # 4 samples cannot have 5 neighbours
    bad = digits.x[digits.test_idx][:50].clone()
    bad[0, 0, 0, 0] = math.nan
    assert image_metrics(bad, real, digits.clf) == {}
    with pytest.raises(ValueError):
        image_metrics(torch.zeros(10, 1, 28, 28), real, digits.clf)


def test_image_metrics_on_a_full_evaluation_batch(digits: Digits) -> None:
    # The size an evaluation uses (2,000 samples against 2,000 real): real
    # digits drawn twice from the same pool cover every class and score as
    # one distribution. Its cost is a benchmark's business, not a test's.
    gen = torch.Generator().manual_seed(5)
    real = digits.x[torch.randint(0, digits.x.shape[0], (2000,), generator=gen)]
    fake = digits.x[torch.randint(0, digits.x.shape[0], (2000,), generator=gen)]
    m = image_metrics(fake, real, digits.clf)
    assert m["eval/classes"] == 10.0
    assert m["eval/precision"] > 0.8 and m["eval/recall"] > 0.8
