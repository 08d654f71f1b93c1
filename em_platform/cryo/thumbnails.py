"""Pictures a scientist looks at, as cryoem-services' images plugins make them (pure numpy + Pillow).

``mrc_to_jpeg``: clip to mean ± 3σ, scale to 8 bits, shrink to fit 1024² (here: any ``max_side``); central
slice and XY/XZ projections of a tomogram; the drift trajectory of a movie.
"""

from __future__ import annotations

import base64
import io
from typing import TYPE_CHECKING

import numpy as np

from em_platform.lazy_import import LazyModule

if TYPE_CHECKING:  # the modules themselves for the type checker; at run time each is imported on first use
    from PIL import Image, ImageDraw
else:
    Image = LazyModule("PIL.Image")
    ImageDraw = LazyModule("PIL.ImageDraw")


def clip_to_uint8(image: np.ndarray, sigmas: float = 3.0) -> np.ndarray:
    """mean ± ``sigmas``·σ mapped to 0…255 (cryoem-services' mrc_to_jpeg contrast)."""
    a = np.asarray(image, np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, np.uint8)
    mean, std = float(finite.mean()), float(finite.std())
    if std == 0:
        return np.full(a.shape, 128, np.uint8)
    lo, hi = mean - sigmas * std, mean + sigmas * std
    return np.round(np.clip((np.nan_to_num(a, nan=mean) - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def to_image(image: np.ndarray, max_side: int = 1024) -> Image.Image:
    img = Image.fromarray(clip_to_uint8(image))
    img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return img


def encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def mrc_to_jpeg(image: np.ndarray, max_side: int = 1024) -> bytes:
    """JPEG bytes of a micrograph (or the first section of a stack)."""
    a = np.asarray(image)
    return encode(to_image(a[0] if a.ndim == 3 else a, max_side), "JPEG")


def central_slice(volume: np.ndarray) -> np.ndarray:
    return np.asarray(volume[volume.shape[0] // 2])


def projections(volume: np.ndarray) -> dict[str, np.ndarray]:
    """XY (along z) and XZ (along y) sum projections of a (nz, ny, nx) volume."""
    v = np.asarray(volume, np.float32)
    return {"xy": v.sum(axis=0), "xz": v.sum(axis=1)}


def drift_plot(shifts_px: np.ndarray, size: int = 256) -> bytes:
    """PNG of a movie's drift trajectory (frame 0 circled, one dot per frame)."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    s = np.asarray(shifts_px, float)
    if len(s):
        span = max(float(np.abs(s - s.mean(0)).max()), 0.5) * 1.2
        c = s.mean(0)
        pts = [
            ((x - c[0]) / span * size / 2 + size / 2, size / 2 - (y - c[1]) / span * size / 2) for x, y in s
        ]
        draw.line([(0, size / 2), (size, size / 2)], fill=(220, 220, 220))
        draw.line([(size / 2, 0), (size / 2, size)], fill=(220, 220, 220))
        if len(pts) > 1:
            draw.line(pts, fill=(30, 90, 200), width=2)
        for x, y in pts:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(30, 90, 200))
        x0, y0 = pts[0]
        draw.ellipse([x0 - 5, y0 - 5, x0 + 5, y0 + 5], outline=(200, 40, 40), width=2)
        draw.text((4, 4), f"±{span:.1f} px", fill=(0, 0, 0))
    return encode(img)


def markdown_image(data: bytes, alt: str, fmt: str = "png") -> str:
    """A Markdown image with the bytes inline (how the Dagster UI shows pictures in asset metadata)."""
    return f"![{alt}](data:image/{fmt};base64,{base64.b64encode(data).decode()})"
