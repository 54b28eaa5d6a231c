"""``gradwatch reproduce``: published experiments on their protocol, our figures beside the paper's.

The quick runs go through the real command (a subprocess, real trial processes, real run folders); the
perfect-sampler check of the evaluation is in tests/test_evaluation.py (``test_true_data_scores_as_expected``, at
the protocol's scale too).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.command import gradwatch
from tests.live_server import LiveServer
from trainer.models import Maxout, PacGanDiscriminator, PacGanGenerator, build_gan
from trainer.reproduce import (
    PACGAN_DIFFERENCES,
    PACGAN_TABLE1,
    last_evaluation,
    pacgan_config,
    spread,
)


def table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the first Markdown table, as cells."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split("|")] for row in rows[1:]]


def test_pacgan_table1_quick_run_prints_four_rows_beside_the_papers_figures(tmp_path: Path) -> None:
    out = tmp_path / "pacgan"
    done = gradwatch("reproduce", "pacgan-table1", "--trials", "1", "--steps", "300", "--out", str(out),
                     "--device", "cpu", "--jobs", "2")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert [(r[0], r[1]) for r in rows] == [
        ("2D-ring (8 modes)", "non_saturating"), ("2D-ring (8 modes)", "saturating"),
        ("2D-grid (25 modes)", "non_saturating"), ("2D-grid (25 modes)", "saturating"),
    ]
    # The paper's plain GAN (non-saturating) rows, quoted exactly; the saturating rows are ours alone.
    assert rows[0][3::2] == ["6.3 ± 0.5", "98.2 ± 0.2", "0.45 ± 0.09"]
    assert rows[2][3::2] == ["17.3 ± 0.8", "94.8 ± 0.7", "0.70 ± 0.07"]
    assert rows[1][3::2] == rows[3][3::2] == ["—", "—", "—"]
    # The budget is said in the output, against the paper's 400,000 steps.
    assert "300 steps of batch 100 per trial" in done.stdout and "400,000" in done.stdout
    assert "--steps 400000" in done.stdout
    # Progress: one line per trial as it ends.
    assert done.stderr.count(" · seed 0: completed") == 4

    results = json.loads((out / "results.json").read_text())
    assert (out / "table.md").read_text() == done.stdout
    assert results["steps"] == 300 and results["trials"] == 1 and results["paper_steps"] == 400_000
    assert results["differences"] == list(PACGAN_DIFFERENCES)
    # Each trial's time is its own run, not its wait for a free process: with 2 at a time they add up to at most
    # twice the whole command's time.
    trial_times = [t["wall_s"] for row in results["rows"] for t in row["trials"]]
    assert all(t > 0 for t in trial_times) and sum(trial_times) <= 2 * results["wall_s"] + 1
    for row, cells in zip(results["rows"], rows, strict=True):
        (trial,) = row["trials"]
        folder = Path(trial["folder"])
        # Each trial keeps a run folder, and the table's figures are its last evaluation (at the final step).
        evaluation = last_evaluation(folder / "events.jsonl")
        assert trial["status"] == "completed"
        assert trial["eval/modes"] == evaluation["eval/modes"] == row["modes"]["mean"]
        assert row["modes"]["se"] is None  # one trial: no spread to show
        assert cells[2] == f"{evaluation['eval/modes']:.1f}"
        assert cells[4] == f"{100 * evaluation['eval/hq_frac']:.1f}"
        config = json.loads((folder / "config.json").read_text())
        assert config["gan"]["g_loss"] == row["g_loss"] and config["data"]["name"] == row["layout"]
        steps = [s for line in (folder / "events.jsonl").read_text().splitlines()
                 for f in [json.loads(line)] if f["type"] == "metrics" and "eval/modes" in f["data"]
                 for s in f["step"]]
        assert steps[-1] == 300


def test_the_protocol_is_the_authors_code() -> None:
    cfg = pacgan_config("grid25", "non_saturating", steps=400_000, seed=3)
    assert (cfg.data.name, cfg.data.scale) == ("grid25", 1.0)  # spacing 2, std 0.05: the paper's scale
    assert (cfg.model.arch, cfg.model.width, cfg.model.depth, cfg.model.latent_dim) == ("pacgan", 400, 4, 2)
    assert (cfg.gan.lr_g, cfg.gan.lr_d, cfg.gan.beta1, cfg.gan.beta2, cfg.gan.d_steps) == (1e-4, 1e-4, 0.8, 0.999, 1)
    assert (cfg.train.batch_size, cfg.train.seed) == (100, 3)
    assert set(PACGAN_TABLE1) == {"ring8", "grid25"}
    with pytest.raises(ValueError, match="layout"):
        pacgan_config("spiral", "non_saturating", steps=10, seed=0)


def test_pacgan_networks_are_the_papers() -> None:
    """G: 2→400→400→400→400→2, bias-free linear → batch norm → ReLU, a linear output; D: three maxout layers of
    200 units × 5 pieces, then one logit."""
    cfg = pacgan_config("ring8", "non_saturating", steps=10, seed=0).model
    torch.manual_seed(0)
    g, d = build_gan(cfg, (2,))
    assert isinstance(g, PacGanGenerator) and isinstance(d, PacGanDiscriminator)
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features, m.bias is not None) for m in linears] == [
        (2, 400, False), (400, 400, False), (400, 400, False), (400, 400, False), (400, 2, True)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in g.modules()) == 4
    maxouts = [m for m in d.modules() if isinstance(m, Maxout)]
    assert [(m.linear.in_features, m.units, m.pieces) for m in maxouts] == [(2, 200, 5), (200, 200, 5), (200, 200, 5)]
    # The initialisation: weights ~ N(0, 0.02²), biases 0.
    weights = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.Linear)])
    assert weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(m.bias is None or not m.bias.any() for m in d.modules() if isinstance(m, torch.nn.Linear))
    # Maxout is the max over each unit's pieces.
    x = torch.randn(7, 2, generator=torch.Generator().manual_seed(1))
    first = maxouts[0]
    assert torch.equal(first(x), first.linear(x).view(7, 200, 5).max(-1).values)
    assert d(x).shape == (7,)
    # In eval mode (samples, evaluations) a sample does not depend on its batch: batch norm's running statistics.
    g.eval()
    z = torch.randn(5, 2, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(g(z)[:2], g(z[:2]))


def test_spread_is_mean_and_standard_error() -> None:
    s = spread([6.0, 7.0, 8.0, math.nan])  # a failed trial's NaN is left out
    assert (s.mean, s.n) == (7.0, 3)
    assert s.se == pytest.approx(1.0 / math.sqrt(3))
    assert s.text(1) == "7.0 ± 0.6"
    assert spread([5.0]).text(2) == "5.00"
    assert spread([]).text(1) == "—"


def test_arjovsky_bottou_quick_run_tabulates_the_collapse_over_seeds(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    done = gradwatch("reproduce", "arjovsky-bottou", "--trials", "2", "--steps", "400", "--out", str(out),
                     "--device", "cpu")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert [int(r[0]) for r in rows] == [0, 50, 100, 150, 200, 250, 300, 350, 400]
    results = json.loads((out / "results.json").read_text())
    first, last = results["rows"][0], results["rows"][-1]
    # D wins and the saturating gradient falls with D(G(z)), on both seeds (n = 2, so a standard error is shown).
    assert last["d/fake_prob"]["mean"] < first["d/fake_prob"]["mean"] / 10
    assert last["grad/g_norm_saturating"]["mean"] < first["grad/g_norm_saturating"]["mean"] / 10
    assert last["grad/g_norm_saturating"]["n"] == 2 and last["grad/g_norm_saturating"]["se"] is not None
    assert results["orders_of_magnitude"] > 1
    assert "five orders of magnitude" in done.stdout  # the paper's figure, quoted beside ours
    # Each seed's run folder holds the study as SPEC metrics frames under SPEC's names.
    for seed in (0, 1):
        frames = [json.loads(line) for line in (out / f"trial-{seed}" / "events.jsonl").read_text().splitlines()]
        assert [f["type"] for f in frames] == ["status", "metrics", "status"]
        assert frames[1]["step"] == [0, 50, 100, 150, 200, 250, 300, 350, 400]
        assert {"d/fake_prob", "grad/g_norm_saturating", "grad/g_norm_non_saturating"} <= set(frames[1]["data"])
        assert frames[-1]["status"] == "completed"


def test_a_trial_folder_syncs_into_the_dashboard(tmp_path: Path, server: LiveServer) -> None:
    out = tmp_path / "ab"
    assert gradwatch("reproduce", "arjovsky-bottou", "--trials", "1", "--steps", "80", "--out", str(out),
                     "--device", "cpu").returncode == 0
    synced = gradwatch("sync", str(out / "trial-0"), "--server", server.url, "--no-progress")
    assert synced.returncode == 0, synced.stderr
    with server.client() as http:
        (run,) = [r for r in http.get("/api/runs").json() if r["name"] == "Arjovsky & Bottou saturation study · seed 0"]
        assert run["status"] == "completed"
        body = http.get(f"/api/runs/{run['id']}/metrics", params={"keys": "grad/g_norm_saturating"}).json()
    history = body["metrics"]
    study = json.loads((out / "results.json").read_text())
    assert history["grad/g_norm_saturating"]["step"] == [r["d_step"] for r in study["rows"]]
    assert history["grad/g_norm_saturating"]["value"] == pytest.approx(
        [r["grad/g_norm_saturating"]["mean"] for r in study["rows"]], rel=1e-6)


def test_bad_arguments_are_refused_naming_them() -> None:
    assert "--trials: must be at least 1" in gradwatch("reproduce", "pacgan-table1", "--trials", "0").stderr
    assert "invalid choice" in gradwatch("reproduce", "pacgan-table2").stderr
    refused = gradwatch("reproduce", "pacgan-table1", "--device", "tpu", "--trials", "1", "--steps", "1")
    assert refused.returncode != 0 and "device" in refused.stderr


def test_a_second_run_into_the_same_folder_is_refused_and_the_first_kept(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    args = ("reproduce", "arjovsky-bottou", "--trials", "1", "--steps", "40", "--out", str(out), "--device", "cpu")
    assert gradwatch(*args).returncode == 0
    before = (out / "trial-0" / "events.jsonl").read_bytes(), (out / "results.json").read_bytes()
    again = gradwatch(*args)
    assert again.returncode == 2 and "already holds trials" in again.stderr and "--out" in again.stderr
    assert ((out / "trial-0" / "events.jsonl").read_bytes(), (out / "results.json").read_bytes()) == before
