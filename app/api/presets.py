"""The demo configs: the same ones ``gradwatch train --preset`` runs."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from trainer.presets import all_presets

router = APIRouter(prefix="/api", tags=["presets"])


@router.get("/presets")
async def presets() -> dict[str, dict[str, Any]]:
    """Each preset as a complete run config, ready to POST to /api/runs."""
    return {name: cfg.model_dump(mode="json") for name, cfg in all_presets().items()}
