"""Photos people actually have: HEIC/HEIF from phones, AVIF, and URLs that are not photos."""

from __future__ import annotations

import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import healthyluncher
from healthyluncher import imaging
from healthyluncher.errors import LuncherError
from healthyluncher.photos import find_images, image_suffixes, read_bytes, url_error
from healthyluncher.settings import Preprocessing
from tests.conftest import one_line_error

pillow_heif = pytest.importorskip("pillow_heif")

PREP = Preprocessing(height=8, width=8, resize=10)
RED = (220, 40, 40)
BLUE = (40, 40, 220)
ORIENTATION = 0x0112


def lunch(colour: tuple[int, int, int] = RED, size: tuple[int, int] = (64, 48)) -> Image.Image:
    """A plate with some texture and a napkin: lossy codecs keep its colours."""
    image = Image.new("RGB", size, colour)
    image.paste((230, 220, 200), (size[0] * 3 // 4, 0, size[0], size[1]))
    for x in range(0, size[0], 5):
        image.putpixel((x, (3 * x) % size[1]), (250, 250, 250))
    return image


def halves(size: tuple[int, int] = (64, 32)) -> Image.Image:
    """Left half red, right half blue: shows which way a photo was turned."""
    image = Image.new("RGB", size, RED)
    image.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return image


def heif_bytes(image: Image.Image, **options: object) -> bytes:
    buffer = io.BytesIO()
    pillow_heif.from_pillow(image).save(buffer, quality=90, **options)
    return buffer.getvalue()


def save_heif(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(heif_bytes(image))
    return path


def avif_encodes() -> bool:
    if not features.check("avif"):
        return False
    try:
        Image.new("RGB", (16, 16)).save(io.BytesIO(), "AVIF")
    except (OSError, ValueError, KeyError):
        return False
    return True


needs_avif = pytest.mark.skipif(not avif_encodes(), reason="this Pillow cannot write AVIF")


def save_avif(image: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, "AVIF", quality=90)
    return path


FORMATS = [
    pytest.param(".heic", save_heif, id="heic"),
    pytest.param(".heif", save_heif, id="heif"),
    pytest.param(".avif", save_avif, id="avif", marks=needs_avif),
]


def predictions(run, *paths: Path | str) -> dict[str, dict]:
    result = run("predict", "--json", *paths)
    assert result.code == 0, result
    return {str(row["path"]): row for row in result.json_lines()}


# -- HEIC, HEIF and AVIF photos ------------------------------------------------------------


@pytest.mark.parametrize(("suffix", "saver"), FORMATS)
def test_a_phone_photo_is_labelled_like_the_same_photo_as_png(
    run, pt_model, photos, tmp_path, suffix, saver
):
    assert run("make-updatable", pt_model).code == 0
    # Personalized on red and green plates, the tiny model is sure of its labels.
    assert run("retrain", "--label", "fast_food", *photos["red"]).code == 0
    assert run("retrain", "--label", "healthy", *photos["green"]).code == 0
    rows = {}
    for name, colour in (("red", (210, 40, 40)), ("green", (40, 200, 60))):
        image = lunch(colour)
        png = tmp_path / f"{name}.png"
        image.save(png)
        other = saver(image, tmp_path / f"{name}{suffix}")
        rows[name] = predictions(run, png, other)
        expected, got = rows[name][str(png)], rows[name][str(other)]
        assert got["label"] == expected["label"]
        for label, probability in expected["probabilities"].items():
            assert abs(got["probabilities"][label] - probability) < 0.05, (label, got, expected)
    labels = {name: {row["label"] for row in found.values()} for name, found in rows.items()}
    assert labels == {"red": {"fast_food"}, "green": {"healthy"}}


@pytest.mark.parametrize(("suffix", "saver"), FORMATS)
def test_a_phone_photo_decodes_to_the_same_pixels_as_png(tmp_path, suffix, saver):
    image = lunch()
    path = saver(image, tmp_path / f"lunch{suffix}")
    decoded = imaging.decode(path.read_bytes(), PREP, name=str(path))
    expected = imaging.shrink(image, PREP.resize)  # a large photo is reduced as it decodes
    assert decoded.mode == "RGB" and decoded.size == expected.size
    difference = np.abs(np.asarray(decoded, np.float32) - np.asarray(expected, np.float32))
    assert difference.mean() < 8, difference.mean()  # lossy, but the same photo


def test_a_heic_is_found_by_its_content_whatever_its_name(run, pt_model, tmp_path):
    """Photos exported from a phone keep HEIC data under a .jpg name now and then."""
    assert run("make-updatable", pt_model).code == 0
    misnamed = save_heif(lunch(), tmp_path / "IMG_0001.jpg")
    png = tmp_path / "lunch.png"
    lunch().save(png)
    rows = predictions(run, misnamed, png)
    assert rows[str(misnamed)]["label"] == rows[str(png)]["label"]


def test_a_heic_turned_by_the_phone_is_turned_once(tmp_path):
    """Phones store a turned photo with HEIF's rotation (irot) and EXIF orientation 6 both:
    libheif applies the first, and the second must then not turn the photo again."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    image = halves()
    data = heif_bytes(image, exif=exif.tobytes())
    with pillow_heif.HeifImageFile(io.BytesIO(data)) as opened:  # what the file said
        assert opened.info.get("original_orientation") == 6
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG", exif=exif.tobytes(), quality=95)

    for decoded in (
        imaging.decode(data, PREP, name="turned.heic"),
        imaging.decode(jpeg.getvalue(), Preprocessing(height=8, width=8, resize=32), name="j"),
    ):
        width, height = decoded.size
        assert height > width  # 64x32 turned a quarter: upright it is tall
        top = decoded.getpixel((width // 2, height // 8))
        bottom = decoded.getpixel((width // 2, height - 1 - height // 8))
        # Orientation 6: the stored left side (red) is the top of the upright photo.
        assert top[0] > 150 and top[2] < 100, top
        assert bottom[2] > 150 and bottom[0] < 100, bottom

    upright = imaging.decode(heif_bytes(image), PREP, name="upright.heic")
    assert upright.size == image.size


@pytest.mark.parametrize("resize", [64, 200, 400])
def test_a_heic_thumbnail_stands_in_only_when_large_enough(resize):
    """Like a JPEG's reduced decoding: an embedded thumbnail whose short side is still at
    least `resize` is decoded instead of the whole photo, turned the same way."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = heif_bytes(halves((640, 480)), thumbnails=[96, 320], exif=exif.tobytes())
    prep = Preprocessing(height=32, width=32, resize=resize)
    decoded = imaging.decode(data, prep, name="thumbnails.heic")
    width, height = decoded.size
    assert height > width
    assert min(width, height) >= resize
    assert (width, height) == {64: (72, 96), 200: (240, 320), 400: (480, 640)}[resize]
    top = decoded.getpixel((width // 2, height // 8))
    assert top[0] > 150 and top[2] < 100, top


def test_directories_find_heic_heif_and_avif(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    folder = tmp_path / "camera roll"
    expected = [
        save_heif(lunch(), folder / "IMG_0001.HEIC"),
        save_heif(lunch(), folder / "b.heif"),
        save_heif(lunch(), folder / "c" / "d.heic"),
    ]
    if avif_encodes():
        expected.append(save_avif(lunch(), folder / "e.avif"))
    lunch().save(folder / "f.png")
    expected.append(folder / "f.png")
    save_heif(lunch(), folder / ".thumbnails" / "g.heic")  # hidden: skipped
    (folder / "notes.txt").write_text("not a photo")

    assert {".heic", ".heif"} <= image_suffixes()
    assert (".avif" in image_suffixes()) == features.check("avif")
    assert sorted(find_images([folder])) == sorted(expected)
    rows = predictions(run, folder)
    assert sorted(rows) == sorted(str(p) for p in expected)


def test_a_heic_can_be_learned_from(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    photo = save_heif(lunch(), tmp_path / "IMG_0002.heic")
    assert run("retrain", "--label", "fast_food", photo).code == 0, "retrain"
    assert predictions(run, photo)[str(photo)]["label"] == "fast_food"


# -- damaged files ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    ["truncated", "header only", "scrambled", "brand only"],
)
def test_a_damaged_heic_is_one_line_and_exit_1(run, pt_model, tmp_path, damage):
    assert run("make-updatable", pt_model).code == 0
    data = heif_bytes(lunch())
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "header only":
        data = data[:40]
    elif damage == "scrambled":
        data = data[:24] + bytes(b ^ 0x5A for b in data[24:])
    else:
        data = b"\x00\x00\x00\x18ftypheic" + b"\xff" * 64
    broken = tmp_path / "IMG_0003.heic"
    broken.write_bytes(data)
    line = one_line_error(run("predict", broken), str(broken), "cannot decode")
    assert "HEIC" in line or "Invalid" in line

    with pytest.raises(LuncherError, match="IMG_0003.heic") as caught:
        imaging.load(broken, PREP)
    assert "\n" not in str(caught.value)


def test_a_damaged_heic_does_not_stop_the_other_photos(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    good = save_heif(lunch(), tmp_path / "good.heic")
    broken = tmp_path / "broken.heic"
    broken.write_bytes(heif_bytes(lunch())[:100])
    result = run("predict", "--json", good, broken)
    assert result.code == 1
    rows = {str(row["path"]): row for row in result.json_lines()}
    assert "label" in rows[str(good)]
    assert "error" in rows[str(broken)]
    assert "Traceback" not in result.stdout + result.stderr


def test_a_heic_declaring_a_huge_canvas_is_refused_before_decoding(tmp_path):
    data = bytearray(heif_bytes(Image.new("RGB", (64, 64), RED)))  # square: no crop box
    assert data.count(b"ispe") == 1
    at = data.find(b"ispe")
    data[at + 8 : at + 16] = struct.pack(">II", 20000, 12000)  # 240 MP
    with pytest.raises(LuncherError, match="too large"):
        imaging.decode(bytes(data), PREP, name="bomb.heic")


def test_an_avif_this_pillow_cannot_read_says_so(monkeypatch):
    monkeypatch.setattr(features, "check", lambda feature: False)
    junk = b"\x00\x00\x00\x18ftypavif" + b"\xff" * 64
    with pytest.raises(LuncherError, match="AVIF"):
        imaging.decode(junk, PREP, name="x.avif")


def test_pillow_heif_is_imported_only_for_a_heif_photo(tmp_path):
    """Start-up stays fast: importing pillow-heif costs about 0.2 s."""
    heic = save_heif(lunch(), tmp_path / "a.heic")
    png = tmp_path / "a.png"
    lunch().save(png)
    script = f"""
import sys
import healthyluncher.cli
from healthyluncher import imaging
from healthyluncher.settings import Preprocessing
prep = Preprocessing(height=8, width=8, resize=10)
imaging.load(__import__("pathlib").Path({str(png)!r}), prep)
print("pillow_heif" in sys.modules)
imaging.load(__import__("pathlib").Path({str(heic)!r}), prep)
print("pillow_heif" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert done.stdout.split() == ["False", "True"], done


# -- URLs ------------------------------------------------------------------------------------

URLS = [
    "https://example.com/lunch.jpg",
    "http://example.com/photos/lunch.png?size=large",
    "HTTPS://Example.com/Lunch.JPG",
    "ftp://files.example.com/lunch.jpg",
]


@pytest.mark.parametrize("url", URLS)
def test_predict_refuses_a_url_and_names_it_as_typed(run, pt_model, url):
    assert run("make-updatable", pt_model).code == 0
    line = one_line_error(run("predict", url), url, "a URL", "never downloads", "download it")
    assert line.count("://") == 1


def test_predict_refuses_a_url_among_photos_before_reading_any(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    png = tmp_path / "lunch.png"
    lunch().save(png)
    result = run("predict", "--json", png, "https://example.com/lunch.jpg")
    one_line_error(result, "https://example.com/lunch.jpg: a URL")
    assert all("label" not in row for row in result.json_lines())  # refused before reading


def test_retrain_and_forget_refuse_urls(run, pt_model):
    assert run("make-updatable", pt_model).code == 0
    url = "https://example.com/lunch.jpg"
    one_line_error(run("retrain", "--label", "fast_food", url), url, "never downloads")
    one_line_error(run("forget", url), url, "never downloads")


def test_file_and_data_urls_are_refused_too(run, pt_model, tmp_path):
    assert run("make-updatable", pt_model).code == 0
    photo = tmp_path / "lunch.png"
    lunch().save(photo)
    one_line_error(run("predict", photo.as_uri()), photo.as_uri(), f"({photo.as_posix()})")
    data_url = "data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1Pe" * 5
    line = one_line_error(run("predict", data_url), "data:image/png;base64,", "a URL")
    assert len(line) < 250  # a data: URL can be megabytes: only its start is shown


def test_the_api_refuses_urls(run, pt_model, models_dir):
    assert run("make-updatable", pt_model).code == 0
    lun = healthyluncher.open(models_dir)
    with pytest.raises(LuncherError, match="never downloads") as caught:
        lun.predict(["https://example.com/x.jpg"])
    assert str(caught.value).startswith("https://example.com/x.jpg: a URL")
    with pytest.raises(LuncherError, match=r"https://example\.com/y\.jpg"):
        lun.predict("https://example.com/y.jpg")
    with pytest.raises(LuncherError, match=r"https://example\.com/z\.jpg"):
        list(lun.predict_each([Path("https://example.com/z.jpg")]))


def test_read_bytes_refuses_a_url_too():
    with pytest.raises(LuncherError, match=r"^https://example\.com/x\.jpg: a URL"):
        read_bytes(Path("https://example.com/x.jpg"))


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("https://example.com/a.jpg", "https://example.com/a.jpg"),
        (Path("https://example.com/a.jpg"), "https://example.com/a.jpg"),
        (Path("http://example.com/"), "http://example.com"),
        (Path("file:///tmp/a.jpg"), "file:///tmp/a.jpg"),
        ("sftp://host/a.jpg", "sftp://host/a.jpg"),
    ],
)
def test_url_error_spells_the_url_as_typed(given, shown):
    error = url_error(given)
    assert error is not None
    assert str(error).startswith(f"{shown}: a ")


@pytest.mark.parametrize(
    "path",
    [
        "lunch.jpg",
        "photos/https.jpg",
        "C:/photos/lunch.jpg",
        "https.jpg",
        "data:lunch.jpg",  # no comma: not a data: URL, a (strange) file name
        "mailto:/x",
        "https:lunch.jpg",
    ],
)
def test_paths_are_not_urls(path):
    assert url_error(Path(path)) is None


def test_an_existing_file_with_a_url_like_name_is_a_file(run, pt_model, tmp_path, monkeypatch):
    """`https://example.com/lunch.png` collapses to a relative path: if it exists, read it."""
    assert run("make-updatable", pt_model).code == 0
    monkeypatch.chdir(tmp_path)
    photo = tmp_path / "https:" / "example.com" / "lunch.png"
    photo.parent.mkdir(parents=True)
    lunch().save(photo)
    assert url_error(Path("https://example.com/lunch.png")) is None
    rows = predictions(run, "https://example.com/lunch.png")
    assert list(rows) == ["https://example.com/lunch.png"]  # named as given
