"""Page filters: the ordered steps between rasterise and recognise (OCRmyPDF's ``filter_ocr_image``).

Each takes a page image and returns a new one, recording what it did (rotation, skew) so the hOCR's
coordinates can be related back to the original, which is never altered. The resolution step is
not a filter: rasterise keeps a file's resolution only when it is plausible, and the engine
estimates it otherwise (DESIGN §9).

- ``OrientationFilter``: tesseract OSD; the page is turned only when OSD's confidence reaches the
  threshold measured by ``bench/ocr_quality.py`` (see docs/DECISIONS.md).
- ``DeskewFilter``: projection profile of the ink on a reduced copy, ±``max_angle`` degrees.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from PIL import Image

from edge.ocr.model import PageEngine, PageImage

# Measured on the quality test set (bench/ocr_quality.py): see DECISIONS.md.
ORIENTATION_THRESHOLD = 2.0


@dataclass(frozen=True, slots=True)
class OrientationFilter:
    threshold: float = ORIENTATION_THRESHOLD
    name: str = "orientation"

    def __call__(self, page: PageImage, engine: PageEngine, timeout: float) -> PageImage:
        found = engine.orientation(page, timeout)
        if found is None:
            return page
        degrees, confidence = found
        if degrees == 0 or confidence < self.threshold:
            return page.replace(orientation_confidence=confidence)
        # OSD says how far to turn clockwise; PIL turns counter-clockwise.
        turned = page.image.rotate(-degrees, expand=True)
        return page.replace(image=turned, rotation=(page.rotation + degrees) % 360,
                            orientation_confidence=confidence)


@dataclass(frozen=True, slots=True)
class DeskewFilter:
    max_angle: float = 5.0
    min_angle: float = 0.3      # below this, resampling costs more sharpness than it gains
    name: str = "deskew"

    def __call__(self, page: PageImage, engine: PageEngine, timeout: float) -> PageImage:
        del engine, timeout
        angle = estimate_skew(page.image, self.max_angle)
        if abs(angle) < self.min_angle:
            return page
        background = 255 if page.image.mode in ("L", "1") else (255, 255, 255)
        straight = page.image.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True,
                                     fillcolor=background)
        return page.replace(image=straight, skew=round(page.skew + angle, 2))


_INK = [255 if v < 140 else 0 for v in range(256)]


def estimate_skew(image: Image.Image, max_angle: float = 5.0) -> float:
    """Degrees to rotate (counter-clockwise) so that text lines are horizontal.

    Rows of a straight page alternate sharply between ink and paper; the angle that maximises the
    differences between adjacent row sums is the skew. Search in 1° steps, then 0.25°, then 0.1°."""
    gray = image.convert("L")
    scale = min(1.0, 600 / max(gray.size))   # 0.1° is still a pixel across 600 px
    small = gray.resize((max(1, int(gray.width * scale)), max(1, int(gray.height * scale))),
                        Image.Resampling.BOX)
    ink = small.point(_INK)

    def score(angle: float) -> float:
        turned = ink.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
        rows = turned.resize((1, turned.height), Image.Resampling.BOX).tobytes()
        return float(sum((a - b) ** 2 for a, b in itertools.pairwise(rows)))

    steps = int(max_angle)
    coarse = max((float(k) for k in range(-steps, steps + 1)), key=score)
    medium = max((coarse + k * 0.25 for k in range(-3, 4)), key=score)
    fine: float = max((medium + k * 0.1 for k in (-1, 0, 1)), key=score)
    return round(fine, 2)
