"""The thumbnails of your photos, and what one read back from a backup must be.

`Embedder` keeps every photo it embeds as a JPEG at the size the base reads: its short side
at most the base's resize (so at most settings.MAX_SIDE), no side longer than JPEG allows.
`repair`, a new base and `import --rebuild` embed the photos again from them, decoding each
as a photo (imaging.decode). A thumbnail in a backup is checked the same way before it is
installed, so one that cannot be embedded is refused at import, not found out when the photo
it stands for is needed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from healthyluncher.errors import LuncherError
from healthyluncher.photos import MAX_FILE_BYTES
from healthyluncher.settings import MAX_SIDE, Preprocessing

JPEG_MAGIC = b"\xff\xd8\xff"
# The longest side a JPEG thumbnail can have (libjpeg's limit).
JPEG_MAX_SIDE = 65500
# A thumbnail is read back no larger than any photo luncher reads.
MAX_THUMBNAIL_BYTES = MAX_FILE_BYTES
# Decoded at full size, as `repair` decodes a thumbnail of any base (whose resize is at
# most MAX_SIDE): no draft mode, no reduction.
_AS_STORED = Preprocessing(height=1, width=1, resize=MAX_SIDE)


def thumbnail_problem(path: Path, name: str) -> str | None:
    """Why the file at `path` is not a thumbnail luncher can embed again, in words that call
    it `name`; None when it is one: a JPEG no larger than a photo luncher reads, that decodes
    whole, no larger than a thumbnail luncher writes."""
    from healthyluncher.imaging import decode  # Pillow: not for export

    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_THUMBNAIL_BYTES + 1)
    except OSError as exc:
        return f"{name}: cannot be read ({exc.strerror or exc})"
    if len(data) > MAX_THUMBNAIL_BYTES:
        return f"{name}: is larger than {MAX_THUMBNAIL_BYTES // 2**20} MiB"
    if not data.startswith(JPEG_MAGIC):
        return f"{name} is not a JPEG"
    try:
        width, height = decode(data, _AS_STORED, name=name).size
    except LuncherError as exc:
        return str(exc)
    if min(width, height) > MAX_SIDE or max(width, height) > JPEG_MAX_SIDE:
        return f"{name}: is {width}x{height} pixels, larger than any thumbnail luncher writes"
    return None


def make_room(target: Path) -> None:
    """Before a thumbnail is written at `target`: a directory there (damage, which no file
    can replace) is removed. Called under the writers' lock, on a name of the thumbnails."""
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)
