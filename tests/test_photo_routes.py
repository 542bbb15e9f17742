"""The same photo through every route the API takes (a path, its bytes, a PIL image, a numpy
array) and every file name a folder of photos uses: the same prediction; each test failed
before the fix it names."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

import healthyluncher

ORIENTATION = 0x0112


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    return healthyluncher.open(models_dir)


def sideways(path: Path, orientation: int = 6, **options: object) -> Path:
    """A 60x40 photo stored as the camera held it, whose EXIF says how to turn it upright:
    red on top, green below, a blue strip on the left (turning it moves every one)."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:20, :, 0] = 255
    pixels[20:, :, 1] = 255
    pixels[:, :10, 2] = 200
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    Image.fromarray(pixels).save(path, exif=exif, **options)
    return path


def probabilities(lun: healthyluncher.Luncher, photos: list[object]) -> list[dict[str, float]]:
    return [dict(p.probabilities) for p in lun.predict(photos)]


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_pil_image_is_turned_upright_by_its_exif_as_its_file_is(lun, tmp_path, orientation):
    """`lun.predict([Image.open("lunch.jpg")])` (the README's own example) predicted a phone
    photo lying on its side: the path is turned upright by its EXIF orientation, the PIL
    image of the same file was encoded as stored, its EXIF left behind. A web server that
    opens an upload with Pillow got other labels than `luncher predict` on the file."""
    path = sideways(tmp_path / "lunch.png", orientation)
    with Image.open(path) as image:
        assert image.getexif()[ORIENTATION] == orientation
        upright = ImageOps.exif_transpose(image)
        routes = [
            path,
            path.read_bytes(),
            image,  # as Image.open gives it, not yet loaded
            image.convert("RGB"),  # a copy keeps the EXIF, as Pillow's own tools read it
            upright,  # turned by the program: its EXIF no longer says to turn it
            np.asarray(upright),
        ]
        results = probabilities(lun, routes)
    assert results[1:] == [results[0]] * (len(routes) - 1)
    stored = probabilities(lun, [np.asarray(Image.open(path).convert("RGB"))])[0]
    assert stored != results[0], (
        "the photo as stored must predict otherwise: else this proves nothing"
    )


@pytest.mark.parametrize("mode", ["RGB", "CMYK", "L"])
def test_a_pil_image_of_a_turned_jpeg_predicts_as_its_upright_pixels(lun, tmp_path, mode):
    """The same, for a JPEG in each of the modes it is stored in (CMYK goes through another
    lossless encoding): the PIL image predicts as its upright pixels do."""
    path = sideways(tmp_path / "lunch.jpg", quality=95)
    Image.open(path).convert(mode).save(path, exif=Image.open(path).getexif(), quality=95)
    with Image.open(path) as image:
        assert image.mode == mode
        results = probabilities(lun, [image, ImageOps.exif_transpose(image)])
    assert results[0] == results[1]


def test_a_folder_search_finds_every_name_of_a_format_luncher_reads(run, pt_model, tmp_path):
    """`luncher predict 3d-camera/` said `error: no image files found in 3d-camera`, while
    `luncher predict 3d-camera/DSCF0001.MPO` labelled the photo: MPO (a 3D camera's or a
    phone's multi-picture JPEG), `.jpe` and `.apng` are read when named, but a folder search
    looked for its own shorter list of endings."""
    folder = tmp_path / "3d-camera"
    folder.mkdir()
    left, right = Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (64, 48), "red")
    left.save(folder / "DSCF0001.MPO", "MPO", save_all=True, append_images=[right])
    left.save(folder / "scan.jpe")
    left.save(folder / "plate.apng", save_all=True, append_images=[right])
    assert run("make-updatable", pt_model).code == 0
    result = run("predict", "--json", folder)
    assert result.code == 0, result
    names = [Path(str(row["path"])).name for row in result.json_lines()]
    assert names == ["DSCF0001.MPO", "plate.apng", "scan.jpe"]


def test_every_ending_pillow_gives_a_format_luncher_reads_is_searched():
    """The same, for every name Pillow (and pillow-heif, for HEIF) registers for the formats
    luncher reads: HEIF and AVIF sequences (`.heics`, `.avifs`) were skipped too."""
    from PIL import features

    from healthyluncher.openers import PHOTO_FORMATS
    from healthyluncher.photos import image_suffixes

    Image.init()
    endings = {e for e, f in Image.registered_extensions().items() if f in PHOTO_FORMATS}
    pytest.importorskip("pillow_heif")
    endings |= {".heic", ".heics", ".heif", ".heifs", ".hif"}  # its register_heif_opener's
    if not features.check("avif"):
        endings = {e for e in endings if not e.startswith(".avif")}
    assert endings - image_suffixes() == set()


def unusable_images(tmp_path: Path) -> dict[str, object]:
    """Photos handed over in memory that cannot be used, as a damaged file cannot."""
    cut = tmp_path / "cut.png"
    Image.effect_noise((64, 64), 50).convert("RGB").save(cut)
    cut.write_bytes(cut.read_bytes()[:2000])  # an upload that stopped halfway
    closed = Image.open(sideways(tmp_path / "closed.png"))
    closed.close()
    return {
        "truncated": Image.open(cut),  # Image.open reads the header only: it opens
        "closed": closed,
        "empty array": np.zeros((0, 4, 3), np.uint8),
    }


@pytest.mark.parametrize("case", ["truncated", "closed", "empty array"])
def test_predict_each_reports_an_unusable_in_memory_photo_and_goes_on(lun, tmp_path, case):
    """`predict_each` yields an ImageFailure for a photo it cannot read and goes on (the
    README), and did for a damaged file or damaged bytes; a damaged PIL image or an empty
    array instead raised `LuncherError: <image 1>: cannot use this image (image file is
    truncated)` out of the loop, before even the photo ahead of it was yielded: one bad
    camera frame or upload ended the stream. A retrain refused every photo for it, where
    it skips a damaged file and trains on the rest."""
    good = sideways(tmp_path / "good.png")
    bad = unusable_images(tmp_path)[case]
    results = list(lun.predict_each([good, bad, good]))
    assert [type(r).__name__ for r in results] == ["Prediction", "ImageFailure", "Prediction"]
    failure = results[1]
    assert isinstance(failure, healthyluncher.ImageFailure)
    assert failure.error.startswith("<image 1>: ") and "\n" not in failure.error
    assert str(failure.path) == "<image 1>"
    with pytest.raises(healthyluncher.LuncherError, match=r"^<image 0>: "):
        lun.predict([bad])  # predict still raises, naming it

    result = lun.retrain("healthy", [good, bad])
    assert [p.path for p in result.photos] == [good]
    assert [f.error for f in result.failures] == [failure.error]


@pytest.mark.parametrize("end", ["\n", "\r\n", "\u2028"])
def test_a_name_read_with_its_newline_is_named_on_one_line(lun, tmp_path, end):
    """`lun.predict(open("names.txt").readlines())` raised a LuncherError of two lines,
    `/tmp/lunch.png` and `: cannot read: No such file or directory`, which reads as if the
    photo were there: every LuncherError is one line (the README), whatever name it quotes.
    The line break is shown as an escape, and the name without it, which exists, is named."""
    photo = sideways(tmp_path / "lunch.png")
    name = f"{photo}{end}"
    with pytest.raises(healthyluncher.LuncherError) as caught:
        lun.predict([name])
    (failure,) = lun.predict_each([name])
    assert isinstance(failure, healthyluncher.ImageFailure)
    with pytest.raises(healthyluncher.LuncherError) as retrained:
        lun.retrain("healthy", [name])
    for message in (str(caught.value), failure.error, str(retrained.value)):
        assert len(message.splitlines()) == 1, message
        assert f"{photo}{repr(end)[1:-1]}: cannot read: No such file or directory" in message
        assert f"without the white space around it, {photo} exists" in message


def png_with_metadata(path: Path, *, icc: int = 0, xmp: int = 0, orientation: int = 0) -> Path:
    """The photo of `sideways` as a PNG carrying an ICC profile of `icc` bytes and XMP of
    `xmp` bytes, both zlib-compressed as photo editors write them (so the file stays small);
    `orientation`: the XMP (a small one of its own) says how to turn the photo upright."""
    from PIL import PngImagePlugin

    pixels = np.asarray(Image.open(sideways(tmp := path.with_suffix(".plain.png"))))
    tmp.unlink()
    info = PngImagePlugin.PngInfo()
    if xmp:
        info.add_itxt("XML:com.adobe.xmp", "<x:xmpmeta/>" + " " * xmp, zip=True)
    if orientation:
        meta = f'<x:xmpmeta><rdf:Description tiff:Orientation="{orientation}"/></x:xmpmeta>'
        info.add_itxt("XML:com.adobe.xmp", meta, zip=True)
    options: dict[str, object] = {"icc_profile": bytes(icc)} if icc else {}
    Image.fromarray(pixels).save(path, pnginfo=info, **options)
    return path


@pytest.mark.parametrize(
    ("icc", "xmp"),
    [(3_000_000, 0), (0, 3_000_000), (2_000_000, 2_000_000)],
    ids=["large ICC profile", "large XMP", "both"],
)
def test_a_png_with_large_compressed_metadata_is_read_for_its_pixels(lun, tmp_path, icc, xmp):
    """`luncher predict scan.png` said `error: scan.png: cannot decode image: Decompressed
    data too large for PngImagePlugin.MAX_TEXT_CHUNK` for a PNG whose pixels are fine but
    whose ICC profile or XMP unpacks to more than Pillow's 1 MB limit for one metadata chunk
    (Photoshop's document history, a large printer profile): luncher uses neither, and a
    program's Pillow setting is not its to raise. Such chunks are left out and the photo
    read, as a viewer shows it; the rest of the metadata still counts (its orientation)."""
    plain = sideways(tmp_path / "plain.png", 1)
    heavy = png_with_metadata(tmp_path / "heavy.png", icc=icc, xmp=xmp)
    assert heavy.stat().st_size < 100_000  # a small file: the limit is on what it unpacks to
    with pytest.raises(ValueError, match="MAX_TEXT_CHUNK|Decompressed"):
        Image.open(heavy).load()  # what Pillow itself says of it
    assert probabilities(lun, [heavy]) == probabilities(lun, [plain])

    turned = png_with_metadata(tmp_path / "turned.png", icc=icc, xmp=xmp, orientation=6)
    upright = Image.open(plain).transpose(Image.Transpose.ROTATE_270)  # what 6 asks for
    assert probabilities(lun, [turned]) == probabilities(lun, [np.asarray(upright)])


def test_a_pil_image_of_a_compressed_tiff_is_kept_losslessly(lun, tmp_path):
    """A PIL image is encoded losslessly, to be hashed and kept like a file's bytes; but a
    TIFF Pillow opened keeps its compression in `info`, and Pillow's TIFF writer takes it
    from there: a CMYK scan stored JPEG-compressed (print workflows) was compressed again,
    a second lossy generation that predicted otherwise than its file (pixels up to 16 levels
    apart), and a fax's Group 4 (1-bit only) made its copy in another mode unusable."""
    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8))
    scan = tmp_path / "scan.tif"
    photo.convert("CMYK").save(scan, compression="jpeg")
    fax = tmp_path / "fax.tif"
    photo.convert("1").save(fax, compression="group4")
    with Image.open(scan) as cmyk, Image.open(fax) as bits:
        assert cmyk.info["compression"] == "jpeg" and bits.info["compression"] == "group4"
        routes = [scan, cmyk, fax, bits.convert("F"), bits.convert("I")]
        results = probabilities(lun, routes)
    assert results[1] == results[0]
    assert results[3] == results[4] == results[2]


def test_a_png_with_many_metadata_chunks_costs_no_more_than_pillow_allows(tmp_path, monkeypatch):
    """Reading a PNG for its pixels without its oversized metadata looked into every
    compressed chunk, each unpacked up to Pillow's 1 MB limit, with no bound on them all:
    a hostile PNG of 1 kB chunks that each unpack to 1 MB (which Pillow itself refuses
    after 64 MB, MAX_TEXT_MEMORY) cost 1 GB of unpacking per MB of file, 4.7 s for a 2 MB
    file and minutes for a large one, photo after photo of a folder. The search stops where
    Pillow's limit on a file's metadata is passed, and the photo is refused as before."""
    import struct
    import zlib

    from PIL import PngImagePlugin

    from healthyluncher import openers
    from healthyluncher.errors import LuncherError
    from healthyluncher.imaging import decode
    from healthyluncher.settings import Preprocessing

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    limit = PngImagePlugin.MAX_TEXT_CHUNK
    unpacked = [0]

    class Counted:  # openers' zlib, counting what it unpacks
        error = zlib.error

        @staticmethod
        def decompressobj() -> object:
            inner = zlib.decompressobj()

            class Counting:
                def decompress(self, data: bytes, max_length: int = 0) -> bytes:
                    out = inner.decompress(data, max_length)
                    unpacked[0] += len(out)
                    return out

            return Counting()

    monkeypatch.setattr(openers, "zlib", Counted)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).save(plain)
    png = plain.read_bytes()
    over = chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(limit + 10), 9))
    within = chunk(b"zTXt", b"k\0\0" + zlib.compress(bytes(limit), 9))
    chunks = PngImagePlugin.MAX_TEXT_MEMORY // limit + 60
    hostile = png[:33] + over + within * chunks + png[33:]
    with pytest.raises(LuncherError, match="cannot decode image: .*MAX_TEXT"):
        decode(hostile, Preprocessing(), name="hostile.png")
    assert unpacked[0] <= PngImagePlugin.MAX_TEXT_MEMORY + 2 * (limit + 1)
    # One oversized chunk among a few: read for its pixels, as before.
    unpacked[0] = 0
    fine = png[:33] + over + within * 3 + png[33:]
    assert decode(fine, Preprocessing(), name="fine.png").size == (16, 16)


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_adobe_deflate", "packbits"])
def test_a_pil_image_of_a_losslessly_compressed_tiff_is_forgotten_as_it_was_taught(
    lun, tmp_path, compression
):
    """A PIL image is known by the digest of its lossless copy: that is how `forget` finds
    the photo taught from it. Writing every TIFF copy uncompressed (so that a JPEG-compressed
    scan is not compressed again, lossily) also changed the copy of a CMYK scan stored
    LZW-, deflate- or PackBits-compressed, already lossless: a photo taught from such an
    image before could no longer be forgotten by handing the same image over ('not among
    your examples'). A lossless compression is kept; only the others are left out."""
    import hashlib

    from healthyluncher.imaging import from_pixels

    rng = np.random.default_rng(0)
    scan = tmp_path / "scan.tif"
    photo = Image.fromarray((rng.random((30, 40, 3)) * 255).astype(np.uint8))
    photo.convert("CMYK").save(scan, compression=compression)
    with Image.open(scan) as image:
        assert image.info["compression"] == compression
        image.load()
        taught = io.BytesIO()
        image.save(taught, "TIFF")  # the copy from_pixels made of it before
        kept = from_pixels(image, "<image 0>")
    assert hashlib.sha256(kept.data).hexdigest() == hashlib.sha256(taught.getvalue()).hexdigest()
    assert probabilities(lun, [kept]) == probabilities(lun, [scan])


def test_a_pil_image_taught_before_it_was_turned_upright_can_be_forgotten(lun, tmp_path):
    """A PIL image is known by the digest of its lossless copy, and `forget` finds a photo
    by it. Turning a PIL image upright by its EXIF orientation gave a sideways phone photo
    another copy, so one taught as `Image.open("lunch.jpg")` before could no longer be
    forgotten the same way: 'none of these photos are among your examples', the photo kept.
    forget also looks for the digest of the copy as it was (as stored, not turned)."""
    photo = sideways(tmp_path / "lunch.jpg")
    with Image.open(photo) as image:
        image.load()
        before = io.BytesIO()
        image.save(before, "PNG", compress_level=1)  # the copy a PIL image had, unturned
    lun.retrain("fast_food", [before.getvalue(), tmp_path / "lunch.jpg"])
    assert lun.status().examples_per_label == {"fast_food": 2}
    with Image.open(photo) as image:
        result = lun.forget([image])
    assert result.forgotten == 1
    assert lun.status().examples_per_label == {"fast_food": 1}
    # Turned upright, it is what it was: forgetting it again finds nothing.
    with Image.open(photo) as image, pytest.raises(healthyluncher.LuncherError, match="none of"):
        lun.forget([image])
