"""Image decoding with limits, for untrusted ``image_b64`` fields.

Accepts plain base64 or a ``data:image/<type>;base64,`` URL; never fetches a URL. Sizes are
checked at every stage before more work is done: encoded length, decoded bytes, then the pixel
count from the header before any pixel data is decoded.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import io
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError

from shared.errors import InvalidInput, Overloaded, PayloadTooLarge

FIELD = "image_b64"
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")  # what PIL may identify; nothing else is opened
DATA_URL_TYPES = frozenset({"png", "jpeg", "jpg", "webp", "gif", "bmp"})  # data:image/<type>

_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")
_WHITESPACE = str.maketrans("", "", " \t\r\n\v\f")
_ENCODED_SLACK = 1024  # headers, padding and a few stray characters


def _payload(image_b64: str) -> str:
    """The base64 part of ``image_b64``; rejects non-image data URLs and every other URL scheme."""
    head = image_b64[:256].lstrip()
    match = _DATA_URL.match(head)
    if match is None:
        if _SCHEME.match(head):
            raise InvalidInput(
                f"{FIELD}: only base64 or data:image/...;base64, URLs are accepted; URLs are never fetched",
                field=FIELD,
            )
        return image_b64
    media, params = match.group(1).strip().lower(), match.group(2).lower()
    kind = media.removeprefix("image/") if media.startswith("image/") else None
    if kind not in DATA_URL_TYPES:
        raise InvalidInput(
            f"{FIELD}: data URL media type {media or '(none)'!r} is not accepted; "
            f"use image/{', image/'.join(sorted(DATA_URL_TYPES))}",
            field=FIELD,
        )
    if ";base64" not in params:
        raise InvalidInput(f"{FIELD}: data URLs must be base64-encoded (;base64,)", field=FIELD)
    offset = len(image_b64) - len(image_b64.lstrip()) + match.end()
    return image_b64[offset:]


def _too_large_bytes(max_bytes: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{FIELD}: image is larger than the limit of {max_bytes} bytes", field=FIELD, limit_bytes=max_bytes
    )


def _not_an_image() -> InvalidInput:
    return InvalidInput(
        f"{FIELD} is not a decodable image (accepted formats: {', '.join(ALLOWED_FORMATS)})", field=FIELD
    )


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy; transparent pixels are composited onto white rather than turning black."""
    has_alpha = img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode == "P" and "transparency" in img.info
    )
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _bomb(max_pixels: int) -> PayloadTooLarge:
    """Pillow's decompression-bomb guard fired: the declared size is beyond any sane image."""
    return PayloadTooLarge(
        f"{FIELD}: image dimensions exceed the limit of {max_pixels} pixels",
        field=FIELD,
        limit_pixels=max_pixels,
    )


def _raw_bytes(image_b64: str, max_bytes: int) -> bytes:
    """The decoded bytes of ``image_b64`` (encoded length and decoded size checked)."""
    payload = _payload(image_b64)
    max_encoded = (max_bytes + 2) // 3 * 4
    # Newline-wrapped base64 (76 columns) adds ~1/38 in line breaks, hence the proportional slack.
    if len(payload) > max_encoded + max_encoded // 32 + _ENCODED_SLACK:
        raise _too_large_bytes(max_bytes)
    compact = payload.translate(_WHITESPACE)
    if not compact or len(compact) % 4 == 1:
        raise InvalidInput(f"{FIELD} is not valid base64", field=FIELD)
    compact += "=" * (-len(compact) % 4)
    try:
        raw = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{FIELD} is not valid base64", field=FIELD) from None
    if len(raw) > max_bytes:
        raise _too_large_bytes(max_bytes)
    return raw


@contextlib.contextmanager
def _opened(raw: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image in ``raw``, opened (header read, no pixels decoded) and size-checked."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(raw), formats=list(ALLOWED_FORMATS))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise _bomb(max_pixels) from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
            raise _not_an_image() from None
        with img:
            if img.format not in ALLOWED_FORMATS and img.format != "MPO":  # MPO: multi-picture JPEG
                raise _not_an_image()
            width, height = img.size
            if width <= 0 or height <= 0:
                raise _not_an_image()
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{FIELD}: image has {width}x{height} = {width * height} pixels, "
                    f"more than the limit of {max_pixels} pixels",
                    field=FIELD,
                    pixels=width * height,
                    limit_pixels=max_pixels,
                )
            yield img


@dataclass(frozen=True)
class ScannedImage:
    """An untrusted image whose encoding, format and limits were checked (header only): its bytes
    and width × height. :meth:`decode` loads the pixels without decoding the base64 again."""

    raw: bytes
    pixels: int
    max_pixels: int

    def decode(self) -> Image.Image:
        """The loaded RGB image (raises what :func:`decode_image` raises)."""
        with _opened(self.raw, self.max_pixels) as img:  # bomb warnings are errors here
            try:
                img.load()
                return _to_rgb(img)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning):
                raise _bomb(self.max_pixels) from None
            except (OSError, SyntaxError, ValueError, EOFError):
                raise _not_an_image() from None


def scan_image(image_b64: str, *, max_bytes: int, max_pixels: int) -> ScannedImage:
    """Check an untrusted base64 image from its header, without decoding pixels: a pixel budget can
    be taken before :meth:`ScannedImage.decode`. Raises what :func:`decode_image` raises for the
    encoding, the format and the limits."""
    raw = _raw_bytes(image_b64, max_bytes)
    with _opened(raw, max_pixels) as img:
        width, height = img.size
    return ScannedImage(raw, int(width * height), max_pixels)


def image_pixels(image_b64: str, *, max_bytes: int, max_pixels: int) -> int:
    """Width × height of an untrusted base64 image, read from its header without decoding pixels."""
    return scan_image(image_b64, max_bytes=max_bytes, max_pixels=max_pixels).pixels


def decode_image(image_b64: str, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Decode an untrusted base64 image into a loaded RGB ``PIL.Image``.

    Raises ``InvalidInput`` (not base64, not an allowed image, a non-data URL) or ``PayloadTooLarge``
    (encoded length, decoded bytes, or width*height over the limits); every message names
    ``image_b64`` and, for limits, the limit. Never fetches anything.
    """
    return scan_image(image_b64, max_bytes=max_bytes, max_pixels=max_pixels).decode()


class PixelBudget:
    """Decoded pixels one server holds at once, across every request (thread-safe).

    :meth:`hold` takes a request's pixels for a block and gives them back after it; a request that
    would take the server past ``capacity`` is refused at once with ``Overloaded`` (429) rather than
    queued, one larger than ``capacity`` with ``PayloadTooLarge`` (413).
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.in_use = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        if pixels > self.capacity:
            raise PayloadTooLarge(
                f"{FIELD}: {pixels} decoded pixels exceed the server's limit of {self.capacity}",
                field=FIELD,
                pixels=pixels,
                limit_pixels=self.capacity,
            )
        with self._lock:
            if self.in_use + pixels > self.capacity:
                raise Overloaded(
                    f"the server already holds {self.in_use} decoded pixels of {self.capacity}; retry later",
                    retry_after=1.0,
                    limit_pixels=self.capacity,
                )
            self.in_use += pixels
        try:
            yield
        finally:
            with self._lock:
                self.in_use -= pixels


def encode_image_b64(img: Image.Image, fmt: str = "PNG") -> str:
    """``img`` saved as ``fmt`` and base64-encoded (plain base64, no data-URL prefix)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_to_data_url(img: Image.Image, fmt: str = "PNG") -> str:
    """``img`` as a ``data:image/<fmt>;base64,`` URL accepted by :func:`decode_image`."""
    return f"data:image/{fmt.lower()};base64,{encode_image_b64(img, fmt)}"
