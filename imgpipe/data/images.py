"""The one home of image decoding and normalisation at ingest.

Every file is decode-checked with Pillow, EXIF orientation is applied, and anything that
TensorFlow's ``decode_image`` would read differently (CMYK, 16-bit, palette, alpha, TIFF...) is
re-encoded losslessly as an 8-bit PNG, so training sees exactly the pixels that were checked.
Clean 8-bit JPEG/PNG files are stored byte for byte.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112  # EXIF tag number of Orientation (EXIF 2.3, table 4)
# The values that ImageOps.exif_transpose acts on; 0 ("unknown", written by some software) and
# other out-of-range values leave the pixels as stored.
_TRANSPOSING_ORIENTATIONS = (2, 3, 4, 5, 6, 7, 8)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY, _PNG_RGB = 0, 2  # PNG IHDR colour types that TensorFlow decodes as-is


class ImageRejected(Exception):
    """The file cannot be used; ``reason`` is a short code for the quarantine report."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class CheckedImage:
    width: int
    """Width after EXIF orientation."""
    height: int
    mode: str
    """Pillow mode of the source file (``L``, ``RGB``, ``CMYK``, ``I;16``...)."""
    format: str
    """Pillow format of the source file (``PNG``, ``JPEG``...)."""
    exif_transposed: bool
    encoded: bytes
    """What the shards store: the source bytes when already clean, else a lossless 8-bit PNG."""
    encoded_format: str
    """``png`` or ``jpeg``."""


def _is_clean_png(data: bytes) -> bool:
    # IHDR is the first chunk: bytes 24 and 25 are bit depth and colour type.
    return (
        data.startswith(_PNG_SIGNATURE)
        and len(data) > 25
        and data[24] == 8
        and data[25]
        in (
            _PNG_GRAY,
            _PNG_RGB,
        )
    )


def _to_8bit(image: Image.Image) -> Image.Image:
    """Grayscale ``L`` or ``RGB`` with 8 bits per channel, scaling (not clipping) deep images."""
    if image.mode in ("L", "RGB"):
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image, dtype=np.uint16)
        return Image.fromarray((array >> 8).astype(np.uint8), mode="L")
    if image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if array.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode in ("1", "LA"):
        return image.convert("L")
    # P, PA, RGBA, CMYK, YCbCr, LAB, HSV: to RGB, dropping alpha like
    # tf.io.decode_image(channels=3) does.
    return image.convert("RGB")


def check_image(data: bytes, *, max_pixels: int) -> CheckedImage:
    """Decode-check ``data`` fully; raise :class:`ImageRejected` with a reason when unusable.

    >>> checked = check_image(open("cell.png", "rb").read(), max_pixels=50_000_000)
    >>> checked.width, checked.mode
    (300, 'L')
    """
    if not data:
        raise ImageRejected("empty_file", "the file has zero bytes")
    try:
        image: Image.Image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageRejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError:
        # Not "({exc})": Pillow's message holds the BytesIO's memory address, which would make
        # the quarantine report differ from run to run.
        raise ImageRejected("not_an_image", "Pillow cannot identify it as an image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageRejected("not_an_image", f"Pillow cannot identify it ({exc})") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            "decompression_bomb",
            f"header claims {width}x{height} = {width * height} pixels, "
            f"more than ingest.max_pixels = {max_pixels}",
        )
    if width == 0 or height == 0:
        raise ImageRejected("decode_error", f"header claims an empty image {width}x{height}")
    source_format, source_mode = image.format or "unknown", image.mode
    try:
        image.load()
        orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        if orientation in _TRANSPOSING_ORIENTATIONS:
            image = ImageOps.exif_transpose(image)
        normalised = _to_8bit(image)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageRejected(
            "decode_error", f"{source_format} data does not decode ({exc})"
        ) from None

    transposed = orientation in _TRANSPOSING_ORIENTATIONS
    clean = (
        not transposed
        and source_mode in ("L", "RGB")
        and (source_format == "JPEG" or (source_format == "PNG" and _is_clean_png(data)))
    )
    if clean:
        encoded, encoded_format = data, source_format.lower()
    else:
        buffer = io.BytesIO()
        normalised.save(buffer, format="PNG")
        encoded, encoded_format = buffer.getvalue(), "png"
    return CheckedImage(
        width=normalised.width,
        height=normalised.height,
        mode=source_mode,
        format=source_format,
        exif_transposed=transposed,
        encoded=encoded,
        encoded_format=encoded_format,
    )
