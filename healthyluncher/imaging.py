"""Decoding a photo safely, and turning it into the model's input tensor or augmented views."""

from __future__ import annotations

import io
import itertools
import math
import os
import struct
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from healthyluncher.errors import LuncherError
from healthyluncher.openers import (
    TRANSPOSE,
    file_brand,
    open_photo,
    orientation_of,
    pixel_limit,
    unidentified_reason,
    without_oversized_metadata,
)
from healthyluncher.photos import ImageFailure, MemoryPhoto, PhotoSource, digest_of, read_bytes
from healthyluncher.settings import Preprocessing

# What Pillow raises for a damaged or hostile file, besides its own exception types.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    TypeError,
    KeyError,
    IndexError,
    ZeroDivisionError,
    struct.error,
    # pillow-heif's "some other error" from libheif (a damaged HEIC can raise it on load).
    RuntimeError,
)


# A photo as the public API takes it: a file's path, a photo file's bytes (an upload), a PIL
# image, a (H, W, 3) uint8 array, or a result's MemoryPhoto handed back;
# `arguments.photo_sources` makes each a PhotoSource. Defined here, where Pillow and numpy
# are imported anyway (the API names it for type checkers only, so that `import
# healthyluncher` does not import them).
PhotoInput: TypeAlias = (
    str | os.PathLike[str] | bytes | bytearray | memoryview | Image.Image | np.ndarray | MemoryPhoto
)


@dataclass(frozen=True)
class LoadedImage:
    """One decoded photo: its content hash and its model input, (C, H, W) or (H, W, C)."""

    path: PhotoSource
    digest: str
    array: np.ndarray


def from_pixels(image: Any, name: str, *, former: bool = False) -> MemoryPhoto:
    """A PIL image, or a (H, W, 3) or (H, W) uint8 array, as a photo (lossless PNG bytes).

    What is no picture at all is a LuncherError. A picture that cannot be used (an empty or
    too large array, an image that does not load: an upload cut short) is a photo that fails
    when it is read, as a damaged file does: `predict_each` reports it and goes on, and a
    retrain skips it."""
    if isinstance(image, np.ndarray):
        if (
            image.dtype != np.uint8
            or image.ndim not in (2, 3)
            or (image.ndim == 3 and image.shape[2] not in (3, 4))
        ):
            raise LuncherError(
                f"{name}: a numpy photo must be uint8 with shape (H, W, 3), (H, W, 4) or "
                f"(H, W), not {image.dtype} {image.shape}"
            )
    elif not isinstance(image, Image.Image):
        raise LuncherError(
            f"{name}: expected a path, a photo file's bytes, a PIL image or a numpy uint8 "
            f"array, not {type(image).__name__}"
        )
    try:
        data = _lossless(image, name)
        # `former` (forget): a PIL image turned upright had another copy, and digest, before
        # luncher turned it: a photo taught from it then is found by that digest too.
        turned = former and isinstance(image, Image.Image)
        turned = turned and orientation_of(image, _DECODE_ERRORS) in TRANSPOSE
        also = (digest_of(_lossless(image, name, turn=False)),) if turned else ()
        return MemoryPhoto(name, data, also=also)
    except LuncherError as exc:
        return MemoryPhoto(name, b"", unusable=str(exc).removeprefix(f"{name}: "))


def _lossless(image: Image.Image | np.ndarray, name: str, *, turn: bool = True) -> bytes:
    if isinstance(image, np.ndarray):
        if image.size == 0:
            raise LuncherError(f"{name}: the array is empty")
        _refuse_too_large(name, image.shape[1], image.shape[0])  # before copying it
        image = Image.fromarray(np.ascontiguousarray(image))
    _refuse_too_large(name, *image.size)  # as a file declaring that size is, unencoded
    buffer = io.BytesIO()
    try:
        # Upright, as its file would be (`decode`): Image.open keeps the EXIF orientation
        # beside the pixels as stored, and neither PNG nor TIFF below would write it. A TIFF
        # turns itself as it loads, so the orientation is read after loading.
        image.load()
        orientation = orientation_of(image, _DECODE_ERRORS)
        if orientation in TRANSPOSE and turn:
            image = image.transpose(TRANSPOSE[orientation])
        if image.mode in _UNSTORED_MODES:  # modes no file format stores
            image = image.convert(_UNSTORED_MODES[image.mode])
        elif image.mode in ("I;16L", "I;16N"):  # I;16's pixels; convert() clips them to 255
            image = Image.fromarray(np.asarray(image).astype("<u2"))
        # PNG holds 1, L, LA, P, RGB, RGBA and 16-bit grey; TIFF the rest (CMYK, LAB, I,
        # F, PA, RGBX), read back as a file in that mode is, uncompressed unless `info`
        # names a lossless compression (Pillow's TIFF writer takes `info`'s: a JPEG-
        # compressed scan's is lossy, a fax's Group 4 holds only 1-bit pixels).
        # A program's `info["icc_profile"]` that is no bytes made the writers raise
        # TypeError: it is left out (decoding applies no profile).
        icc = image.info.get("icc_profile")
        odd: dict[str, Any] = {} if isinstance(icc, (bytes, type(None))) else {"icc_profile": None}
        if image.mode in _PNG_MODES:
            image.save(buffer, "PNG", compress_level=1, **odd)
        else:
            kept = image.info.get("compression")  # a lossless one: the copy is as it was
            packing = kept if kept in _LOSSLESS_TIFF else "raw"
            image.save(buffer, "TIFF", compression=packing, **odd)
    # Loading a lazily opened image fails as decoding its file does; odd `info` a writer
    # cannot store fails with ValueError or TypeError.
    except (*_DECODE_ERRORS, Warning, Image.DecompressionBombError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise LuncherError(f"{name}: cannot use this image ({reason})") from None
    return buffer.getvalue()


# TIFF compressions that keep every pixel in every mode (the copy's digest is as before).
_LOSSLESS_TIFF = frozenset({"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"})
_PNG_MODES = frozenset({"1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B"})
# YCbCr: Pillow 12's TIFF writer stores it so that its reader finds the file cut short.
_UNSTORED_MODES = {"HSV": "RGB", "La": "LA", "RGBa": "RGBA", "YCbCr": "RGB"}


def _refuse_too_large(name: str, width: int, height: int) -> None:
    if width * height > pixel_limit():
        raise LuncherError(f"{name}: image is too large ({width}x{height} pixels)")


def decode(data: bytes, prep: Preprocessing, *, name: str = "image") -> Image.Image:
    """Decode to an upright RGB (or L) image, reduced while its short side stays >= resize."""
    if not data:
        raise LuncherError(f"{name}: empty file")
    brand = file_brand(data)
    width = height = 0
    try:
        image = open_photo(data, brand, name)
        width, height = image.size
        if width < 1 or height < 1:
            raise LuncherError(f"{name}: image has no pixels")
        _refuse_too_large(name, width, height)
        # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side
        # stays at least `resize`. A 12 MP phone photo then decodes in a fraction of
        # the time and memory.
        scale = prep.resize / min(width, height)
        if scale < 1:
            image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
        image.load()
        orientation = orientation_of(image, _DECODE_ERRORS)
        image = shrink(image, prep.resize)
        if orientation in TRANSPOSE:
            image = image.transpose(TRANSPOSE[orientation])
        image = _to_display_mode(image, prep.channels)
    except LuncherError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = " ".join(str(exc).split())  # Pillow's own guard (WebP, TIFF, GIF): its limit
        raise LuncherError(f"{name}: image is too large to decode safely ({reason})") from None
    except MemoryError:
        raise LuncherError(f"{name}: out of memory decoding a {width}x{height} image") from None
    except (*_DECODE_ERRORS, Warning) as exc:
        # A PNG whose ICC profile or XMP unpacks to more than Pillow reads of one chunk: its
        # pixels are read without them (luncher uses neither).
        lighter = without_oversized_metadata(data) if isinstance(exc, ValueError) else None
        if lighter is not None:
            return decode(lighter, prep, name=name)
        # Pillow warns about damaged metadata it recovers from, through the program's
        # warning filters: a program that turns warnings into errors gets this error.
        # Pillow's messages are short, but one line is a promise to the CLI's output.
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, UnidentifiedImageError):
            reason = unidentified_reason(brand, data)
        raise LuncherError(f"{name}: cannot decode image: {reason}") from None
    return image


# Rows of a large image converted at a time while it is shrunk (times the factor).
_BAND_ROWS = 8


def shrink(image: Image.Image, resize: int) -> Image.Image:
    """A decoded image whose short side is at least twice `resize`, reduced by an integer
    factor (the mean of each factor x factor block) so that it stays at least that: what
    JPEG's draft mode does while decoding, for every other format after it. The image is
    converted and reduced a band of rows at a time, so a 200-megapixel PNG with alpha costs
    its decoded size once, not the four full-size copies its conversion to RGB would make.
    Alpha is averaged premultiplied (as compositing onto white then averaging would), a
    palette is expanded per band, and the photo's meaning (16-bit white, transparency) is
    kept for `_to_display_mode`."""
    width, height = image.size
    factor = min(width, height) // (2 * resize)
    if factor < 2:
        return image
    mode, back = _reducible_mode(image)
    out_size = (-(-width // factor), -(-height // factor))
    out = Image.new(mode, out_size)
    rows = _BAND_ROWS * factor
    for top in range(0, height, rows):
        band = image.crop((0, top, width, min(height, top + rows)))
        if band.mode != mode:
            band = band.convert("RGBA" if mode == "RGBa" and band.mode != "RGBA" else mode)
            if band.mode != mode:
                band = band.convert(mode)
        out.paste(band.reduce(factor), (0, top // factor))
    return out.convert(back) if back != mode else out


def _reducible_mode(image: Image.Image) -> tuple[str, str]:
    """(the mode to average the image in, the mode to hand on)."""
    mode = image.mode
    transparent = "transparency" in image.info
    if mode == "P" or mode == "PA" or (mode in ("L", "RGB") and transparent):
        return "RGBa", "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        return ("La", "LA") if mode in ("LA", "La") else ("RGBa", "RGBA")
    if mode == "1":
        return "L", "L"
    if mode.startswith("I;16"):
        return "I", "I;16"  # 65535 stays white (see _to_display_mode)
    return mode, mode


def _to_display_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any mode (palette, alpha, CMYK, 16-bit, float) to 8-bit RGB or L."""
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: 65535 is white, as a viewer shows it, so the photo reads the
        # same as its 8-bit copy (stretching its range would brighten a dark photo).
        image = _grey(np.asarray(image, dtype=np.float32) / 257.0)
    elif image.mode in ("I", "F"):
        # 32-bit integer or float greyscale has no fixed white: stretch the image's own
        # finite range to 0..255. A flat image keeps its value; NaN counts as the darkest.
        # In float64: the range of float32 values at its edges (3e38 - -3e38) overflows.
        values = np.asarray(image, dtype=np.float64)
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
        if high > low:
            values = (values - low) * (255.0 / (high - low))
        image = _grey(values)
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        # A palette, or one colour marked transparent (PNG tRNS): spell the alpha out.
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent areas become white, as an image viewer shows them.
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    target = "RGB" if channels == 3 else "L"
    if image.mode != target:
        image = image.convert(target)
    image.load()
    return image


def _grey(values: np.ndarray) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to `prep.resize`, then take the centre `height` x `width`.

    Only the centre is resampled: resizing the whole image first would turn a 10000x1
    strip into 2560000x256 pixels (2 GB) on the way to a 224x224 crop.
    """
    width, height = image.size
    scale = prep.resize / min(width, height)
    new_w = max(prep.width, round(width * scale))
    new_h = max(prep.height, round(height * scale))
    left = (new_w - prep.width) // 2
    top = (new_h - prep.height) // 2
    if (new_w, new_h) == (width, height):
        return image.crop((left, top, left + prep.width, top + prep.height))
    # The same crop in the original's coordinates.
    x_scale, y_scale = new_w / width, new_h / height
    box = (
        left / x_scale,
        top / y_scale,
        (left + prep.width) / x_scale,
        (top + prep.height) / y_scale,
    )
    return image.resize((prep.width, prep.height), Image.Resampling.BILINEAR, box=box)


def to_tensor(image: Image.Image, prep: Preprocessing) -> np.ndarray:
    """(H, W, C) pixels to the normalized float32 array of one sample, in the model's layout."""
    pixels = np.asarray(image, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean = np.asarray(prep.mean[: prep.channels], dtype=np.float32)
    std = np.asarray(prep.std[: prep.channels], dtype=np.float32)
    pixels = (pixels - mean) / std
    if prep.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


def load(path: PhotoSource, prep: Preprocessing, small: int | None = None) -> LoadedImage:
    """`small`: the photo as a thumbnail of it comes, its short side that many pixels."""
    data = read_bytes(path)
    image = decode(data, prep, name=str(path))
    if small is not None and min(image.size) > small:
        image = resize_short_side(image, small)
    image = resize_and_crop(image, prep)
    return LoadedImage(path=path, digest=digest_of(data), array=to_tensor(image, prep))


def load_many(
    paths: Iterable[PhotoSource], prep: Preprocessing, *, workers: int = 2, small: int | None = None
) -> Iterator[LoadedImage | ImageFailure]:
    """Decode photos on background threads (Pillow releases the GIL) in input order."""

    def safe_load(path: PhotoSource) -> LoadedImage | ImageFailure:
        try:
            return load(path, prep, small)
        except LuncherError as exc:
            return ImageFailure(path=path, error=str(exc))
        except MemoryError:
            return ImageFailure(path=path, error=f"{path}: out of memory while decoding")

    # Read as the results are taken: a program's generator of photos streams.
    rest = iter(paths)
    head = list(itertools.islice(rest, 2))
    if workers <= 1 or len(head) <= 1:
        yield from map(safe_load, itertools.chain(head, rest))
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        # Keep only a small window of photos in flight: memory stays flat however many
        # photos there are.
        window = workers * 4
        first = itertools.islice(itertools.chain(head, rest), window)
        pending = deque(pool.submit(safe_load, p) for p in first)
        while pending:
            result = pending.popleft().result()
            pending.extend(pool.submit(safe_load, p) for p in itertools.islice(rest, 1))
            yield result


def augmented_views(image: Image.Image, prep: Preprocessing, count: int, seed: int) -> np.ndarray:
    """The centre crop plus `count - 1` random views: (count, *sample_shape) float32.

    Views vary the crop (60-100% of the short side, anywhere in the photo), mirror it, and
    shift brightness, contrast and saturation by up to 15%: what a second photo of the
    same plate would change. The seed makes them repeatable, so views can be cached.
    """
    from PIL import ImageEnhance

    views = [to_tensor(resize_and_crop(image, prep), prep)]  # what `load` gives
    # Crops come from a copy shrunk to the model's scale, which is cheaper to resample;
    # a smaller photo is cropped as it is (enlarging all of it could take gigabytes).
    source = resize_short_side(image, prep.resize) if min(image.size) > prep.resize else image
    rng = np.random.default_rng(seed)
    width, height = source.size
    for _ in range(count - 1):
        side = min(width, height) * rng.uniform(0.6, 1.0)
        aspect = prep.width / prep.height
        crop_w = min(width, side * aspect)
        crop_h = min(height, side)
        left = rng.uniform(0, width - crop_w)
        top = rng.uniform(0, height - crop_h)
        view = source.resize(
            (prep.width, prep.height),
            Image.Resampling.BILINEAR,
            box=(left, top, left + crop_w, top + crop_h),
        )
        if rng.random() < 0.5:
            view = ImageOps.mirror(view)
        view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.85, 1.15))
        view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.85, 1.15))
        if view.mode == "RGB":
            view = ImageEnhance.Color(view).enhance(rng.uniform(0.85, 1.15))
        views.append(to_tensor(view, prep))
    return np.stack(views)


def resize_short_side(image: Image.Image, short: int) -> Image.Image:
    width, height = image.size
    scale = short / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.BILINEAR)
