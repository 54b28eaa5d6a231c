"""A script that logs a lot at once: 100 keys × 3,000 steps in a single flush, then a config too large to send."""

import sys

import gradwatch

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
with gradwatch.init(name="flood", flush_steps=10_000, flush_ms=600_000) as run:
    for step in range(1, steps + 1):
        run.log({f"flood/k{i:03d}": step + i / 1000 for i in range(100)}, step=step)
    run.config.update({"huge": "x" * (5 << 20)})  # one 5 MiB config frame: over the server's message cap
    run.log({"after": 1.0}, step=steps + 1)
