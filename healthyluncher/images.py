"""Finding photos and turning one into the model's input tensor, safely."""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from healthyluncher.config import Preprocessing
from healthyluncher.errors import LuncherError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".jfif"}
)
# Larger photos than any phone takes (a 200 MP sensor is 16384 x 12288) are refused
# before decoding: a small file can declare a huge canvas (a decompression bomb).
MAX_PIXELS = 210_000_000
# Files larger than this are not read into memory at all.
MAX_FILE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class LoadedImage:
    """One decoded photo: its content hash and its model input, (C, H, W) or (H, W, C)."""

    path: Path
    digest: str
    array: np.ndarray


@dataclass(frozen=True)
class ImageFailure:
    path: Path
    error: str


def find_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given, and image files under directories (recursive, sorted)."""
    found: list[Path] = []
    for item in inputs:
        if item.is_dir():
            found.extend(
                sorted(
                    p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                )
            )
        else:
            # A missing file is reported with the others' results, not as a fatal error.
            found.append(item)
    return found


def read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise LuncherError(f"{path}: file is too large ({size / 2**20:.0f} MiB)")
        return path.read_bytes()
    except OSError as exc:
        raise LuncherError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def digest_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def decode(data: bytes, prep: Preprocessing, *, name: str = "image") -> Image.Image:
    """Decode to an upright RGB (or L) image, reduced while its short side stays >= resize."""
    if not data:
        raise LuncherError(f"{name}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width < 1 or height < 1:
                raise LuncherError(f"{name}: image has no pixels")
            if width * height > MAX_PIXELS:
                raise LuncherError(f"{name}: image is too large ({width}x{height} pixels)")
            # JPEG only: let libjpeg decode at 1/2, 1/4 or 1/8 scale while the short side
            # stays at least `resize`. A 12 MP phone photo then decodes in a fraction of
            # the time and memory.
            scale = prep.resize / min(width, height)
            if scale < 1:
                image.draft("RGB", (math.ceil(width * scale), math.ceil(height * scale)))
            image = ImageOps.exif_transpose(image)
            image = _to_display_mode(image, prep.channels)
    except LuncherError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise LuncherError(f"{name}: image is too large to decode safely") from None
    except (OSError, SyntaxError, ValueError, EOFError, TypeError) as exc:
        reason = str(exc).strip() or type(exc).__name__
        if isinstance(exc, Image.UnidentifiedImageError):
            reason = "not an image file Pillow can read"
        raise LuncherError(f"{name}: cannot decode image: {reason}") from None
    return image


def _to_display_mode(image: Image.Image, channels: int) -> Image.Image:
    """Any mode (palette, alpha, CMYK, 16-bit, float) to 8-bit RGB or L."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16-bit and float greyscale: stretch to 8 bits by the image's own range.
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        image = Image.fromarray(((values - low) * (255.0 / span)).astype(np.uint8), "L")
    if image.mode == "P":
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


def resize_and_crop(image: Image.Image, prep: Preprocessing) -> Image.Image:
    """Resize the short side to `prep.resize`, then take the centre `height` x `width`."""
    width, height = image.size
    scale = prep.resize / min(width, height)
    new_w = max(prep.width, round(width * scale))
    new_h = max(prep.height, round(height * scale))
    if (new_w, new_h) != (width, height):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left = (new_w - prep.width) // 2
    top = (new_h - prep.height) // 2
    return image.crop((left, top, left + prep.width, top + prep.height))


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


def load(path: Path, prep: Preprocessing) -> LoadedImage:
    data = read_bytes(path)
    image = resize_and_crop(decode(data, prep, name=str(path)), prep)
    return LoadedImage(path=path, digest=digest_of(data), array=to_tensor(image, prep))


def load_many(
    paths: Iterable[Path], prep: Preprocessing, *, workers: int = 2
) -> Iterator[LoadedImage | ImageFailure]:
    """Decode photos on background threads (Pillow releases the GIL) in input order."""

    def safe_load(path: Path) -> LoadedImage | ImageFailure:
        try:
            return load(path, prep)
        except LuncherError as exc:
            return ImageFailure(path=path, error=str(exc))
        except MemoryError:
            return ImageFailure(path=path, error=f"{path}: out of memory while decoding")

    paths = list(paths)
    if workers <= 1 or len(paths) <= 1:
        yield from map(safe_load, paths)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        # Keep only a small window of decoded photos in flight: memory stays flat however
        # many photos there are.
        window = workers * 4
        pending = [pool.submit(safe_load, p) for p in paths[:window]]
        next_index = len(pending)
        while pending:
            result = pending.pop(0).result()
            if next_index < len(paths):
                pending.append(pool.submit(safe_load, paths[next_index]))
                next_index += 1
            yield result


def augmented_views(image: Image.Image, prep: Preprocessing, count: int, seed: int) -> np.ndarray:
    """The centre crop plus `count - 1` random views: (count, *sample_shape) float32.

    Views vary the crop (60-100% of the short side, anywhere in the photo), mirror it, and
    shift brightness, contrast and saturation by up to 15%: what a second photo of the
    same plate would change. The seed makes them repeatable, so views can be cached.
    """
    from PIL import ImageEnhance

    resized = resize_short_side(image, prep.resize)
    views = [to_tensor(resize_and_crop(resized, prep), prep)]
    rng = np.random.default_rng(seed)
    width, height = resized.size
    for _ in range(count - 1):
        side = min(width, height) * rng.uniform(0.6, 1.0)
        aspect = prep.width / prep.height
        crop_w = min(width, side * aspect)
        crop_h = min(height, side)
        left = rng.uniform(0, width - crop_w)
        top = rng.uniform(0, height - crop_h)
        view = resized.resize(
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


def load_views(path: Path, prep: Preprocessing, count: int) -> LoadedImage:
    """Like `load`, with `count` augmented views stacked: array is (count, *sample_shape)."""
    data = read_bytes(path)
    digest = digest_of(data)
    image = decode(data, prep, name=str(path))
    seed = int(digest[:8], 16)
    return LoadedImage(path=path, digest=digest, array=augmented_views(image, prep, count, seed))
