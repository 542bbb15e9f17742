"""Image input: every mode, orientation and broken file becomes a tensor or one clear error."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from healthyluncher import imaging as images
from healthyluncher import openers
from healthyluncher import photos as photo_files
from healthyluncher.cli import app
from healthyluncher.errors import LuncherError
from healthyluncher.imaging import (
    LoadedImage,
    augmented_views,
    decode,
    load,
    load_many,
    resize_and_crop,
    to_tensor,
)
from healthyluncher.openers import PILLOW_DEFAULT_PIXELS
from healthyluncher.photos import ImageFailure, digest_of, find_images, read_bytes
from healthyluncher.settings import Preprocessing
from tests.models import pytorch_style

# Small sizes keep every test fast; the arithmetic is the same as at 224.
NCHW = Preprocessing(height=8, width=8, resize=10, layout="NCHW")
NHWC = Preprocessing(height=8, width=8, resize=10, layout="NHWC")
MEAN = np.array(NCHW.mean, dtype=np.float32)
STD = np.array(NCHW.std, dtype=np.float32)

WHITE = (255, 255, 255)
RED = (255, 0, 0)
BLUE = (0, 0, 255)


def normalized(rgb: tuple[int, int, int]) -> np.ndarray:
    """The tensor value of one pixel of this colour, per channel: (3,)."""
    return (np.array(rgb, dtype=np.float32) - MEAN) / STD


def save(image: Image.Image, path: Path, **options: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def encoded(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def halves(size: tuple[int, int], left: tuple[int, int, int], right: tuple[int, int, int]):
    """An RGB image whose left half is one colour and right half another."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def png_declaring(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims width x height: a bomb costs a few dozen bytes."""
    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def assert_one_line_error(error: BaseException | str, path: Path | str) -> str:
    message = str(error)
    assert str(path) in message
    assert "\n" not in message and "Traceback" not in message
    return message


# -- modes -------------------------------------------------------------------------------


def _palette(transparent: bool) -> Image.Image:
    image = Image.new("P", (12, 10), 1)
    image.putpalette([*RED, *BLUE] + [0] * (256 * 3 - 6))
    if transparent:
        image.info["transparency"] = 1
    return image


# name -> (write the file, the colour every pixel should read as)
MODES: dict[str, tuple[Callable[[Path], Path], tuple[int, int, int]]] = {
    "RGB": (lambda d: save(Image.new("RGB", (12, 10), RED), d / "rgb.png"), RED),
    "RGBA transparent": (
        lambda d: save(Image.new("RGBA", (12, 10), (0, 0, 0, 0)), d / "rgba.png"),
        WHITE,
    ),
    "RGBA half transparent": (
        lambda d: save(Image.new("RGBA", (12, 10), (0, 0, 0, 128)), d / "rgba_half.png"),
        (127, 127, 127),
    ),
    "LA transparent": (lambda d: save(Image.new("LA", (12, 10), (0, 0)), d / "la.png"), WHITE),
    "LA opaque": (lambda d: save(Image.new("LA", (12, 10), (60, 255)), d / "la2.png"), (60,) * 3),
    "P": (lambda d: save(_palette(False), d / "p.png"), BLUE),
    "P transparent": (lambda d: save(_palette(True), d / "p_trns.png"), WHITE),
    "P GIF transparent": (lambda d: save(_palette(True), d / "p.gif", transparency=1), WHITE),
    "L": (lambda d: save(Image.new("L", (12, 10), 80), d / "l.png"), (80,) * 3),
    "L with tRNS": (
        lambda d: save(Image.new("L", (12, 10), 80), d / "l_trns.png", transparency=80),
        WHITE,
    ),
    "1": (lambda d: save(Image.new("1", (12, 10), 1), d / "one.png"), WHITE),
    "CMYK": (lambda d: save(Image.new("CMYK", (12, 10), (0, 255, 255, 0)), d / "c.tif"), RED),
    # 16-bit greyscale: 65535 is white, so 30000 reads as round(30000 / 257) = 117.
    "I;16": (lambda d: save(Image.new("I;16", (12, 10), 30000), d / "i16.png"), (117,) * 3),
    # 32-bit int and float have no fixed white: a flat image keeps its value.
    "I": (lambda d: save(Image.new("I", (12, 10), 90), d / "i.tif"), (90,) * 3),
    "F": (lambda d: save(Image.new("F", (12, 10), 200.0), d / "f.tif"), (200,) * 3),
}


@pytest.mark.parametrize("prep", [NCHW, NHWC], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_becomes_the_expected_tensor(tmp_path, mode, prep):
    write, colour = MODES[mode]
    path = write(tmp_path)
    loaded = load(path, prep)
    assert isinstance(loaded, LoadedImage) and loaded.path == path
    assert loaded.array.dtype == np.float32
    expected = normalized(colour)
    if prep.layout == "NCHW":
        assert loaded.array.shape == (3, 8, 8)
        expected = expected[:, None, None]
    else:
        assert loaded.array.shape == (8, 8, 3)
    np.testing.assert_allclose(
        loaded.array, np.broadcast_to(expected, loaded.array.shape), atol=1e-5
    )


def test_the_file_really_has_the_mode_under_test(tmp_path):
    """Guards the table above: Pillow must reopen each file in the mode it is named after."""
    opened = {}
    for mode, (write, _) in MODES.items():
        with Image.open(write(tmp_path)) as image:
            opened[mode] = image.mode
    assert opened["RGBA transparent"] == "RGBA"
    assert opened["LA transparent"] == "LA"
    assert opened["P"] == opened["P transparent"] == opened["P GIF transparent"] == "P"
    assert opened["1"] == "1"
    assert opened["CMYK"] == "CMYK"
    assert opened["I;16"] == "I;16"
    assert opened["I"] == "I"
    assert opened["F"] == "F"


def test_greyscale_model_gets_one_channel(tmp_path):
    prep = Preprocessing(height=8, width=8, resize=10, mean=(100.0,), std=(50.0,), channels=1)
    path = save(Image.new("RGBA", (12, 10), (0, 0, 0, 0)), tmp_path / "clear.png")
    loaded = load(path, prep)
    assert loaded.array.shape == (1, 8, 8)
    np.testing.assert_allclose(loaded.array, (255 - 100) / 50, atol=1e-5)
    nhwc = load(path, Preprocessing(**{**prep.to_json(), "layout": "NHWC"}))
    assert nhwc.array.shape == (8, 8, 1)


def test_sixteen_bit_photo_reads_like_its_eight_bit_copy(tmp_path):
    ramp = np.tile(np.linspace(0, 40000, 12), (10, 1))  # a dark photo: top at 40000 of 65535
    wide = save(Image.fromarray(ramp.astype(np.uint16)), tmp_path / "wide.png")
    narrow = save(Image.fromarray(np.rint(ramp / 257).astype(np.uint8)), tmp_path / "narrow.png")
    with Image.open(wide) as image:
        assert image.mode == "I;16"
    difference = np.abs(load(wide, NCHW).array - load(narrow, NCHW).array)
    assert difference.max() <= 1.01 / STD.min()  # at most one grey level apart


def test_float_and_int_images_stretch_their_own_range(tmp_path):
    values = np.where(np.arange(12) < 6, -1.0, 3.0).astype(np.float32)
    values = np.tile(values, (10, 1))
    values[0, 0] = np.nan  # does not poison the range
    path = save(Image.fromarray(values, "F"), tmp_path / "f.tif")
    pixels = np.asarray(decode(path.read_bytes(), NCHW))
    assert pixels[5, 1].tolist() == [0, 0, 0]
    assert pixels[5, 10].tolist() == [255, 255, 255]

    ints = np.where(np.arange(12) < 6, 1000, 3000).astype(np.int32)
    path = save(Image.fromarray(np.tile(ints, (10, 1)), "I"), tmp_path / "i.tif")
    pixels = np.asarray(decode(path.read_bytes(), NCHW))
    assert pixels[5, 1].tolist() == [0, 0, 0] and pixels[5, 10].tolist() == [255, 255, 255]


# -- orientation --------------------------------------------------------------------------


def jpeg_with_orientation(path: Path, orientation: int) -> Path:
    """A 60x40 JPEG stored with its left half red and right half blue."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return save(halves((60, 40), RED, BLUE), path, exif=exif.tobytes(), quality=95)


@pytest.mark.parametrize(
    ("orientation", "upright_size", "red_where"),
    [
        (1, (60, 40), "left"),
        (3, (60, 40), "right"),
        (6, (40, 60), "top"),  # the camera was turned clockwise: the left edge is the top
        (8, (40, 60), "bottom"),
    ],
)
def test_exif_orientation_is_applied_before_cropping(
    tmp_path, orientation, upright_size, red_where
):
    path = jpeg_with_orientation(tmp_path / "photo.jpg", orientation)
    exact = Preprocessing(height=8, width=8, resize=40)  # no JPEG draft: the size stays exact
    assert decode(path.read_bytes(), exact).size == upright_size

    prep = Preprocessing(height=8, width=8, resize=8)  # the crop keeps most of the photo
    red = load(path, prep).array[0]  # (8, 8): the red channel
    edges = {"left": red[:, 0], "right": red[:, -1], "top": red[0, :], "bottom": red[-1, :]}
    opposite = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
    assert (edges[red_where] > normalized(RED)[0] - 0.3).all()
    assert (edges[opposite[red_where]] < normalized(BLUE)[0] + 0.3).all()


def test_a_damaged_exif_block_is_read_as_stored_and_pillow_warns_the_program(tmp_path):
    """Pillow's warning about the damage goes through the program's own warning filters
    (the library sets none: they are the whole process's), shown, hidden or an error as the
    program chose. The CLI, whose process it is, hides Pillow's warnings."""
    exif = b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff"
    path = save(halves((60, 40), RED, BLUE), tmp_path / "odd.jpg", exif=exif)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        width, height = decode(path.read_bytes(), NCHW).size
        assert load(path, NCHW).array.shape == (3, 8, 8)
    assert width > height  # as stored: the broken orientation entry is ignored
    assert [w for w in shown if "PIL" in w.filename]
    with warnings.catch_warnings():
        # A program that makes warnings errors: its own Image.open refuses this photo, and
        # so does the library, in one line (not with Pillow's UserWarning).
        warnings.simplefilter("error")
        with pytest.raises(LuncherError) as caught:
            load(path, NCHW)
        assert "Corrupt EXIF" in assert_one_line_error(caught.value, path)


def test_a_float_photo_at_the_edges_of_float32_is_stretched_without_overflow(tmp_path):
    """Its range (3e38 - -3e38) overflowed float32: every pixel became NaN, then black, and
    numpy warned the program (luncher printed the warning)."""
    extreme = tmp_path / "extreme.tiff"
    Image.fromarray(np.array([[3e38] * 8 + [-3e38] * 8] * 8, np.float32)).save(extreme)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = decode(extreme.read_bytes(), NCHW)
    grey = np.asarray(image.convert("L"))
    assert (
        grey[:, : grey.shape[1] // 2 - 1].min() == 255
        and grey[:, grey.shape[1] // 2 + 1 :].max() == 0
    )


def test_luncher_prints_no_warning_for_a_photo_it_reads(run, tmp_path):
    """`luncher` hid Pillow's warnings but not numpy's about a float TIFF's extreme values."""
    from tests.test_conventions import luncher

    assert run("make-updatable", pytorch_style(tmp_path / "tiny.onnx")).code == 0
    extreme = tmp_path / "extreme.tiff"
    Image.fromarray(np.array([[3e38, -3e38] * 20] * 30, np.float32)).save(extreme)
    done = luncher("predict", str(extreme))
    assert done.returncode == 0 and done.stderr == "", done.stderr


# -- broken and odd files -----------------------------------------------------------------


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header (SOF0) claims width x height."""
    data = bytearray(encoded(_noise((16, 16)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


JPEG = encoded(_noise((64, 48)), "JPEG", quality=90)
PNG = encoded(_noise((64, 48)), "PNG")


def _file(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(directory: Path) -> Path:
        path = directory / name
        path.write_bytes(data)
        return path

    return make


def _directory(directory: Path) -> Path:
    path = directory / "album.jpg"
    path.mkdir()
    return path


# name -> (make the path, words the message must contain)
BROKEN: dict[str, tuple[Callable[[Path], Path], str]] = {
    "empty": (_file("empty.jpg", b""), "empty file"),
    "random bytes": (_file("noise.jpg", np.random.default_rng(2).bytes(4096)), "not an image"),
    "truncated JPEG": (_file("cut.jpg", JPEG[: len(JPEG) // 2]), "cannot decode"),
    "truncated PNG": (_file("cut.png", PNG[: len(PNG) // 2]), "cannot decode"),
    "PNG signature only": (_file("sig.png", PNG[:8]), "cannot decode"),
    "text named .jpg": (_file("notes.jpg", b"lunch: salad, soup\n" * 20), "not an image"),
    "directory": (_directory, "is a directory"),
    "missing": (lambda d: d / "gone.jpg", "No such file"),
    "PNG bomb": (_file("bomb.png", png_declaring(30_000, 30_000)), "too large"),
    "JPEG bomb": (_file("bomb.jpg", jpeg_declaring(65_535, 65_535)), "too large"),
    "zero width": (_file("flat.png", png_declaring(0, 10)), "cannot decode"),
}


def load_views(path: Path, prep: Preprocessing, count: int) -> LoadedImage:
    """A photo's augmented views, decoded as the embedder decodes a photo not in its cache."""
    data = read_bytes(path)
    digest = digest_of(data)
    image = decode(data, prep, name=str(path))
    views = augmented_views(image, prep, count, int(digest[:8], 16))
    return LoadedImage(path=path, digest=digest, array=views)


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_files_raise_one_line_naming_the_file(tmp_path, case):
    make, words = BROKEN[case]
    path = make(tmp_path)
    with pytest.raises(LuncherError) as caught:
        load(path, NCHW)
    assert type(caught.value) is LuncherError
    assert words in assert_one_line_error(caught.value, path)
    with pytest.raises(LuncherError):
        load_views(path, NCHW, 3)
    assert list(load_many([path], NCHW)) == [ImageFailure(path, str(caught.value))]


def test_bombs_are_refused_before_any_pixel_is_decoded():
    for data in (png_declaring(30_000, 30_000), jpeg_declaring(65_535, 65_535)):
        assert len(data) < 1000
        with pytest.raises(LuncherError, match="bomb.png: image is too large"):
            decode(data, NCHW, name="bomb.png")


@pytest.mark.parametrize("size", [(10_000, 10_000), (16_384, 12_288)])
def test_photos_up_to_max_pixels_are_not_called_too_large(size):
    """100 MP and 200 MP are real cameras: Pillow's own 89/179 MP guard must not refuse them."""
    assert size[0] * size[1] <= openers.MAX_PIXELS
    with pytest.raises(LuncherError) as caught:
        decode(png_declaring(*size), NCHW, name="big.png")  # declared, but no pixel data
    assert "too large" not in str(caught.value)
    assert "truncated" in str(caught.value)


def test_a_file_over_the_size_limit_is_not_read(tmp_path, monkeypatch):
    path = _file("big.png", PNG)(tmp_path)
    monkeypatch.setattr(photo_files, "MAX_FILE_BYTES", len(PNG) - 1)
    with pytest.raises(LuncherError) as caught:
        load(path, NCHW)
    assert "too large" in assert_one_line_error(caught.value, path)
    monkeypatch.setattr(photo_files, "MAX_FILE_BYTES", len(PNG))
    assert read_bytes(path) == PNG


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="named pipes are POSIX")
def test_a_named_pipe_is_refused_instead_of_blocking(tmp_path):
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def attempt() -> None:
        try:
            load(path, NCHW)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever it was
            outcome.append(exc)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(timeout=10)
    if worker.is_alive():  # unblock the reader so the test process can exit
        with open(path, "wb"):
            pass
        pytest.fail("reading a named pipe blocked")
    assert isinstance(outcome[0], LuncherError)
    assert "not a regular file" in assert_one_line_error(outcome[0], path)


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="needs /dev/null")
def test_a_device_is_refused_unread():
    """/dev/zero or /dev/urandom would be read until memory runs out; /dev/null shows the rule."""
    with pytest.raises(LuncherError, match="not a regular file"):
        load(Path("/dev/null"), NCHW)


@pytest.mark.skipif(
    sys.platform == "win32" or os.geteuid() == 0, reason="root reads any file; POSIX modes"
)
def test_an_unreadable_file_says_so(tmp_path):
    path = _file("secret.png", PNG)(tmp_path)
    path.chmod(0)
    with pytest.raises(LuncherError, match="Permission denied"):
        load(path, NCHW)


def test_a_one_pixel_image_fills_the_crop(tmp_path):
    path = save(Image.new("RGB", (1, 1), (10, 200, 30)), tmp_path / "dot.png")
    for prep in (NCHW, NHWC):
        array = load(path, prep).array
        expected = normalized((10, 200, 30))
        expected = expected[:, None, None] if prep.layout == "NCHW" else expected
        np.testing.assert_allclose(array, np.broadcast_to(expected, array.shape), atol=1e-5)
    assert load_views(path, NCHW, 4).array.shape == (4, 3, 8, 8)


@pytest.fixture
def resize_sizes(monkeypatch) -> list[tuple[int, int]]:
    """Every size Pillow is asked to resize to, to catch huge intermediate images."""
    sizes: list[tuple[int, int]] = []
    original = Image.Image.resize

    def recording(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object):
        sizes.append(tuple(size))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    return sizes


def test_a_very_wide_strip_is_cropped_without_a_huge_intermediate(tmp_path, resize_sizes):
    path = save(Image.new("RGB", (10_000, 1), (10, 200, 30)), tmp_path / "strip.png")
    prep = Preprocessing()  # 224 crop after a 256 short side: naively 2,560,000 x 256
    array = load(path, prep).array
    assert array.shape == (3, 224, 224)
    assert load_views(path, prep, 3).array.shape == (3, 3, 224, 224)
    assert max(w * h for w, h in resize_sizes) <= 256 * 256
    expected = normalized((10, 200, 30))[:, None, None]
    np.testing.assert_allclose(array, np.broadcast_to(expected, array.shape), atol=1e-5)


def test_resize_and_crop_matches_resizing_everything_then_cropping():
    image = _noise((90, 70), seed=3)
    prep = Preprocessing(height=32, width=32, resize=40)
    whole = image.resize((51, 40), Image.Resampling.BILINEAR)
    left, top = (51 - 32) // 2, (40 - 32) // 2
    reference = np.asarray(whole.crop((left, top, left + 32, top + 32)), dtype=np.int16)
    ours = np.asarray(resize_and_crop(image, prep), dtype=np.int16)
    assert np.abs(ours - reference).max() <= 1  # rounding only


# Pillow may complain about damaged metadata while it decodes pixels; that is not the point.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_random_damage_never_escapes_as_another_exception():
    """Flip, cut and insert bytes in real files of each format: an image or a LuncherError."""
    photo = _noise((40, 30), seed=4)
    exif = Image.Exif()
    exif[0x0112] = 6
    seeds = [
        encoded(photo, "JPEG", exif=exif.tobytes()),
        encoded(photo, "JPEG", progressive=True),
        encoded(photo, "PNG"),
        encoded(photo.convert("P"), "PNG", transparency=3),
        encoded(photo.convert("P"), "GIF"),
        encoded(photo, "BMP"),
        encoded(photo, "WEBP"),
        encoded(photo, "TIFF"),
    ]
    rng = random.Random(0)
    for data in seeds:
        for _ in range(120):
            damaged = bytearray(data)
            for _ in range(rng.choice([1, 3, 10])):
                at = rng.randrange(len(damaged))
                action = rng.random()
                if action < 0.6:
                    damaged[at] = rng.randrange(256)
                elif action < 0.8:
                    del damaged[at : at + rng.randrange(1, 64)]
                else:
                    damaged[at:at] = rng.randbytes(rng.randrange(1, 16))
            try:
                image = decode(bytes(damaged), NCHW, name="damaged")
            except LuncherError as exc:
                assert str(exc).startswith("damaged: ") and "\n" not in str(exc)
            else:
                assert image.mode == "RGB"
                assert to_tensor(resize_and_crop(image, NCHW), NCHW).shape == (3, 8, 8)


# -- JPEG draft ---------------------------------------------------------------------------


def test_a_large_jpeg_decodes_reduced_and_close_to_the_full_decode(tmp_path):
    y, x = np.mgrid[0:3000, 0:4000]
    pixels = np.stack([x * 255 // 3999, y * 255 // 2999, (x + y) * 255 // 6998], axis=-1)
    path = save(Image.fromarray(pixels.astype(np.uint8)), tmp_path / "big.jpg", quality=90)
    prep = Preprocessing()

    reduced = decode(path.read_bytes(), prep)
    assert prep.resize <= min(reduced.size) < 2 * prep.resize
    assert reduced.size[0] > reduced.size[1]

    loaded = load(path, prep)
    assert loaded.array.shape == (3, 224, 224)
    with Image.open(path) as full:
        reference = to_tensor(resize_and_crop(full.convert("RGB"), prep), prep)
    assert np.abs(loaded.array - reference).mean() < 0.02  # about one grey level in 0..255


# -- finding photos -----------------------------------------------------------------------


def test_find_images_searches_directories_and_keeps_files_as_given(tmp_path):
    album = tmp_path / "album"
    for name in ["b.png", "A.JPG", "notes.txt", "sub/deep/z.webp", "sub/c.jpeg", "sub/raw.cr2"]:
        (album / name).parent.mkdir(parents=True, exist_ok=True)
        (album / name).write_bytes(b"")
    (album / "folder.jpg").mkdir()  # a directory with an image suffix is not a photo
    explicit = _file("readme.txt", b"not a photo")(tmp_path)
    missing = tmp_path / "gone.jpg"

    found = find_images([explicit, album, missing])
    assert found == [
        explicit,
        album / "A.JPG",
        album / "b.png",
        album / "sub" / "c.jpeg",
        album / "sub" / "deep" / "z.webp",
        missing,
    ]
    assert find_images([tmp_path / "empty"]) == [tmp_path / "empty"]
    (tmp_path / "nothing").mkdir()
    assert find_images([tmp_path / "nothing"]) == []


def test_a_folder_nested_deeper_than_pythons_recursion_limit_is_searched(tmp_path):
    """os.walk recurses once per level before Python 3.12: a photos folder 1,500 levels
    deep (well inside PATH_MAX) was `unexpected RecursionError`."""
    album = tmp_path / "album"
    depth = sys.getrecursionlimit() + 500
    folder = Path(*(["a"] * depth))
    album.mkdir()
    try:
        for level in range(1, depth + 1):  # os.makedirs recurses too
            (album / Path(*(["a"] * level))).mkdir()
        (album / folder / "x.jpg").write_bytes(b"")
        (album / "top.jpg").write_bytes(b"")
        assert find_images([album]) == [album / folder / "x.jpg", album / "top.jpg"]
    finally:  # shutil.rmtree, pytest's clean-up, recurses too
        (album / folder / "x.jpg").unlink(missing_ok=True)
        for level in range(depth, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                (album / Path(*(["a"] * level))).rmdir()


def test_a_folder_search_follows_linked_folders_once_and_skips_hidden_ones(tmp_path):
    album = tmp_path / "album"
    (album / "dish").mkdir(parents=True)
    (album / "dish" / "a.jpg").write_bytes(b"")
    (album / ".cache").mkdir()
    (album / ".cache" / "b.jpg").write_bytes(b"")
    (album / "._c.jpg").write_bytes(b"\x00\x05\x16\x07")  # a macOS AppleDouble file
    (album / "dish" / "up").symlink_to(album, target_is_directory=True)  # a loop
    (album / "linked").symlink_to(album / "dish", target_is_directory=True)
    (album / ".hidden.jpg").symlink_to(tmp_path / "nowhere.jpg")
    assert find_images([album]) == [album / "dish" / "a.jpg"]


@pytest.mark.skipif(sys.platform == "win32", reason="symlinks need privileges on Windows")
def test_a_broken_link_in_a_folder_is_named_like_an_unreadable_photo(run, pt_model, tmp_path):
    """A `.jpg` link to a file that is gone (an unmounted disk, a moved album) inside a
    folder given to predict or retrain was left out without a word (exit 0), while an
    unreadable photo there is named and the exit code is 1."""
    album = tmp_path / "album"
    album.mkdir()
    save(Image.new("RGB", (12, 10), (200, 30, 40)), album / "a.png")
    broken = album / "b.jpg"
    broken.symlink_to(tmp_path / "unmounted" / "b.jpg")
    assert find_images([album]) == [album / "a.png", broken]
    with pytest.raises(LuncherError, match="broken link") as caught:
        read_bytes(broken)
    assert_one_line_error(caught.value, broken)
    assert str(tmp_path / "unmounted" / "b.jpg") in str(caught.value)

    assert run("make-updatable", pt_model).code == 0
    predicted = run("predict", "--json", album)
    assert predicted.code == 1, predicted
    rows = predicted.json_lines()
    assert [row["path"] for row in rows] == [str(album / "a.png"), str(broken)]
    assert "broken link" in rows[1]["error"], rows[1]
    lines = predicted.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {broken}: cannot read: broken link")

    retrained = run("retrain", "--label", "healthy", album)
    assert retrained.code == 1, retrained
    assert retrained.stderr.strip().splitlines() == [lines[0].replace("error:", "skipped:", 1)]
    assert "Traceback" not in retrained.stdout + retrained.stderr

    forgot = run("forget", album)  # as for an unreadable photo: part of what you named
    assert forgot.code == 1, forgot
    assert forgot.stderr.strip().splitlines() == lines
    assert len(run("examples", "--json").json_lines()) == 1


# -- loading many -------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_load_many_keeps_order_with_failures_interleaved(tmp_path, workers):
    paths: list[Path] = []
    for i in range(23):  # more than the decoding window, so it refills
        if i % 3 == 1:
            paths.append(tmp_path / f"{i:02}-missing.jpg")
        elif i % 3 == 2:
            paths.append(_file(f"{i:02}-text.jpg", b"soup")(tmp_path))
        else:
            paths.append(
                save(Image.new("RGB", (12, 10), (i * 10, 50, 90)), tmp_path / f"{i:02}.png")
            )

    results = list(load_many(paths, NCHW, workers=workers))
    assert [r.path for r in results] == paths
    for i, result in enumerate(results):
        if i % 3 == 0:
            assert isinstance(result, LoadedImage)
            np.testing.assert_array_equal(result.array, load(paths[i], NCHW).array)
            assert result.array[0, 0, 0] == pytest.approx(normalized((i * 10, 50, 90))[0], abs=1e-5)
        else:
            assert isinstance(result, ImageFailure)
            assert_one_line_error(result.error, paths[i])


def test_decoding_threads_leave_the_warning_filters_as_they_were(tmp_path):
    """`catch_warnings` in two threads at once restores the wrong filters, for good."""
    paths = [
        save(Image.new("RGB", (400, 300), (i, 0, 0)), tmp_path / f"{i}.jpg") for i in range(40)
    ]
    before = list(warnings.filters)
    for _ in range(5):
        assert all(isinstance(r, LoadedImage) for r in load_many(paths, NCHW, workers=4))
        assert warnings.filters == before


# -- augmented views ----------------------------------------------------------------------


@pytest.mark.parametrize("prep", [NCHW, NHWC], ids=["NCHW", "NHWC"])
def test_augmented_views_are_repeatable_and_start_with_the_plain_view(tmp_path, prep):
    path = save(halves((60, 40), RED, BLUE), tmp_path / "plate.png")
    image = decode(path.read_bytes(), prep)

    views = augmented_views(image, prep, 6, seed=7)
    assert views.dtype == np.float32
    assert views.shape == (6, *load(path, prep).array.shape)
    np.testing.assert_array_equal(views[0], load(path, prep).array)
    np.testing.assert_array_equal(views, augmented_views(image, prep, 6, seed=7))
    assert not np.array_equal(views, augmented_views(image, prep, 6, seed=8))
    for i in range(6):
        for j in range(i + 1, 6):
            assert not np.array_equal(views[i], views[j]), (i, j)

    stacked = load_views(path, prep, 6)
    assert stacked.array.shape == views.shape
    np.testing.assert_array_equal(stacked.array[0], views[0])
    np.testing.assert_array_equal(stacked.array, load_views(path, prep, 6).array)


def test_augmented_views_of_a_photo_smaller_than_the_crop(tmp_path):
    image = decode(encoded(halves((6, 4), RED, BLUE), "PNG"), NCHW)
    views = augmented_views(image, NCHW, 5, seed=1)
    assert views.shape == (5, 3, 8, 8)
    assert np.isfinite(views).all()


# -- the CLI ------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch) -> Callable[..., tuple[int, str, str]]:
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("LUNCHER_BUNDLED_MODEL", "")  # no shipped model
    monkeypatch.delenv("LUNCHER_DEBUG", raising=False)
    runner = CliRunner()

    def invoke(*args: object) -> tuple[int, str, str]:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    code, _, stderr = invoke("make-updatable", pytorch_style(tmp_path / "tiny.onnx"))
    assert code == 0, stderr
    return invoke


@pytest.fixture
def mixed_album(tmp_path) -> tuple[Path, list[Path], list[Path]]:
    album = tmp_path / "album"
    good = [
        save(Image.new("RGB", (40, 30), (200, 40, 40)), album / "a-red.png"),
        save(Image.new("RGB", (30, 40), (40, 200, 40)), album / "c-green.jpg"),
        save(Image.new("RGBA", (20, 20), (0, 0, 0, 0)), album / "e-clear.png"),
    ]
    bad = [
        _file("b-empty.jpg", b"")(album),
        _file("d-notes.jpg", b"not a photo at all")(album),
        _file("f-cut.png", PNG[:100])(album),
        _file("g-bomb.png", png_declaring(30_000, 30_000))(album),
    ]
    return album, good, bad


def test_predict_json_reports_bad_files_inline_and_exits_1(cli, mixed_album):
    album, good, bad = mixed_album
    code, stdout, stderr = cli("predict", "--json", album)
    assert code == 1
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in sorted(good + bad)]
    for row in rows:
        if Path(row["path"]) in bad:
            assert set(row) == {"path", "error"}
            assert_one_line_error(row["error"], Path(row["path"]))
        else:
            assert set(row) == {"path", "label", "probability", "probabilities"}
            assert row["label"] in ("healthy", "fast_food")
            assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
    assert "Traceback" not in stdout + stderr


def test_predict_table_names_each_bad_file_on_one_stderr_line(cli, mixed_album):
    album, good, bad = mixed_album
    code, stdout, stderr = cli("predict", album)
    assert code == 1
    assert "Traceback" not in stdout + stderr
    lines = stderr.splitlines()
    assert len(lines) == len(bad)
    for path, line in zip(sorted(bad), lines, strict=True):
        assert line.startswith("error: ") and str(path) in line
    for path in good:
        assert path.name in stdout
    for path in bad:
        assert path.name not in stdout


def test_predict_a_single_unreadable_photo(cli, tmp_path):
    code, stdout, stderr = cli("predict", tmp_path / "nowhere.jpg")
    assert code == 1 and stdout == ""
    assert stderr.splitlines() == [
        f"error: {tmp_path / 'nowhere.jpg'}: cannot read: No such file or directory"
    ]


def test_find_images_skips_hidden_files_and_directories(tmp_path: Path) -> None:
    from PIL import Image as PILImage

    for name in ("a.jpg", ".hidden.jpg", ".cache/b.jpg", "sub/.thumbs/c.png", "sub/d.png"):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        PILImage.new("RGB", (4, 4)).save(path)
    found = [p.relative_to(tmp_path).as_posix() for p in find_images([tmp_path])]
    assert found == ["a.jpg", "sub/d.png"]
    # Named explicitly, a hidden file is still read.
    assert find_images([tmp_path / ".hidden.jpg"]) == [tmp_path / ".hidden.jpg"]


def test_a_folder_search_skips_a_models_directory_inside_it(run, pt_model, tmp_path, monkeypatch):
    """A models directory that is not hidden (LUNCHER_MODELS_DIR=~/luncher-models) lies under
    the folders a user searches: `luncher retrain --label healthy ~` taught the thumbnails
    of the photos taught fast_food (other files, other digests) as healthy."""
    home = tmp_path / "home"
    models = home / "luncher-models"
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(models))
    red = [
        save(Image.new("RGB", (20, 20), (200 + i, 0, 0)), home / "lunch" / f"r{i}.png")
        for i in range(3)
    ]
    assert run("make-updatable", pt_model).code == 0
    assert run("retrain", "--label", "fast_food", *red).code == 0
    assert len(list((models / "thumbnails").iterdir())) == 3
    assert find_images([home]) == red
    result = run("retrain", "--label", "healthy", "--json", home)
    assert result.code == 0, result
    assert result.json_lines()[0]["examples_per_label"] == {"healthy": 3}
    # Named explicitly, a folder in it is still searched.
    assert len(find_images([models / "thumbnails"])) == 3
    from healthyluncher import store

    assert {store.STATE_FILE, store.LOCK_FILE} == photo_files.MODELS_DIR_MARKERS


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "RGB", "I;16", "1"])
def test_a_large_photo_is_shrunk_to_what_compositing_at_full_size_gives(mode):
    """Every mode is reduced before it is converted, and reads as its full-size conversion
    (onto white, 16-bit white at 65535, a palette expanded) then reduced."""
    from healthyluncher.settings import Preprocessing

    rng = np.random.default_rng(0)
    size = (640, 520)
    rgba = rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :]  # alpha ramp
    source = Image.fromarray(rgba, "RGBA")
    if mode == "I;16":
        grey = (rng.random((size[1], size[0])) * 65535).astype(np.uint16)
        source = Image.fromarray(grey)
    elif mode == "P":
        source = source.convert("RGB").quantize(64)
        source.info["transparency"] = 3
    elif mode != "RGBA":
        source = source.convert(mode)
    prep = Preprocessing(height=32, width=32, resize=64)
    got = images.decode(_png(source), prep)
    factor = min(size) // (2 * prep.resize)
    assert factor >= 2 and got.size == (-(-size[0] // factor), -(-size[1] // factor))
    # The reference: the whole image converted for display first, then reduced.
    reopened = Image.open(io.BytesIO(_png(source)))
    full = images._to_display_mode(reopened, 3)
    expected = np.asarray(full.reduce(factor), np.float64)
    assert np.abs(np.asarray(got.convert(full.mode), np.float64) - expected).max() <= 2


def test_a_huge_png_with_alpha_costs_its_decoded_size_not_four_times_it(tmp_path):
    """A 0.8 MB PNG of 207 megapixels with alpha took 3.25 GB to predict (four full-size
    copies on the way to RGB). At 48 megapixels here: the decode's peak memory now stays
    below twice the decoded image (192 MB), where it was about four times it."""
    import subprocess

    path = tmp_path / "huge.png"
    Image.new("RGBA", (8000, 6000), (200, 30, 40, 128)).save(path)
    code = (
        "import resource, sys\n"
        "from healthyluncher import imaging\n"
        "from healthyluncher.settings import Preprocessing\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        f"image = imaging.decode(open({str(path)!r}, 'rb').read(), Preprocessing())\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print((after - before) // 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    decoded_mb = 8000 * 6000 * 4 // 2**20
    assert int(done.stdout) < 2 * decoded_mb, (int(done.stdout), decoded_mb)


# A PostScript file: Pillow's EPS plugin renders it by running Ghostscript on it.
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n"
    b"0 setgray 0 0 8 8 rectfill\nshowpage\n%%EOF\n"
)


@pytest.mark.skipif(sys.platform == "win32", reason="a shell script as Ghostscript")
def test_a_postscript_file_named_jpg_never_runs_ghostscript(tmp_path):
    """Photos are untrusted files: one named lunch.jpg that is PostScript must not make
    luncher run an interpreter (Ghostscript, through Pillow's EPS plugin) on it, and formats
    outside the photo formats luncher reads are refused in one line, unrun."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "ghostscript-ran"
    fake_gs = bin_dir / "gs"
    fake_gs.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 1\n")
    fake_gs.chmod(0o755)
    photo = tmp_path / "lunch.jpg"
    photo.write_bytes(EPS)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("LUNCHER_BUNDLED_MODEL")  # the shipped base: a real command, start to end
    done = subprocess.run(
        [sys.executable, "-m", "healthyluncher", "predict", str(photo)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert not marker.exists(), "Ghostscript ran on a photo"
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), done.stderr
    assert "lunch.jpg" in lines[0] and "Traceback" not in done.stderr


@pytest.mark.parametrize("fmt", ["EPS", "PCX", "SGI", "TGA", "PPM", "ICO", "DDS", "QOI"])
def test_only_the_photo_formats_luncher_names_are_decoded(fmt):
    """README: JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC/HEIF and AVIF. Every other decoder
    of Pillow's is more code reading an untrusted file, for no photo a camera takes."""
    if fmt == "EPS":
        data = EPS
    else:
        buffer = io.BytesIO()
        Image.new("RGB", (16, 16), RED).save(buffer, format=fmt)
        data = buffer.getvalue()
    with pytest.raises(LuncherError) as caught:
        decode(data, NCHW, name="odd.jpg")
    line = assert_one_line_error(caught.value, "odd.jpg")
    if fmt == "TGA":  # a format without a signature: no format, or another, claims it
        assert "not a photo format luncher reads" in line or "not an image file" in line
    else:
        assert f"not a photo format luncher reads (Pillow reads it as {fmt})" in line


# A whole lossless WebP of 14000 x 13000 pixels of one colour (182 MP): Pillow 12 decodes it.
BIG_WEBP = (
    b"RIFF\x1e\x00\x00\x00WEBPVP8L\x11\x00\x00\x00/\xaf\xf6\xb1\x0c\x07P\xe4\xe2\x15"
    b"\xa5\xff\x81\x88\xe8\x7f\x00\x00"
)


def test_what_the_readme_says_of_pillows_guard_in_webp_is_what_happens():
    """The README said photos up to 210 megapixels are read and that only Pillow's TIFF and
    GIF readers apply its own guard; its WebP reader does too, so a WebP of 180 MP was
    refused ("image is too large to decode safely"), a limit the README did not name."""
    import PIL
    from PIL import features

    limit = 2 * PILLOW_DEFAULT_PIXELS  # 178,956,970: Pillow's default guard refuses above
    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert "Pillow's TIFF and GIF readers, and from Pillow 13 its WebP reader," in readme
    assert f"above {limit:,} pixels" in readme
    if not features.check("webp"):
        pytest.skip("this Pillow reads no WebP")
    if int(PIL.__version__.split(".")[0]) < 13:  # Python 3.10's newest Pillow is 12
        pytest.skip("Pillow 12 reads this WebP (5 s and 2.8 GB here), as the README says")
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_PIXELS  # the test's program: untouched
    with pytest.raises(LuncherError) as caught:
        decode(BIG_WEBP, NCHW, name="big.webp")  # 182 MP
    message = assert_one_line_error(caught.value, "big.webp")
    assert "too large" in message and f"{limit} pixels" in message, message
    assert Image.MAX_IMAGE_PIXELS == PILLOW_DEFAULT_PIXELS
