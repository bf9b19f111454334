"""A run's manifest as typed records: what it read, with which model and settings, what each
block did, how long it took. Written as ``OUT/manifest.json`` (:func:`geoseg.runstate.write_manifest`);
fields that do not apply (a failed scene's acquisition time, a computed block's error) are left out.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _without_unset_optionals(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self._keep_none}

    _keep_none: frozenset[str] = frozenset()


class BlockRecord(_Record):
    """One block: computed (``done``) with its pixel counts and timings, or ``failed`` with why."""

    model_config = ConfigDict(extra="ignore")  # markers of older versions may hold more

    status: Literal["done", "failed"]
    tiles: int | None = None
    forward_s: float | None = None  # seconds in forward passes
    seconds: float | None = None  # the block's two steps
    scene_valid_pixels: dict[str, list[int]] | None = None  # per scene: [valid read, filled]
    histogram: dict[str, int] | None = None  # class value -> pixels
    error: str | None = None
    reused: bool | None = None  # committed by an earlier attempt


class SceneRecord(_Record):
    path: str
    status: Literal["ok", "unused", "failed"]
    acquired: str | None = None
    error: str | None = None

    @model_serializer(mode="wrap")
    def _fields(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.status == "failed":
            data.pop("acquired", None)
        else:
            data.pop("error", None)
        return data


class ModelRecord(_Record):
    checkpoint: str
    sha256: str
    arch: str
    bands: list[str]


class Summary(_Record):
    blocks: int
    computed: int
    reused: int
    without_data: int
    failed_blocks: int
    failed_scenes: int
    tiles: int


class Timings(_Record):
    forward_s: float  # worker seconds in forward passes
    model_share: float | None  # their share of the blocks' worker time
    segment_s: float
    vectorize_s: float
    total_s: float

    _keep_none = frozenset({"model_share"})


class RunManifest(_Record):
    status: Literal["finished", "incomplete"]
    run_id: str
    geoseg_version: str
    inputs: list[str]
    scenes: list[SceneRecord]
    model: ModelRecord
    config: dict[str, Any]
    fingerprint: str
    grid: dict[str, Any]
    blocks: dict[str, BlockRecord] = Field(description="blocks without data are left out: see summary")
    summary: Summary
    timings: Timings
    outputs: dict[str, str | None]
