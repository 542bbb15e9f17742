"""What a program that imports healthyluncher keeps: the library changes no process-wide
state while it works (warning filters, logging, stderr, ONNX Runtime's default logger,
Pillow's settings and plugins, numpy's BLAS threads), so that the program's other threads
run as they would without it. A fresh Python (`host`) checks what only a process that has
never run the library can show."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

import healthyluncher
from healthyluncher.errors import LuncherError
from tests.conftest import needs_ort, solid


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=models_dir)
    return healthyluncher.open(models_dir)


def host(code: str, *args: object) -> subprocess.CompletedProcess[str]:
    """`code` run by a fresh Python as a program that imports healthyluncher; `args` are
    its sys.argv[1:]."""
    env = {key: value for key, value in os.environ.items() if key != "LUNCHER_DEBUG"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )


def while_decoding(patch: pytest.MonkeyPatch, during: Callable[[], Any]) -> list[Any]:
    """Run `during` while the library reads a photo's metadata (between Pillow opening the
    photo and handing its pixels on); returns what it returned, once per photo."""
    seen: list[Any] = []
    getexif = Image.Image.getexif

    def spy(image: Image.Image) -> Image.Exif:
        seen.append(during())
        return getexif(image)

    patch.setattr(Image.Image, "getexif", spy)
    return seen


# -- Pillow: warning filters, pixel limit, plugins ------------------------------------------


def test_a_photo_decodes_under_the_programs_warning_filters(lun, tmp_path):
    """Filters are process-wide: `catch_warnings` while a photo decoded put an 'ignore all'
    filter in front of every thread's filters (and two decoding threads could leave each
    other's behind)."""
    photo = solid(tmp_path / "plate.jpg", (200, 40, 40))
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.filterwarnings("error", message="the program's own filter")
        programs = list(warnings.filters)
        seen = while_decoding(patch, lambda: list(warnings.filters))
        lun.predict([photo, photo.read_bytes()])
        assert seen and all(filters == programs for filters in seen)
        assert warnings.filters == programs


def test_a_program_thread_warns_as_usual_while_a_photo_decodes(lun, tmp_path):
    photo = solid(tmp_path / "plate.png", (40, 200, 40))

    def warn_in_another_thread() -> None:
        thread = threading.Thread(target=warnings.warn, args=("the program's warning",))
        thread.start()
        thread.join()

    with warnings.catch_warnings(record=True) as shown, pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("always")
        while_decoding(patch, warn_in_another_thread)
        lun.predict([photo])
    assert [str(w.message) for w in shown].count("the program's warning") == 1


def test_pillows_pixel_limit_and_plugins_stay_the_programs(pt_model, tmp_path):
    """Importing the library raised Image.MAX_IMAGE_PIXELS for the whole program, and the
    first HEIC photo registered pillow-heif with Pillow (the program's Image.open then read
    HEIC, and its registered extensions changed)."""
    pillow_heif = pytest.importorskip("pillow_heif")
    heic = tmp_path / "lunch.heic"
    buffer = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", (40, 30), (200, 40, 40))).save(buffer)
    heic.write_bytes(buffer.getvalue())
    jpeg = solid(tmp_path / "lunch.jpg", (40, 200, 40))
    done = host(
        """
        import sys
        from PIL import Image
        Image.init()  # every plugin Pillow has itself, loaded as Image.open would
        def pillow():
            return (Image.MAX_IMAGE_PIXELS, sorted(Image.OPEN), sorted(Image.MIME.items()),
                    sorted(Image.EXTENSION.items()), sorted(Image.SAVE))
        before = pillow()
        import healthyluncher
        assert pillow() == before, "import"
        healthyluncher.make_updatable(sys.argv[1], models_dir=sys.argv[2])
        predictions = healthyluncher.open(sys.argv[2]).predict(sys.argv[3:])
        assert len(predictions) == 2
        assert pillow() == before, [p for p in zip(pillow(), before) if p[0] != p[1]]
        """,
        pt_model,
        tmp_path / "models",
        jpeg,
        heic,
    )
    assert done.returncode == 0, done.stderr


def test_a_lower_pixel_limit_set_by_the_program_is_obeyed(lun, tmp_path):
    photo = solid(tmp_path / "plate.png", (200, 40, 40), size=(40, 30))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
        with pytest.raises(LuncherError, match="too large"):
            lun.predict([photo])
        patch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
        assert lun.predict([photo])[0].label


# -- ONNX Runtime ---------------------------------------------------------------------------


def test_onnx_runtimes_default_logger_stays_as_the_program_set_it(pt_model, tmp_path):
    """The library set ONNX Runtime's default logger to fatal-only for the whole program;
    its own sessions are quiet by their own options instead."""
    photo = solid(tmp_path / "plate.jpg", (200, 40, 40))
    done = host(
        """
        import os, sys
        import onnxruntime
        onnxruntime.set_default_logger_severity(0)  # the program wants everything
        import healthyluncher
        healthyluncher.make_updatable(sys.argv[1], models_dir=sys.argv[2])
        lun = healthyluncher.open(sys.argv[2])
        lun.predict([sys.argv[3]])
        lun.retrain("healthy", [sys.argv[3]])
        lun.retrain("soup", [sys.argv[3]], new_label=True)
        sys.stderr.flush()
        os.write(2, b"THE PROGRAM'S OWN SESSION\\n")
        onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
        """,
        pt_model,
        tmp_path / "models",
        photo,
    )
    assert done.returncode == 0, done.stderr
    programs = done.stderr.split("THE PROGRAM'S OWN SESSION\n", 1)[1]
    assert "[V:onnxruntime" in programs or "[I:onnxruntime" in programs


def test_the_programs_import_of_onnxruntime_training_is_as_without_the_library(pt_model, tmp_path):
    """The library imports ONNX Runtime's training API without running
    onnxruntime/training/__init__.py (which imports torch): it registered that package in
    sys.modules uninitialized, and left it there, so the program's own import of it got an
    empty module instead of what it gets without the library (here, torch's ImportError)."""
    probe = """
        import json, sys

        def own_import():
            try:
                import onnxruntime.training as package
            except ImportError as error:
                return f"ImportError: {error.name}"
            return sorted(name for name in vars(package) if not name.startswith("_"))

        if len(sys.argv) > 1:
            import healthyluncher
            healthyluncher.make_updatable(sys.argv[1], models_dir=sys.argv[2])
            lun = healthyluncher.open(sys.argv[2])
            lun.retrain("healthy", [sys.argv[3]])
            lun.retrain("soup", [sys.argv[3]], new_label=True)
            assert "onnxruntime.training" not in sys.modules
        print(json.dumps(own_import()))
        """
    alone = host(probe)
    photo = solid(tmp_path / "plate.jpg", (200, 40, 40))
    with_library = host(probe, pt_model, tmp_path / "models", photo)
    assert alone.returncode == 0, alone.stderr
    assert with_library.returncode == 0, with_library.stderr
    assert json.loads(with_library.stdout) == json.loads(alone.stdout)


def test_luncher_keeps_onnx_runtimes_default_logger_fatal_only_in_its_own_process(pt_model):
    """luncher's process is its own: ONNX Runtime logs a few things outside any session
    (a thread-affinity failure in a container), which its terminal never showed."""
    done = host(
        """
        import sys
        from healthyluncher.runtime import runtime
        onnxruntime, severities = runtime(), []
        real = onnxruntime.set_default_logger_severity
        onnxruntime.set_default_logger_severity = lambda n: severities.append(n) or real(n)
        from healthyluncher.cli import main
        sys.argv = ["luncher", "make-updatable", sys.argv[1]]
        try:
            main()
        except SystemExit as done:
            assert not done.code, done.code
        print(severities)
        """,
        pt_model,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[4]"


# -- numpy ----------------------------------------------------------------------------------


def test_an_operation_leaves_numpys_blas_threads_as_the_program_set_them(lun, photos):
    """OpenBLAS's thread count is one setting for the whole process: limiting it to one
    while an operation ran (threadpoolctl) slowed the program's own numpy in its other
    threads meanwhile. The `luncher` process starts numpy with one thread instead."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    seen: list[set[int]] = []
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_threads() != {2}:
            pytest.skip(f"this numpy's BLAS cannot run 2 threads here: {blas_threads()}")
        lun.retrain("healthy", photos["red"][:2], progress=lambda _: seen.append(blas_threads()))
        assert seen and all(threads == {2} for threads in seen)
        assert blas_threads() == {2}


# -- stderr, logging and warning filters while the library works ----------------------------


@needs_ort
def test_a_program_thread_keeps_its_stderr_while_training_files_are_written(pt_model, tmp_path):
    """ONNX Runtime's graph builders write INFO lines to fd 2 whatever the log level they
    are not given: the library redirected fd 2 to /dev/null meanwhile, and what the
    program's other threads wrote to stderr then was lost. (A program with a root logging
    handler gets the files written in its own process: see test_artifacts.py.)"""
    done = host(
        """
        import logging, os, sys, threading
        import onnx
        logging.basicConfig()  # the program's own handler: the files are written here
        real_save, written = onnx.save, []

        def save(*args, **kwargs):  # the library writes a training file meanwhile
            line = f"the program's line {len(written)}\\n".encode()
            thread = threading.Thread(target=os.write, args=(2, line))
            thread.start()
            thread.join()
            written.append(line)
            return real_save(*args, **kwargs)

        onnx.save = save
        import healthyluncher
        healthyluncher.make_updatable(sys.argv[1], models_dir=sys.argv[2])
        print(len(written))
        """,
        pt_model,
        tmp_path / "models",
    )
    assert done.returncode == 0, done.stderr
    count = int(done.stdout.split()[-1])
    assert count >= 3  # training, eval and optimizer models at least
    assert done.stderr.splitlines() == [f"the program's line {i}" for i in range(count)]


def test_the_library_leaves_stderr_logging_and_warning_filters_alone(pt_model, tmp_path):
    """Everything a program with no logging configured does with the library: its stderr is
    never redirected (os.dup2), its root logger never gets a handler (logging.basicConfig
    by ONNX Runtime's generator and quantizer), logging is never disabled (the quantizer's
    advice was hidden with logging.disable), the warning filters are the same afterwards
    (the quantizer imports sympy, which adds one), and nothing reaches stderr."""
    photos = tmp_path / "photos"
    for label, colour in (("a", (200, 40, 40)), ("b", (40, 200, 40))):
        for i in range(3):
            solid(photos / label / f"{i}.png", (colour[0], colour[1], 40 + 30 * i))
    done = host(
        """
        import json, logging, os, sys, warnings
        from pathlib import Path
        import numpy, onnx  # what they do when imported is theirs (numpy adds filters)
        calls = []
        real_dup2, real_disable = os.dup2, logging.disable
        os.dup2 = lambda fd, fd2, *a: calls.append(f"os.dup2(_, {fd2})") or real_dup2(fd, fd2, *a)
        logging.disable = lambda level=50: calls.append("logging.disable") or real_disable(level)
        logging.root.addHandler = lambda handler: calls.append(f"root.addHandler({handler})")
        import healthyluncher
        filters = list(warnings.filters)
        model, work = sys.argv[1], Path(sys.argv[2])
        healthyluncher.make_updatable(model, models_dir=work / "one")
        lun = healthyluncher.open(work / "one")
        lun.predict([work / "photos" / "a" / "0.png"])
        lun.retrain("healthy", [work / "photos" / "a"])
        lun.retrain("soup", [work / "photos" / "b"], new_label=True)
        healthyluncher.make_updatable(
            model, models_dir=work / "int8", int8=True, calibration=work / "photos"
        )
        healthyluncher.open(work / "int8").predict([work / "photos" / "b" / "0.png"])
        print(json.dumps({
            "calls": calls,
            "handlers": repr(logging.root.handlers),
            "disable": logging.root.manager.disable,
            "new filters": [repr(f) for f in warnings.filters if f not in filters],
        }))
        """,
        pt_model,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "calls": [],
        "handlers": "[]",
        "disable": 0,
        "new filters": [],
    }
    assert done.stderr == ""
