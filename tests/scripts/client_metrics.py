"""A user's own script that watches no model: only its own metrics, images and config (SPEC §8, public API only).

For the browser tests (tests/test_browser_client.py): keys the dashboard did not plan for (``my/…``, ``val/…``,
``epoch``), images under two labels, a free-form config with markup in it, and Stop registered only once the
file ``--stop-file`` exists (its config then gains ``phase``), so a test sees both change while the page is open.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time

import torch

import gradwatch


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--pace", type=float, default=0.1, help="seconds to sleep per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="client-metrics")
    p.add_argument("--images-every", type=int, default=25)
    p.add_argument("--stop-file", help="once this file exists, check run.stop_requested (which registers Stop)")
    return p.parse_args()


def main() -> int:
    args = parse()
    rng = random.Random(args.seed)
    images = torch.Generator().manual_seed(args.seed)
    config = {"optimizer": "adam", "lr": 0.003, "model": {"width": 64, "depth": 3},
              "note": "<b>not bold</b>", "seed": args.seed}
    run = gradwatch.init(name=args.name, config=config, flush_ms=100)
    watching_stop = False
    for step in range(1, args.steps + 1):
        value = math.exp(-step / 100) + 0.05 * rng.random()
        metrics = {"my/metric": value, "my/other": 2 * value}
        if step % 10 == 0:
            metrics.update({"val/acc": 1 - value / 2, "epoch": step // 10})
        run.log(metrics, step=step)
        if step % args.images_every == 0:
            run.log_images(torch.rand(4, 1, 8, 8, generator=images), step=step)
            run.log_images(torch.rand(4, 1, 8, 8, generator=images), step=step, name="recon")
        if not watching_stop and args.stop_file and os.path.exists(args.stop_file):
            watching_stop = True
            run.config["phase"] = "stoppable"  # a config change the dashboard shows live
        if watching_stop and run.stop_requested:
            break
        time.sleep(args.pace)
    run.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
