"""Shared fixtures: every test gets its own models directory and no shipped model."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from healthyluncher.cli import app
from healthyluncher.runtime import training_available
from healthyluncher.training import trainer_name
from tests.models import pytorch_style

# The suite runs with each trainer: LUNCHER_TRAINER=numpy forces the numpy one here.
TRAINER = trainer_name()
needs_ort = pytest.mark.skipif(
    TRAINER != "onnxruntime", reason="trains more than the last layer, or checks ORT's files"
)


def require_ort_training() -> None:
    """For fixtures that build ORT training artifacts themselves (to compare with them)."""
    if not training_available():
        pytest.skip("ONNX Runtime's training API is not installed here")


@pytest.fixture(autouse=True)
def models_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "models"
    monkeypatch.setenv("LUNCHER_MODELS_DIR", str(path))
    # Tests of the shipped model opt back in; the rest must not depend on it.
    monkeypatch.setenv("LUNCHER_BUNDLED_MODEL", "")
    monkeypatch.delenv("LUNCHER_DEBUG", raising=False)  # tests assert on user-facing errors
    return path


@pytest.fixture
def run() -> Callable[..., Result]:
    runner = CliRunner()

    def invoke(*args: str) -> Result:
        result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Result(result.exit_code, result.stdout, result.stderr)

    return invoke


class Result:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code = code
        self.stdout = stdout
        self.stderr = stderr

    def json_lines(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.strip()]

    def __repr__(self) -> str:
        return f"Result(code={self.code}, stdout={self.stdout!r}, stderr={self.stderr!r})"


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> Path:
    """A photo of one colour, with a little texture so JPEG and crops stay realistic."""
    image = Image.new("RGB", size, colour)
    for x in range(0, size[0], 7):
        image.putpixel((x, x % size[1]), tuple(min(255, c + 30) for c in colour))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def label_folders(root: Path, count: int = 10, healthy: str = ".jpg") -> Path:
    """`make-updatable --examples` folders: one subfolder per label, `count` photos each,
    told apart by colour (healthy ones saved as `healthy`, ".jpg" or ".png")."""
    for i in range(count):
        solid(root / "fast_food" / f"f{i}.png", (150 + 10 * i, 20 + 3 * i, 40))
        solid(root / "healthy" / f"h{i}{healthy}", (30, 150 + 10 * i, 40 + 2 * i))
    return root


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, list[Path]]:
    """Reddish and greenish photos: the tiny models tell them apart by mean colour."""
    red = [solid(tmp_path / "red" / f"r{i}.png", (190 + 20 * i, 30, 40)) for i in range(3)]
    green = [solid(tmp_path / "green" / f"g{i}.jpg", (30, 190 + 20 * i, 40)) for i in range(3)]
    return {"red": red, "green": green}


@pytest.fixture
def pt_model(tmp_path: Path) -> Path:
    return pytorch_style(tmp_path / "tiny_pt.onnx")


def one_line_error(result: Result, *fragments: str) -> str:
    """The command failed with exit code 1 and one `error:` line naming every fragment, and
    no traceback; returns that line."""
    assert result.code == 1, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    return lines[0]


@contextlib.contextmanager
def read_only(root: Path) -> Iterator[None]:
    """Every directory under `root` 0o555 and every file without write bits, as a copy
    mounted read-only or a folder of another user looks; restored on leaving."""
    paths = [root, *root.rglob("*")]
    modes = {path: path.stat().st_mode & 0o7777 for path in paths}
    try:
        for path in paths:
            path.chmod(0o555 if path.is_dir() else modes[path] & ~0o222)
        yield
    finally:
        for path in reversed(paths):
            path.chmod(modes[path])


def _without_root_privileges() -> list[str]:
    """What runs a command so that file permissions stop it. Root ignores them (the tests
    may run as root), so as root the command runs without the capabilities that let it
    (setpriv): a 0o555 directory then refuses it as the kernel refuses any user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root, without setpriv to give up overriding permissions")
    caps = "-dac_override,-dac_read_search"
    return [setpriv, f"--inh-caps={caps}", f"--bounding-set={caps}"]


def unprivileged(*args: object) -> subprocess.CompletedProcess[str]:
    """The real command in a subprocess that cannot write where permissions forbid it."""
    return subprocess.run(
        [*_without_root_privileges(), sys.executable, "-m", "healthyluncher", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )


def assert_unwritable(folder: Path) -> None:
    """`unprivileged` cannot create a file in `folder` (else a test proves nothing)."""
    probe = folder / "probe"
    done = subprocess.run(
        [*_without_root_privileges(), sys.executable, "-c", f"open({str(probe)!r}, 'x')"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "PermissionError" in done.stderr, done
    assert not probe.exists()


def answered_at_a_terminal(
    answer: bytes, *args: str, env: dict[str, str] | None = None
) -> tuple[int, bytes, bytes]:
    """`luncher ARGS` with a terminal for standard input, where a person types `answer`;
    (exit code, stdout, stderr)."""
    import pty

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "healthyluncher", *args],
            stdin=secondary,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        os.write(primary, answer)
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(primary)
        os.close(secondary)
    return proc.returncode, out, err
