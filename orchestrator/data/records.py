"""Record payloads of the project's datasets.

``jpeg_label`` (the project's own format, no pickle): a 20-byte header then the encoded image file as is::

    b"DJL1" | i64 label | u32 width | u32 height | encoded image bytes (JPEG, PNG, ...)

The image size in the header lets the loader compute random-resized-crop windows in Python (from seed, epoch and
sample index) without decoding; the bytes go to the decoder untouched.

``pickle``: HFAiLab's ImageNet layout, ``pickle.dumps((PIL.Image.Image, int label))``. Unpickling runs code chosen
by whoever wrote the file, so it is read only when ``data.trust_pickle=true``, and then through an unpickler that
resolves no global except ``PIL.Image.Image`` and checks that the result is exactly an (RGB/L image, int) pair.
"""

from __future__ import annotations

import io
import pickle
import struct

import numpy as np

__all__ = [
    "JPEG_LABEL",
    "PICKLE",
    "RecordError",
    "encode_jpeg_label",
    "decode_jpeg_label",
    "detect_payload",
    "load_pickled",
    "image_size_of",
]

JPEG_LABEL = "jpeg_label"
PICKLE = "pickle"
MAGIC = b"DJL1"
_HEADER = struct.Struct("<4sqII")
HEADER_SIZE = _HEADER.size  # 20

_ALLOWED_GLOBALS = {("PIL.Image", "Image")}
_ALLOWED_MODES = {"RGB", "L", "RGBA", "CMYK", "P", "I;16", "LA"}
_MAX_PIXELS = 1 << 28


class RecordError(ValueError):
    """A record whose payload is not what the dataset's format says."""


def encode_jpeg_label(image: bytes, label: int, width: int, height: int) -> bytes:
    """One ``jpeg_label`` record: header + the encoded image file's bytes."""
    return _HEADER.pack(MAGIC, int(label), int(width), int(height)) + bytes(image)


def decode_jpeg_label(buf: bytes | memoryview) -> tuple[memoryview, int, int, int]:
    """(encoded image bytes, label, width, height) of a ``jpeg_label`` record; the bytes are a view."""
    if len(buf) < HEADER_SIZE:
        raise RecordError(f"jpeg_label record too short ({len(buf)} bytes)")
    magic, label, width, height = _HEADER.unpack_from(buf, 0)
    if magic != MAGIC:
        raise RecordError(f"not a jpeg_label record (magic {bytes(magic)!r}, expected {MAGIC!r})")
    return memoryview(buf)[HEADER_SIZE:], label, width, height


def detect_payload(buf: bytes | memoryview) -> str:
    """``jpeg_label`` or ``pickle`` from a record's first bytes."""
    head = bytes(buf[:4])
    if head == MAGIC:
        return JPEG_LABEL
    if head[:1] == b"\x80":  # pickle protocol >= 2 starts with PROTO
        return PICKLE
    raise RecordError(f"unknown record payload (first bytes {head!r}); expected jpeg_label or pickle")


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            from PIL import Image

            return Image.Image
        raise pickle.UnpicklingError(
            f"global '{module}.{name}' is not allowed in an image record (only PIL.Image.Image)"
        )

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed in an image record")


def load_pickled(buf: bytes | memoryview):
    """(PIL image, label) from a HFAiLab-layout pickled record, through the restricted unpickler."""
    from PIL import Image

    try:
        obj = _RestrictedUnpickler(io.BytesIO(buf)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, struct.error) as e:
        raise RecordError(f"pickled record rejected: {e}") from None
    if not (isinstance(obj, tuple) and len(obj) == 2):
        raise RecordError(f"pickled record is a {type(obj).__name__}, expected (image, label)")
    img, label = obj
    if type(img) is not Image.Image:
        raise RecordError(f"pickled record holds a {type(img).__name__}, expected a PIL image")
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise RecordError(f"pickled record label is a {type(label).__name__}, expected int")
    w, h = img.size
    if img.mode not in _ALLOWED_MODES or w <= 0 or h <= 0 or w * h > _MAX_PIXELS:
        raise RecordError(f"pickled record image has mode {img.mode!r} size {img.size}")
    return img, int(label)


def image_size_of(encoded: bytes | memoryview) -> tuple[int, int]:
    """(width, height) of an encoded image, read from its header only."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as im:
        return im.size
