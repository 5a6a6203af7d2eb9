"""Image decoding limits: formats, URLs, base64 strictness, byte and pixel limits, bombs."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from shared.errors import InvalidInput, PayloadTooLarge
from shared.images import decode_image, encode_image_b64, image_to_data_url

LIMITS = {"max_bytes": 1_000_000, "max_pixels": 1_000_000}


def png_b64(size: tuple[int, int] = (8, 6), mode: str = "RGB", color: object = (10, 20, 30)) -> str:
    return encode_image_b64(Image.new(mode, size, color))  # type: ignore[arg-type]


def test_plain_base64_png_decodes_to_rgb() -> None:
    img = decode_image(png_b64(), **LIMITS)
    assert img.mode == "RGB" and img.size == (8, 6)
    assert img.getpixel((0, 0)) == (10, 20, 30)


def test_data_url_decodes() -> None:
    url = image_to_data_url(Image.new("RGB", (4, 4), (1, 2, 3)))
    assert url.startswith("data:image/png;base64,")
    assert decode_image(url, **LIMITS).getpixel((1, 1)) == (1, 2, 3)


def test_jpeg_data_url_with_jpg_type_and_whitespace_and_missing_padding() -> None:
    b64 = encode_image_b64(Image.new("RGB", (16, 16), (200, 0, 0)), "JPEG").rstrip("=")
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    img = decode_image(f"data:image/jpg;base64,{wrapped}\n", **LIMITS)
    assert img.size == (16, 16)


def test_transparent_pixels_become_white() -> None:
    img = decode_image(png_b64(mode="RGBA", color=(0, 0, 0, 0)), **LIMITS)
    assert img.getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.info["transparency"] = 0
    assert decode_image(encode_image_b64(palette), **LIMITS).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("url", ["http://example.com/a.png", "https://x/y.jpg", "file:///etc/passwd"])
def test_urls_are_rejected_never_fetched(url: str) -> None:
    with pytest.raises(InvalidInput) as info:
        decode_image(url, **LIMITS)
    assert "image_b64" in info.value.message and "data:" in info.value.message
    assert info.value.details["field"] == "image_b64"


@pytest.mark.parametrize(
    "value", ["data:image/svg+xml;base64,PHN2Zz4=", "data:text/plain;base64,aGk=", "data:;base64,aGk="]
)
def test_unsupported_data_url_type(value: str) -> None:
    with pytest.raises(InvalidInput, match="media type"):
        decode_image(value, **LIMITS)


def test_data_url_without_base64_rejected() -> None:
    with pytest.raises(InvalidInput, match="base64"):
        decode_image("data:image/png,abc", **LIMITS)


@pytest.mark.parametrize("value", ["not base64!!", "abcde", "", "   "])
def test_not_base64(value: str) -> None:
    with pytest.raises(InvalidInput, match="image_b64 is not valid base64"):
        decode_image(value, **LIMITS)


def test_base64_of_non_image_bytes() -> None:
    with pytest.raises(InvalidInput, match="image_b64 is not a decodable image"):
        decode_image(base64.b64encode(b"hello, this is not an image").decode(), **LIMITS)


def test_truncated_png_is_not_decodable() -> None:
    raw = base64.b64decode(encode_image_b64(Image.effect_noise((64, 64), 50)))
    with pytest.raises(InvalidInput, match="not a decodable image"):
        decode_image(base64.b64encode(raw[: len(raw) // 2]).decode(), **LIMITS)


def test_format_outside_allowlist_rejected() -> None:
    with pytest.raises(InvalidInput, match="not a decodable image"):
        decode_image(encode_image_b64(Image.new("RGB", (4, 4)), "TIFF"), **LIMITS)


def test_encoded_length_limit_checked_before_decoding() -> None:
    huge = "A" * 2_000_000  # would decode fine, but is far beyond 1 MB encoded
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(huge, **LIMITS)
    assert "image_b64" in info.value.message and "1000000 bytes" in info.value.message
    assert info.value.status == 413


def test_decoded_size_limit() -> None:
    b64 = encode_image_b64(Image.effect_noise((100, 100), 80).convert("RGB"))
    decoded = len(base64.b64decode(b64))
    with pytest.raises(PayloadTooLarge, match=f"limit of {decoded - 1} bytes"):
        decode_image(b64, max_bytes=decoded - 1, max_pixels=10**9)
    assert decode_image(b64, max_bytes=decoded, max_pixels=10**9).size == (100, 100)


def test_pixel_limit() -> None:
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(png_b64((2000, 1000)), max_bytes=10**7, max_pixels=1_000_000)
    message = info.value.message
    assert "image_b64" in message and "2000000" in message and "1000000" in message
    assert info.value.details["pixels"] == 2_000_000


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height but whose data is one tiny compressed row."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [5000, 20000])  # under and over PIL's own bomb threshold
def test_decompression_bomb_rejected_before_decoding(side: int) -> None:
    b64 = base64.b64encode(_header_only_png(side, side)).decode()
    assert len(b64) < 200
    with pytest.raises(PayloadTooLarge) as info:
        decode_image(b64, max_bytes=10**6, max_pixels=16_000_000)
    assert "image_b64" in info.value.message and "16000000" in info.value.message


def test_one_bit_bomb_png() -> None:
    buf = io.BytesIO()
    Image.new("1", (12000, 12000)).save(buf, "PNG")  # 144 Mpx, compresses to a few KB
    b64 = base64.b64encode(buf.getvalue()).decode()
    with pytest.raises(PayloadTooLarge):
        decode_image(b64, max_bytes=10**6, max_pixels=16_000_000)


def test_gif_and_bmp_and_webp_accepted() -> None:
    for fmt in ("GIF", "BMP", "WEBP"):
        assert decode_image(encode_image_b64(Image.new("RGB", (5, 5), (9, 9, 9)), fmt), **LIMITS).size == (
            5,
            5,
        )
