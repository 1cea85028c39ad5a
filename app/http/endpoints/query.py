"""Query parameters shared by the endpoints, as typed pydantic models (one field, one home).

Each endpoint's `Query` combines these. Values of the wrong type, or outside their bounds, are
a 400 naming the parameter before any body is read.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator

from models.vae.colour_lock import MAX_STEPS as COLOUR_LOCK_MAX
from models.vae.latents import check_factor

TILED = "tiled encode/decode; default: only above the server's tile threshold"


class ModelQuery(BaseModel):
    model: str | None = Field(None, max_length=200, description="model name (GET /v1/models); default: the first")


class TilingQuery(BaseModel):
    tiled: bool | None = Field(None, description=TILED)


class ColourLockQuery(BaseModel):
    colour_lock: int = Field(0, ge=0, le=COLOUR_LOCK_MAX, description=(
        "closed-loop steps (N + 1 decodes more) that shift the latents so they decode to the image's own "
        "mean colour; 0: plain encode, 1 is usually enough (models/vae/colour_lock.py)"))


class ScalingQuery(BaseModel):
    scaling_factor: float | None = Field(None, description="latents are (z - shift) * scale when given")
    shift_factor: float | None = None

    @field_validator("scaling_factor", "shift_factor")
    @classmethod
    def _bounded(cls, value, info):
        return check_factor(info.field_name, value)


class RawTensorQuery(BaseModel):
    shape: list[str] = Field([], description="raw tensor body shape: repeated, JSON list or comma-separated")
    dtype: str | None = Field(None, max_length=20, description="raw tensor body dtype (float32 default)")


class ImageOutQuery(BaseModel):
    image_format: str | None = Field(None, max_length=20, description="png (default), jpg or webp; Accept works too")
    quality: int | None = Field(None, ge=1, le=100, description="JPEG / WebP quality")
