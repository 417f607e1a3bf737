"""QC image: the slide thumbnail with tissue outlines and the kept patch grid drawn on it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

TISSUE_COLOUR = (0, 170, 0)  # RGB
HOLE_COLOUR = (0, 90, 255)
PATCH_COLOUR = (20, 20, 20)
MAX_SIDE = 2000  #: px, longest side of the QC image, so cohort reports stay light


def qc_mpp(level0_size: tuple[int, int], slide_mpp: float) -> float:
    """µm/px at which the whole slide fits in `MAX_SIDE` pixels (never finer than the scan)."""
    return max(slide_mpp, max(level0_size) * slide_mpp / MAX_SIDE)


def render_qc(
    thumbnail: np.ndarray,
    polygons_level0: list[list[np.ndarray]],
    coords: np.ndarray,
    patch_size_level0: float,
    level0_size: tuple[int, int],
    caption: list[str],
) -> np.ndarray:
    """RGB QC image. Polygons and patch coordinates are in level-0 pixels."""
    height, width = thumbnail.shape[:2]
    scale = min(1.0, MAX_SIDE / max(height, width))
    image = cv2.resize(
        thumbnail,
        (max(1, round(width * scale)), max(1, round(height * scale))),
        interpolation=cv2.INTER_AREA,
    )
    image = np.ascontiguousarray(image)
    to_image = np.array([image.shape[1] / level0_size[0], image.shape[0] / level0_size[1]])

    if len(coords):
        # All patch outlines in one cv2 call: (N, 4, 2) corners, no per-patch Python loop.
        offsets = np.array([[0, 0], [1, 0], [1, 1], [0, 1]]) * patch_size_level0
        corners = (coords[:, None, :] + offsets[None]) * to_image
        cv2.polylines(image, list(np.round(corners).astype(np.int32)), True, PATCH_COLOUR, 1)

    thickness = max(2, round(max(image.shape[:2]) / 500))
    for rings in polygons_level0:
        scaled = [np.round(ring * to_image).astype(np.int32) for ring in rings]
        cv2.polylines(image, scaled[:1], True, TISSUE_COLOUR, thickness, cv2.LINE_AA)
        if len(scaled) > 1:
            cv2.polylines(image, scaled[1:], True, HOLE_COLOUR, thickness, cv2.LINE_AA)
    return _with_caption(image, caption)


def _with_caption(image: np.ndarray, lines: list[str]) -> np.ndarray:
    font, font_scale, line_height = cv2.FONT_HERSHEY_SIMPLEX, 0.5, 20
    text_width = max(cv2.getTextSize(line, font, font_scale, 1)[0][0] for line in lines) + 12
    width = max(image.shape[1], text_width)
    band_height = line_height * len(lines) + 10
    canvas = np.full((band_height + image.shape[0], width, 3), 255, np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(
            canvas, line, (6, 18 + i * line_height), font, font_scale, (0, 0, 0), 1, cv2.LINE_AA
        )
    canvas[band_height:, : image.shape[1]] = image
    return canvas


def render_failure(slide_label: str, message: str) -> np.ndarray:
    """A small card standing in for the QC image of a slide that could not be processed."""
    card = np.full((160, 800, 3), 255, np.uint8)
    cv2.rectangle(card, (0, 0), (799, 159), (200, 0, 0), 4)
    words, lines, current = message.split(), [], ""
    for word in words:
        if len(current) + len(word) > 90:
            lines.append(current)
            current = ""
        current = f"{current} {word}".strip()
    lines.append(current)
    text = [f"FAILED: {slide_label}", *lines[:5]]
    for i, line in enumerate(text):
        cv2.putText(
            card,
            line,
            (12, 30 + i * 24),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.5,
            (120, 0, 0),
            1,
            cv2.LINE_AA,
        )
    return card


def write_png(path, rgb: np.ndarray) -> None:
    # Encoded in memory, then written by Python: a full disk is an OSError with its errno,
    # not a libpng message on stderr and a bare False.
    ok, data = cv2.imencode(
        ".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_PNG_COMPRESSION, 1]
    )
    if not ok:
        raise ValueError(f"cv2 could not encode the PNG for {path}")
    Path(path).write_bytes(data.tobytes())
