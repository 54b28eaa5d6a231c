"""gradwatch's Python client: stream a training script of your own into the dashboard.

Three lines in your own loop (SPEC §8)::

    import gradwatch

    with gradwatch.init(name="my-dcgan", config=vars(args)) as run:
        gan = run.watch_gan(G, D, g_loss="non_saturating", opt_g=opt_g, opt_d=opt_d)
        ...  # gan.discriminator_backward(real, fake.detach()); gan.generator_backward(fake); run.log({...})

And the module-level calls most logging code already makes — ``init``,
``log``, ``finish``, ``config`` — act on the current run, so a script written
for wandb streams here with ``import gradwatch as wandb``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("gradwatch")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0.0.0+source"

from gradwatch.config import Config

if TYPE_CHECKING:
    from gradwatch.client import Run

#: The run the module-level calls act on (the last one ``init`` started, until it finishes).
run: Run | None = None


def init(name: str | None = None, config: Any = None, *, project: str | None = None, server: str | None = None,
         token: str | None = None, mode: str = "auto", out: str | Path | None = None, **options: Any) -> Run:
    """Start a run. The server: ``server``, else ``$GRADWATCH_URL``, else 127.0.0.1:8000 if one answers; with
    none (or ``mode="offline"``) the run is kept in ``./gradwatch-runs/<id>`` for ``gradwatch sync``.

    ``token`` (or ``$GRADWATCH_TOKEN``) is the server's access token when it has one. Other options:
    ``log_every``, ``hist_every``, ``flush_steps``, ``flush_ms``, ``telemetry_budget`` (the share of step time
    telemetry may take, 0.03 by default; 1: every key every logged step), ``quiet``. wandb-only keywords
    (``entity``, ``tags``, ``reinit``, ...) are accepted and ignored.
    """
    global run
    from gradwatch.client import Run

    known = {"log_every", "hist_every", "flush_steps", "flush_ms", "telemetry_budget", "quiet"}
    kept = {k: v for k, v in options.items() if k in known}
    if run is not None and not run._finished:
        run.finish()  # as wandb does when a script starts a second run
    run = Run(name, config if config is not None else _pending_config.as_dict(), project=project, server=server,
              token=token, mode=mode, out=out, **kept)  # type: ignore[arg-type]
    _pending_config.clear()
    return run


def log(metrics: dict[str, Any], step: int | None = None, commit: bool | None = None) -> None:
    """``run.log`` on the current run."""
    _current("log").log(metrics, step=step, commit=commit)


def finish(exit_code: int | None = None, quiet: bool | None = None) -> None:
    """End the current run (``exit_code`` other than 0 marks it failed, as in wandb)."""
    global run
    del quiet
    if run is None:
        return
    current, run = run, None
    current.finish("failed" if exit_code else None, f"exit code {exit_code}" if exit_code else None)


def watch(*_models: Any, **_options: Any) -> None:
    """Accepted for wandb scripts; gradwatch watches a GAN or VAE with ``run.watch_gan`` / ``run.watch_vae``."""


def _current(what: str) -> Run:
    if run is None:
        raise RuntimeError(f"gradwatch.{what}: call gradwatch.init() first")
    return run


class _ConfigProxy:
    """``gradwatch.config``: the current run's config; before ``init``, a config the next ``init`` adopts."""

    def _target(self) -> Config:
        return run.config if run is not None else _pending_config

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._target(), name, value)

    def __getitem__(self, key: str) -> Any:
        return self._target()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        self._target()[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self._target()

    def __iter__(self) -> Any:
        return iter(self._target())

    def __len__(self) -> int:
        return len(self._target())

    def __repr__(self) -> str:
        return repr(self._target())


def __getattr__(name: str) -> Any:
    # Heavy imports (torch) only when a script reaches for them.
    if name == "Run":
        from gradwatch import client as run_module

        return getattr(run_module, name)
    if name == "Image":
        from gradwatch.images import Image

        return Image
    if name == "sync":
        from gradwatch.sync import sync

        return sync
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


_pending_config = Config()
config: Any = _ConfigProxy()
