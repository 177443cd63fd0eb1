"""The reference profile of an exported model version: what its validation images looked like to
it, the yardstick ``imgpipe monitor`` holds served traffic against.

export writes it beside the SavedModel (``assets.extra/reference_profile.npz``: TF Serving
ignores the folder, push copies it with the version), so each served version carries its own.
It holds, for a seeded sample of validation images:

- the backbone's pooled features (the SavedModel's ``embedding`` signature), reduced to their
  first principal components, with the projection that reduces logged images the same way;
- the served probabilities (the predicted-class distribution and the confidence);
- the image statistics validate checks (width, height, mode) and the mean brightness.

    reference = build_reference(SavedModelClassifier(saved_model), encoded, dims=32)
    write_reference(reference, saved_model)
    read_reference(saved_model).project(features)  # (n, dims)
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from imgpipe.core.errors import InputError

REFERENCE = Path("assets.extra") / "reference_profile.npz"
"""Where a version's profile is, relative to its SavedModel folder."""


def image_stats(encoded: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Width, height, mode and mean brightness (0-255, of the grayscale image) of each encoded
    image, as PIL reads it; an undecodable one has mode ``unreadable`` and NaN figures."""
    from PIL import Image

    stats: dict[str, list[Any]] = {"width": [], "height": [], "mode": [], "brightness": []}
    for data in encoded:
        try:
            with Image.open(io.BytesIO(data)) as image:
                size: tuple[float, float] = image.size
                mode = image.mode
                brightness = float(np.asarray(image.convert("L"), np.float32).mean())
        except Exception:  # PIL raises many types for bad data; the row says so
            size, mode, brightness = (np.nan, np.nan), "unreadable", np.nan
        stats["width"].append(size[0])
        stats["height"].append(size[1])
        stats["mode"].append(mode)
        stats["brightness"].append(brightness)
    return {
        "width": np.array(stats["width"], np.float64),
        "height": np.array(stats["height"], np.float64),
        "mode": np.array(stats["mode"], dtype=str),
        "brightness": np.array(stats["brightness"], np.float64),
    }


@dataclass(frozen=True)
class Reference:
    """One version's profile (see the module docstring); arrays, one row per image."""

    mean: np.ndarray
    components: np.ndarray
    embeddings: np.ndarray
    probabilities: np.ndarray
    class_names: np.ndarray
    width: np.ndarray
    height: np.ndarray
    mode: np.ndarray
    brightness: np.ndarray

    def project(self, features: np.ndarray) -> np.ndarray:
        """Pooled features (n, d) as the reference's principal components (n, dims)."""
        features = np.asarray(features, np.float64)
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"embeddings of shape {features.shape} do not match the reference's "
                f"{self.mean.shape[0]} features"
            )
        projected: np.ndarray = (features - self.mean) @ self.components.T
        return projected


def build_reference(served: Any, encoded: Sequence[bytes], dims: int) -> Reference:
    """The profile of ``encoded`` (validation images) as the SavedModel ``served``
    (``SavedModelClassifier``) sees them, keeping ``dims`` principal components."""
    if len(encoded) < 2:
        raise InputError(f"a reference profile needs at least 2 images, got {len(encoded)}")
    features = np.asarray(served.embed_bytes(encoded), np.float64)
    probabilities = served.predict_bytes(encoded)
    mean = features.mean(axis=0)
    _, _, rows = np.linalg.svd(features - mean, full_matrices=False)
    components = rows[: min(dims, len(rows))]
    stats = image_stats(encoded)
    return Reference(
        mean=mean,
        components=components,
        embeddings=(features - mean) @ components.T,
        probabilities=np.asarray(probabilities, np.float64),
        class_names=np.array(served.class_names(encoded[0]), dtype=str),
        **stats,
    )


def write_reference(reference: Reference, saved_model: Path) -> Path:
    path = Path(saved_model) / REFERENCE
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{f.name: getattr(reference, f.name) for f in fields(Reference)})
    return path


def read_reference(saved_model: Path) -> Reference:
    """The profile of the version in ``saved_model``; an error naming the folder when it has
    none (exported before the monitor existed)."""
    path = Path(saved_model) / REFERENCE
    if not path.is_file():
        raise InputError(
            f"{saved_model} has no reference profile ({REFERENCE}): it was exported before the "
            "monitor existed; export and push it again"
        )
    with np.load(path, allow_pickle=False) as data:
        return Reference(**{f.name: data[f.name] for f in fields(Reference)})
