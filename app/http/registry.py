"""The models a server holds, by name; the first one answers requests without `?model=`."""

from __future__ import annotations

from app.http.settings import Settings
from app.protocol.errors import ModelNotFound
from models.vae.inference import VAEModel
from models.vae.loading import ModelLoadError, parse_model_spec


class ModelRegistry:
    def __init__(self, models: list[VAEModel]):
        if not models:
            raise ModelLoadError("no model to serve")
        self.models = {m.name: m for m in models}
        self.default = models[0].name

    @classmethod
    def from_settings(cls, settings: Settings) -> "ModelRegistry":
        """Load every `NAME=PATH` of settings.models (raises ModelLoadError naming the bad one)."""
        models = []
        for spec in settings.models:
            name, path = parse_model_spec(spec)
            models.append(VAEModel.load(
                name, path, device=settings.device, dtype=settings.dtype, config=settings.config,
                channels_last=settings.channels_last, compile=settings.compile,
                tile_threshold_pixels=settings.tile_threshold_pixels, tile_size=settings.tile_size,
                tile_overlap=settings.tile_overlap,
            ))
        return cls(models)

    def get(self, name: str | None) -> VAEModel:
        model = self.models.get(name or self.default)
        if model is None:
            shown = name if len(name) <= 60 else name[:57] + "..."  # never echoed in full
            raise ModelNotFound(f"unknown model {shown!r}: available {', '.join(self.models)}")
        return model
