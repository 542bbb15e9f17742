"""Opening a photo with Pillow as Image.open does, without changing Pillow's settings or its
registry of plugins: both belong to the whole program that imports the library."""

from __future__ import annotations

import io
import os
import struct
import zlib

from PIL import ExifTags, Image, UnidentifiedImageError

from healthyluncher.errors import LuncherError

# Larger photos than any phone takes (a 200 MP sensor is 16384 x 12288) are refused
# before decoding: a small file can declare a huge canvas (a decompression bomb).
MAX_PIXELS = 210_000_000
# Pillow's own guard, Image.MAX_IMAGE_PIXELS, is a setting of the whole program: Image.open
# warns above it (89 MP by default) and refuses above twice that, so it would refuse the
# 200 MP photo above. `decode` never changes it: it opens photos through Pillow's plugins
# itself, without that guard, and checks MAX_PIXELS instead (or the program's setting, where
# the program lowered it below Pillow's default).
PILLOW_DEFAULT_PIXELS = 1024 * 1024 * 1024 // 4 // 3

# What a plugin raises for a file that is not its format: Image.open then tries the next.
_NOT_THIS_FORMAT = (SyntaxError, IndexError, TypeError, struct.error)

# ISO BMFF major brands (bytes 8-12, after "ftyp") of HEIF files that pillow-heif reads:
# HEVC stills and sequences (heic, heix, ...; every iPhone photo) and generic HEIF.
_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)
_AVIF_BRANDS = frozenset({b"avif", b"avis"})

# The formats luncher reads (README: JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC/HEIF, AVIF), by
# Pillow's format id; MPO is a camera's multi-picture JPEG. A photo is an untrusted file:
# Pillow's other decoders are more code to read it with, and one runs a program on it
# (EPS: Ghostscript, a PostScript interpreter), so a file they recognize is refused unread.
PHOTO_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF", "TIFF", "HEIF", "AVIF"})


def file_brand(data: bytes) -> bytes | None:
    """The major brand of an ISO BMFF file (HEIF, AVIF), None for any other format."""
    return data[8:12] if data[4:8] == b"ftyp" else None


def pixel_limit() -> int:
    """The most pixels a photo may declare: MAX_PIXELS, or the program's
    Image.MAX_IMAGE_PIXELS where it set that below Pillow's default."""
    setting = Image.MAX_IMAGE_PIXELS
    if setting is not None and setting < PILLOW_DEFAULT_PIXELS:
        return min(MAX_PIXELS, setting)
    return MAX_PIXELS


def open_photo(data: bytes, brand: bytes | None, name: str) -> Image.Image:
    """What Image.open does, without its size guard (see PILLOW_DEFAULT_PIXELS): the
    registered plugins of PHOTO_FORMATS in turn, the common ones first (a file that only
    another format recognizes: a LuncherError naming it). A HEIF photo is read by pillow-heif's
    plugin class directly when the program has registered no HEIF plugin with Pillow, so
    Pillow's registry stays as the program left it (its Image.open does not learn HEIF)."""
    if brand in _HEIF_BRANDS and "HEIF" not in Image.OPEN:
        return _heif(data, name)
    prefix = data[:16]
    tried: set[str] = set()
    other: str | None = None  # the first format outside PHOTO_FORMATS that claimed the file
    for load_plugins in (Image.preinit, Image.init):  # Pillow's own lazy set-up
        load_plugins()
        for format_id in [f for f in Image.ID if f not in tried]:
            tried.add(format_id)
            factory, accept = Image.OPEN[format_id]
            # As in Image.open, a check that fails on a short prefix (DIB's on 1 to 3 bytes:
            # struct.error) means not this format. A string: the format is known, but the
            # plugin that reads it is missing.
            try:
                found = accept(prefix) if accept is not None else True
                if not found or isinstance(found, str):
                    continue
                if format_id not in PHOTO_FORMATS:
                    other = other or (format_id if accept is not None else None)
                    continue
                return factory(io.BytesIO(data), "")
            except _NOT_THIS_FORMAT:
                continue
    if other is not None:
        raise LuncherError(f"{name}: not a photo format luncher reads (Pillow reads it as {other})")
    raise UnidentifiedImageError(f"cannot identify image file {name!r}")


def _heif(data: bytes, name: str) -> Image.Image:
    """A HEIC/HEIF photo opened with pillow-heif (imported on the first one: 0.2 s that a
    command which never meets one should not pay), not registered with Pillow."""
    try:
        from pillow_heif import HeifImageFile
    except ImportError:
        raise LuncherError(
            f"{name}: a HEIC/HEIF photo, and pillow-heif is not installed (pip install pillow-heif)"
        ) from None
    # libheif applies the HEIF rotation and mirroring itself, and pillow-heif then resets
    # the EXIF (and XMP) orientation to 1, so `_orientation` reads 1 and the photo is not
    # turned twice. Its options are pillow-heif's globals, the program's too: left alone.
    try:
        image: Image.Image = HeifImageFile(io.BytesIO(data))  # type: ignore[no-untyped-call]
    except _NOT_THIS_FORMAT:  # what it raises for a file libheif cannot read
        raise UnidentifiedImageError(f"cannot identify image file {name!r}") from None
    return image


def unidentified_reason(brand: bytes | None, data: bytes = b"") -> str:
    if _names_a_file(data):  # `lun.predict(str(path).encode())`: bytes are a file's content
        return "these bytes are a file's name, not its content: give the name as a str or Path"
    if brand in _HEIF_BRANDS:
        return "a damaged or unsupported HEIC/HEIF file"
    if brand in _AVIF_BRANDS:
        from PIL import features

        if not features.check("avif"):
            return "an AVIF photo, and this Pillow cannot read AVIF (pip install -U pillow)"
        return "a damaged or unsupported AVIF file"
    return "not an image file Pillow can read"


def _names_a_file(data: bytes) -> bool:
    if len(data) > 4096 or b"\0" in data:
        return False
    try:
        return os.path.exists(os.fsdecode(data.strip()))
    except (ValueError, OSError, UnicodeDecodeError):
        return False


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def without_oversized_metadata(data: bytes) -> bytes | None:
    """The PNG in `data` without its compressed metadata chunks (an ICC profile, text, XMP)
    that unpack to more than Pillow's PngImagePlugin.MAX_TEXT_CHUNK, the program's setting
    (1 MB by default): Pillow refuses the whole file for one (a large printer profile,
    Photoshop's document history), and a photo is read for its pixels. None when `data`
    is not a PNG or holds no such chunk."""
    from PIL import PngImagePlugin

    if not data.startswith(_PNG_SIGNATURE):
        return None
    limit = PngImagePlugin.MAX_TEXT_CHUNK
    # What Pillow unpacks of one file's metadata at most: a hostile file of many chunks
    # unpacking to 1 MB each (1 kB of file) is refused as Pillow refuses it, not unpacked.
    budget = PngImagePlugin.MAX_TEXT_MEMORY
    kept, dropped, at = [data[:8]], False, 8
    while at + 12 <= len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, end = data[at + 4 : at + 8], at + 12 + length
        unpacked = _unpacked(kind, data[at + 8 : min(end - 4, len(data))], limit)
        budget -= unpacked
        if budget < 0:
            return None
        if unpacked > limit:
            dropped = True
        else:
            kept.append(data[at:end])
        at = end
    kept.append(data[at:])
    return b"".join(kept) if dropped else None


def _unpacked(kind: bytes, body: bytes, limit: int) -> int:
    """How many bytes a chunk's compressed content unpacks to, up to `limit` + 1 (0 for a
    chunk that holds none, or whose data does not unpack)."""
    if kind in (b"iCCP", b"zTXt"):  # keyword, NUL, method, deflated data
        packed = body[body.find(b"\0") + 2 :] if b"\0" in body else b""
    elif kind == b"iTXt":  # keyword, NUL, flag, method, language, NUL, keyword, NUL, text
        keyword = body.find(b"\0")
        if keyword < 0 or body[keyword + 1 : keyword + 2] != b"\1":  # flag 0: not compressed
            return 0
        head = body[keyword + 3 :].split(b"\0", 2)
        if len(head) < 3:
            return 0
        packed = head[2]
    else:
        return 0
    try:
        return len(zlib.decompressobj().decompress(packed, limit + 1))
    except zlib.error:
        return 0


TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation_of(image: Image.Image, errors: tuple[type[BaseException], ...]) -> int:
    """The EXIF orientation, 1 (as stored) when the EXIF block is missing or damaged.

    A photo whose metadata is broken is still a photo, so it is read as stored rather than
    refused (`ImageOps.exif_transpose` would also rewrite the EXIF, and can fail doing so).
    `errors`: what Pillow raises for damaged data (imaging's).
    """
    try:
        value = image.getexif().get(ExifTags.Base.Orientation, 1)
    except errors:
        return 1
    except Warning:  # the program's filters made it an error
        return 1
    return value if isinstance(value, int) else 1
