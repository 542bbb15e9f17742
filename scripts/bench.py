"""Benchmark `luncher` as whole processes against floors and the upstream ORT recipe.

Every scenario is a separate process, measured for wall time, CPU time and peak RSS
(`os.wait4` in a small forking launcher, so the peak is the child's own). Runs are
interleaved: run 1 of every scenario, then run 2, ..., so a floor and the scenario compared
with it are measured seconds apart and their ratio survives a noisy, shared machine.
Ratios are computed per run and summarized by their median and range.

Usage (from the repository root)::

    .venv/bin/python scripts/bench.py             # 5 runs, about 6 minutes on 2 cores
    .venv/bin/python scripts/bench.py --quick     # 1 run, fewer photos: a smoke check
    .venv/bin/python scripts/bench.py --only predict-one,floor-one --runs 5

Results go to bench-results/latest.md and bench-results/latest.json (see --out).

Photos: real food photos are read from --photos (default ../shared/food, never copied
into the repository; the bench links to them from a temporary directory). Without them,
synthetic JPEGs (gradients, blobs and noise, ~512 px) are written to the temporary
directory. Phone-size photos are 20 of those, upscaled to 4032x3024 with mild sensor-like
noise and saved at JPEG quality 90.

Floors and the upstream recipe are small scripts written to the temporary directory:

- floor: onnxruntime + numpy + pillow, the same model, PIL open, convert RGB, resize the
  short side to 256 (bilinear), centre-crop 224, (x - 127) / 128, NCHW, batches of 8.
  It decodes every pixel (no JPEG draft mode).
- upstream: ONNX Runtime training artifacts over the whole graph (backbone parameters in
  frozen_params, only the last Gemm's weights require grad), as in the upstream
  on-device training examples. The photos are decoded once, then every epoch runs the
  backbone again inside the training session. Ends with export_model_for_inferencing
  and a checkpoint, as the library ends by publishing a model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models" / "healthyluncher-base.onnx"
DEFAULT_PHOTOS = REPO.parent / "shared" / "food"
DEFAULT_OUT = REPO / "bench-results" / "latest"
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
# Food-101 photos are at most 512 px; the few larger ones (fruit, up to 1024 px) are left
# out so the "~512 px" sets stay what they say.
MAX_POOL_SIDE = 640
PHONE_SIZE = (4032, 3024)  # a 12 MP phone photo, landscape
PHONE_QUALITY = 90
FLOOR_BATCH = 8
# The upstream recipe: the library's batch size, and the learning rate of the Core ML
# example (the library's own default, 1e-3, is gentler because of its replay and memory).
UPSTREAM_BATCH = 16
UPSTREAM_LR = 0.01
# Memory scenarios run in the first run only: the 1,000-photo retrain takes minutes, and a
# peak RSS or an RSS trend does not need a median (--memory-every-run to repeat them).
MEMORY_SCENARIOS = frozenset({"retrain-1000", "soak"})


@dataclass(frozen=True)
class Sizes:
    """How many photos each scenario uses."""

    many: int = 200  # predict in one call
    phone: int = 20
    retrain_small: int = 20
    retrain_large: int = 200
    retrain_huge: int = 1000
    soak_retrains: int = 100
    soak_photos: int = 20  # the soak cycles through these, 5 per retrain
    soak_epochs: int = 3


QUICK_SIZES = Sizes(
    many=40,
    phone=5,
    retrain_small=20,
    retrain_large=40,
    retrain_huge=100,
    soak_retrains=12,
    soak_photos=20,
    soak_epochs=2,
)


@dataclass
class Sample:
    """One measured process."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    returncode: int
    extra: dict[str, Any] = field(default_factory=dict)
    error: str = ""


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    command: str  # what runs, for the table


@dataclass(frozen=True)
class Target:
    """A ratio (or absolute value) with the direction that passes."""

    name: str
    numerator: str
    denominator: str | None  # None: an absolute value of `numerator`
    limit: float
    at_most: bool  # True: value <= limit passes; False: value >= limit passes
    unit: str = "x"
    metric: str = "wall_s"
    note: str = ""


# -- child scripts ---------------------------------------------------------------------

LAUNCHER_SCRIPT = '''\
"""Fork, exec and wait for one command; write its own rusage (scripts/bench.py)."""
import json
import os
import sys
import time

out, command = sys.argv[1], sys.argv[2:]
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(command[0], command)
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)  # this child alone; ru_maxrss in KiB
wall = time.perf_counter() - start
with open(out, "w") as handle:
    json.dump(
        {
            "wall_s": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime,
            "maxrss_kb": usage.ru_maxrss,
            "returncode": os.waitstatus_to_exitcode(status),
        },
        handle,
    )
'''

# The simplest correct preprocessing, shared by the floor and the upstream scripts.
SIMPLE_TENSOR = """\
def tensor(path):
    with Image.open(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    size = (max(224, round(width * scale)), max(224, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - 224) // 2, (size[1] - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    return ((np.asarray(image, np.float32) - 127.0) / 128.0).transpose(2, 0, 1)
"""

FLOOR_SCRIPT = (
    '''\
"""Predict floor written by scripts/bench.py: the least a correct process must do."""
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


'''
    + SIMPLE_TENSOR
    + """

def main():
    model, batch, listing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    paths = [p for p in open(listing).read().splitlines() if p]
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        logits = session.run(None, {name: np.stack([tensor(p) for p in chunk])})[0]
        for path, row in zip(chunk, logits):
            print(path, int(np.argmax(row)))


main()
"""
)

UPSTREAM_ARTIFACTS_SCRIPT = '''\
"""Whole-graph training artifacts (upstream recipe), written by scripts/bench.py."""
import json
import sys
from pathlib import Path

import onnx

from healthyluncher.runtime import _TRAINING_LOCK, _training_package, runtime

runtime()
with _TRAINING_LOCK, _training_package():  # without onnxruntime/training/__init__ (torch)
    from onnxruntime.training import artifacts
model_path, directory = sys.argv[1], Path(sys.argv[2])
model = onnx.load(model_path)
weights = {t.name for t in model.graph.initializer}
last_gemm = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
requires_grad = [name for name in last_gemm.input if name in weights]
frozen = sorted(weights - set(requires_grad))
directory.mkdir(parents=True, exist_ok=True)
artifacts.generate_artifacts(
    model,
    requires_grad=requires_grad,
    frozen_params=frozen,
    loss=artifacts.LossType.CrossEntropyLoss,
    optimizer=artifacts.OptimType.AdamW,
    artifact_directory=str(directory),
)
for name in ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx"):
    part = onnx.load(str(directory / name))
    if part.ir_version > 10:  # ORT 1.19 reads IR <= 10; onnx >= 1.18 writes 14
        part.ir_version = 10
        onnx.save(part, str(directory / name))
info = {
    "requires_grad": requires_grad,
    "frozen_params": len(frozen),
    "output": model.graph.output[0].name,
}
(directory / "info.json").write_text(json.dumps(info))
'''

UPSTREAM_TRAIN_SCRIPT = (
    '''\
"""Upstream on-device training recipe over the whole graph, written by scripts/bench.py."""
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from healthyluncher.runtime import training_api


'''
    + SIMPLE_TENSOR
    + """

def main():
    directory, out = Path(sys.argv[1]), Path(sys.argv[2])
    epochs, batch = int(sys.argv[3]), int(sys.argv[4])
    lr, label = float(sys.argv[5]), int(sys.argv[6])
    paths = [p for p in open(sys.argv[7]).read().splitlines() if p]
    info = json.loads((directory / "info.json").read_text())
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(directory / "checkpoint"))
    module = api.Module(
        str(directory / "training_model.onnx"), state, str(directory / "eval_model.onnx")
    )
    optimizer = api.Optimizer(str(directory / "optimizer_model.onnx"), module)
    optimizer.set_learning_rate(lr)
    images = np.stack([tensor(p) for p in paths])  # (N, 3, 224, 224) float32
    labels = np.full(len(images), label, np.int64)
    rng = np.random.default_rng(0)
    module.train()
    for _ in range(epochs):
        order = rng.permutation(len(images))
        for start in range(0, len(images), batch):
            idx = order[start : start + batch]
            module(images[idx], labels[idx])
            optimizer.step()
            module.lazy_reset_grad()
    module.eval()
    out.mkdir(parents=True, exist_ok=True)
    module.export_model_for_inferencing(str(out / "inference.onnx"), [info["output"]])
    api.CheckpointState.save_checkpoint(state, str(out / "checkpoint"))


main()
"""
)

SOAK_SCRIPT = '''\
"""Many retrains in one process through the library API, written by scripts/bench.py."""
import json
import sys
import time
from pathlib import Path

import healthyluncher


def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    models, count, epochs, labels = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    out = Path(sys.argv[5])
    paths = [Path(p) for p in open(sys.argv[6]).read().splitlines() if p]
    labels = labels.split(",")
    lun = healthyluncher.open(models)
    rss, seconds, retrains = [], [], 0
    for i in range(count):
        start = (i * 5) % len(paths)
        began = time.perf_counter()
        result = lun.retrain(labels[i % len(labels)], paths[start : start + 5], epochs=epochs)
        seconds.append(round(time.perf_counter() - began, 4))
        retrains += len(result.photos) > 0
        rss.append(round(rss_mb(), 2))
    out.write_text(json.dumps({"rss_mb": rss, "seconds": seconds, "retrains": retrains}))


main()
'''


# -- measuring -------------------------------------------------------------------------


def measure(
    launcher: Path, command: list[str], env: dict[str, str], log_dir: Path, name: str
) -> Sample:
    """Run one process to completion: wall time, CPU time and its own peak RSS.

    The bench does not spawn the process itself: Linux carries a process's RSS high-water
    mark across exec, and Python's subprocess forks (vfork) from this process, so the
    child's ru_maxrss would never read below the bench's own peak (hundreds of MB after
    making the phone photos). A small launcher (`python -S`, ~8 MB) forks and waits instead.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / f"{name}.out"
    stderr_path = log_dir / f"{name}.err"
    usage_path = log_dir / f"{name}.usage.json"
    with open(stdout_path, "wb") as stdout, open(stderr_path, "wb") as stderr:
        subprocess.run(
            [sys.executable, "-S", str(launcher), str(usage_path), *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            check=True,
        )
    usage = json.loads(usage_path.read_text())
    sample = Sample(
        wall_s=usage["wall_s"],
        cpu_s=usage["cpu_s"],
        peak_rss_mb=usage["maxrss_kb"] / 1024,
        returncode=usage["returncode"],
    )
    if sample.returncode != 0:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-3:]
        sample.error = " | ".join(tail) or f"exit code {sample.returncode}"
    return sample


def check(command: list[str], env: dict[str, str] | None = None) -> str:
    """An untimed setup step that must succeed; returns its stdout."""
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"setup step failed ({result.returncode}): {' '.join(command)}\n{result.stderr}"
        )
    return result.stdout


def shown(path: Path) -> str:
    """A path as the report shows it: relative to the repository where it can be."""
    resolved = path.resolve()
    for root, prefix in ((REPO, ""), (REPO.parent, "../")):
        if resolved.is_relative_to(root):
            return prefix + str(resolved.relative_to(root))
    return str(path)


# -- photos ----------------------------------------------------------------------------


def food_photos(root: Path) -> list[Path]:
    """Real ~512 px photos under root/healthy and root/fast_food, in a fixed shuffled order."""
    found: list[Path] = []
    for label in ("healthy", "fast_food"):
        folder = root / label
        if folder.is_dir():
            found.extend(p for p in folder.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    kept = []
    for path in sorted(found):
        try:
            with Image.open(path) as image:
                if max(image.size) <= MAX_POOL_SIDE:
                    kept.append(path)
        except OSError:
            continue
    random.Random(0).shuffle(kept)
    return kept


def synthetic_photo(path: Path, seed: int, size: tuple[int, int] = (512, 384)) -> None:
    """Gradients, a few plate-like blobs and sensor noise: JPEG statistics like a photo's."""
    rng = np.random.default_rng(seed)
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.zeros((height, width, 3), np.float32)
    for channel in range(3):
        a, b, c = rng.uniform(-0.4, 0.4, 3)
        pixels[..., channel] = 128 + 120 * (a * xs / width + b * ys / height + c)
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        rx, ry = rng.uniform(20, width / 3), rng.uniform(20, height / 3)
        mask = ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 < 1
        pixels[mask] = rng.uniform(0, 255, 3)
    pixels += rng.normal(0, 8, pixels.shape)
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)


def phone_photo(source: Path, target: Path, seed: int) -> None:
    """Centre-crop to 4:3, upscale to 4032x3024, add mild noise, save at quality 90.

    Without the noise an upscaled photo compresses to a fraction of a real phone JPEG's
    size, and entropy decoding (which draft mode cannot skip) would be flattered.
    """
    with Image.open(source) as opened:
        image = opened.convert("RGB")
    width, height = image.size
    aspect = PHONE_SIZE[0] / PHONE_SIZE[1]
    if width / height > aspect:
        crop_w, crop_h = round(height * aspect), height
    else:
        crop_w, crop_h = width, round(width / aspect)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    image = image.resize(
        PHONE_SIZE, Image.Resampling.BICUBIC, box=(left, top, left + crop_w, top + crop_h)
    )
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 3, (PHONE_SIZE[1], PHONE_SIZE[0], 1)).astype(np.float32)
    pixels = np.asarray(image, np.float32) + noise
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(target, quality=PHONE_QUALITY)


@dataclass(frozen=True)
class PhotoSets:
    source: str
    one: Path  # a photo
    many: Path  # directories of photos (symlinks to the real ones)
    phone: Path
    small: Path
    large: Path
    huge: Path
    soak: Path  # a listing file: one path per line
    phone_mb: float


def prepare_photos(photos_dir: Path, sizes: Sizes, work: Path) -> PhotoSets:
    pool = food_photos(photos_dir) if photos_dir.is_dir() else []
    needed = max(sizes.many, sizes.retrain_huge, sizes.retrain_large, sizes.phone)
    source = f"{len(pool)} real photos from {shown(photos_dir)}" if pool else "synthetic"
    if len(pool) < needed:
        synthetic = work / "synthetic"
        synthetic.mkdir()
        for index in range(needed - len(pool)):
            path = synthetic / f"synthetic-{index:04d}.jpg"
            synthetic_photo(path, seed=index)
            pool.append(path)
        if source != "synthetic":
            source += f", topped up with {needed - len(pool)} synthetic"

    def linked(name: str, count: int) -> Path:
        folder = work / "sets" / name
        folder.mkdir(parents=True)
        for path in pool[:count]:
            (folder / path.name).symlink_to(path.resolve())
        return folder

    phone = work / "sets" / "phone"
    phone.mkdir(parents=True)
    for index, path in enumerate(pool[: sizes.phone]):
        phone_photo(path, phone / f"phone-{index:02d}.jpg", seed=index)
    phone_bytes = [p.stat().st_size for p in phone.iterdir()]
    soak = work / "sets" / "soak.txt"
    soak.write_text("\n".join(str(p) for p in pool[: sizes.soak_photos]))
    return PhotoSets(
        source=source,
        one=pool[0],
        many=linked("many", sizes.many),
        phone=phone,
        small=linked("small", sizes.retrain_small),
        large=linked("large", sizes.retrain_large),
        huge=linked("huge", sizes.retrain_huge),
        soak=soak,
        phone_mb=statistics.mean(phone_bytes) / 2**20,
    )


def listing(folder: Path, target: Path) -> Path:
    """A file naming the photos in `folder`, sorted as luncher sorts them."""
    target.write_text("\n".join(str(p) for p in sorted(folder.iterdir())))
    return target


# -- the bench -------------------------------------------------------------------------


class Bench:
    """Holds the workspace and runs each scenario once per call."""

    def __init__(self, model: Path, photos: PhotoSets, sizes: Sizes, work: Path) -> None:
        self.model = model
        self.photos = photos
        self.sizes = sizes
        self.work = work
        self.python = sys.executable
        self.run_number = 0  # which of the interleaved runs is going on
        self.luncher = str(Path(sys.executable).parent / "luncher")
        if not Path(self.luncher).exists():
            self.luncher = shutil.which("luncher") or "luncher"
        replay = model.with_name(model.stem + ".replay.npz")
        self.replay = replay if replay.is_file() else None
        self.scripts = work / "scripts"
        self.scripts.mkdir()
        for name, text in (
            ("launch.py", LAUNCHER_SCRIPT),
            ("floor.py", FLOOR_SCRIPT),
            ("upstream_artifacts.py", UPSTREAM_ARTIFACTS_SCRIPT),
            ("upstream_train.py", UPSTREAM_TRAIN_SCRIPT),
            ("soak.py", SOAK_SCRIPT),
        ):
            (self.scripts / name).write_text(text)
        self.lists = work / "lists"
        self.lists.mkdir()
        self.one_list = self.lists / "one.txt"
        self.one_list.write_text(str(photos.one))
        self.upstream = work / "upstream-artifacts"
        self.logs = work / "logs"
        self.counter = 0
        self.labels: list[str] = []

    # -- setup ---------------------------------------------------------------------------

    def env(self, models_dir: Path | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("LUNCHER_BUNDLED_MODEL", None)
        if models_dir is not None:
            env["LUNCHER_MODELS_DIR"] = str(models_dir)
        return env

    def fresh_models_dir(self, updatable: bool = True) -> Path:
        """A new models directory, made updatable from the model (untimed)."""
        self.counter += 1
        models_dir = self.work / "models" / f"m{self.counter:03d}"
        models_dir.parent.mkdir(exist_ok=True)
        if updatable:
            command = [self.luncher, "make-updatable", str(self.model)]
            if self.replay is not None:
                command += ["--replay", str(self.replay)]
            check(command, self.env(models_dir))
        return models_dir

    def setup(self, upstream: bool = True) -> None:
        # Measure the tool as `pip install` leaves it, with bytecode: an editable install
        # under PYTHONDONTWRITEBYTECODE=1 would compile every module on every run.
        where = "import healthyluncher, os; print(os.path.dirname(healthyluncher.__file__))"
        package = check([self.python, "-c", where], self.env()).strip()
        check([self.python, "-m", "compileall", "-q", package], self.env())
        models_dir = self.fresh_models_dir()
        status = json.loads(check([self.luncher, "status", "--json"], self.env(models_dir)))
        self.labels = list(status["labels"])
        if upstream:
            print("building the upstream artifacts", file=sys.stderr)
            check(
                [self.python, str(self.scripts / "upstream_artifacts.py"), str(self.model)]
                + [str(self.upstream)],
                self.env(),
            )
        shutil.rmtree(models_dir)

    def drop(self, models_dir: Path) -> None:
        shutil.rmtree(models_dir, ignore_errors=True)

    def run(self, name: str, command: list[str], env: dict[str, str]) -> Sample:
        self.counter += 1
        launcher = self.scripts / "launch.py"
        return measure(launcher, command, env, self.logs, f"{self.counter:04d}-{name}")

    # -- scenarios -----------------------------------------------------------------------

    def help(self) -> dict[str, Sample]:
        return {"help": self.run("help", [self.luncher, "--help"], self.env())}

    def status(self) -> dict[str, Sample]:
        models_dir = self.fresh_models_dir()
        sample = self.run("status", [self.luncher, "status"], self.env(models_dir))
        self.drop(models_dir)
        return {"status": sample}

    def floor(self, key: str, folder_or_list: Path) -> dict[str, Sample]:
        if folder_or_list.is_dir():
            folder_or_list = listing(folder_or_list, self.lists / f"{key}.txt")
        command = [self.python, str(self.scripts / "floor.py"), str(self.model)]
        command += [str(FLOOR_BATCH), str(folder_or_list)]
        return {key: self.run(key, command, self.env())}

    def predict(self, key: str, target: Path) -> dict[str, Sample]:
        models_dir = self.fresh_models_dir()
        sample = self.run(key, [self.luncher, "predict", str(target)], self.env(models_dir))
        self.drop(models_dir)
        return {key: sample}

    def first_use(self) -> dict[str, Sample]:
        """predict in an empty models directory: it initializes itself from the shipped base."""
        models_dir = self.fresh_models_dir(updatable=False)
        env = self.env(models_dir)
        env["LUNCHER_BUNDLED_MODEL"] = str(self.model)
        sample = self.run("first-use", [self.luncher, "predict", str(self.photos.one)], env)
        self.drop(models_dir)
        return {"first-use": sample}

    def retrain(
        self, key: str, folder: Path, epochs: int, *extra: str, label: int = 0
    ) -> list[str]:
        return [self.luncher, "retrain", "--label", self.labels[label], "--epochs", str(epochs)] + [
            *extra,
            str(folder),
        ]

    def retrain_small(self) -> dict[str, Sample]:
        """First retrain of 20 photos, then the same again (every photo from the cache)."""
        models_dir = self.fresh_models_dir()
        command = self.retrain("retrain-20x10", self.photos.small, 10)
        first = self.run("retrain-20x10", command, self.env(models_dir))
        numpy_env = self.env(models_dir)
        numpy_env["LUNCHER_TRAINER"] = "numpy"  # the trainer of Python 3.13 and 3.14
        # The two cached retrains take turns going first from run to run: the second of
        # a pair finds the files the first one just read in the page cache. The first
        # teaches the photos the other label and the second the first label again: taught
        # again with the label they have, the photos would change nothing (no retrain).
        moved = self.retrain("retrain-20x10", self.photos.small, 10, label=1)
        if self.run_number % 2 == 0:
            again = self.run("retrain-again", moved, self.env(models_dir))
            again_numpy = self.run("retrain-again-numpy", command, numpy_env)
        else:
            again_numpy = self.run("retrain-again-numpy", moved, numpy_env)
            again = self.run("retrain-again", command, self.env(models_dir))
        self.drop(models_dir)
        return {
            "retrain-20x10": first,
            "retrain-again": again,
            "retrain-again-numpy": again_numpy,
        }

    def retrain_views1(self) -> dict[str, Sample]:
        models_dir = self.fresh_models_dir()
        command = self.retrain("retrain-20x10-views1", self.photos.small, 10, "--views", "1")
        sample = self.run("retrain-20x10-views1", command, self.env(models_dir))
        self.drop(models_dir)
        return {"retrain-20x10-views1": sample}

    def retrain_views8(self) -> dict[str, Sample]:
        """Every photo with 8 augmented views: what augmentation costs on top."""
        models_dir = self.fresh_models_dir()
        command = self.retrain("retrain-20x10-views8", self.photos.small, 10, "--views", "8")
        sample = self.run("retrain-20x10-views8", command, self.env(models_dir))
        self.drop(models_dir)
        return {"retrain-20x10-views8": sample}

    def retrain_large(self) -> dict[str, Sample]:
        models_dir = self.fresh_models_dir()
        command = self.retrain("retrain-200x5", self.photos.large, 5)
        sample = self.run("retrain-200x5", command, self.env(models_dir))
        self.drop(models_dir)
        return {"retrain-200x5": sample}

    def retrain_huge(self) -> dict[str, Sample]:
        """~1,000 photos at default epochs with 8 views each (the default would give them one
        view each): the most memory a retrain of them can take."""
        models_dir = self.fresh_models_dir()
        command = [self.luncher, "retrain", "--label", self.labels[0], "--views", "8"]
        command.append(str(self.photos.huge))
        sample = self.run("retrain-1000", command, self.env(models_dir))
        self.drop(models_dir)
        return {"retrain-1000": sample}

    def upstream_train(self, key: str, folder: Path, epochs: int) -> dict[str, Sample]:
        photos = listing(folder, self.lists / f"{key}.txt")
        out = self.work / "upstream-out"
        command = [self.python, str(self.scripts / "upstream_train.py"), str(self.upstream)]
        command += [str(out), str(epochs), str(UPSTREAM_BATCH), str(UPSTREAM_LR), "0"]
        command += [str(photos)]
        sample = self.run(key, command, self.env())
        shutil.rmtree(out, ignore_errors=True)
        return {key: sample}

    def soak(self) -> dict[str, Sample]:
        models_dir = self.fresh_models_dir()
        out = self.work / f"soak-{self.counter}.json"
        command = [self.python, str(self.scripts / "soak.py"), str(models_dir)]
        command += [str(self.sizes.soak_retrains), str(self.sizes.soak_epochs)]
        command += [",".join(self.labels), str(out), str(self.photos.soak)]
        sample = self.run("soak", command, self.env(models_dir))
        if sample.returncode == 0:
            data = json.loads(out.read_text())
            rss = data["rss_mb"]
            early = rss[min(9, len(rss) - 1)]
            sample.extra = {
                "rss_mb": rss,
                "seconds": data["seconds"],
                "retrains": data["retrains"],
                "rss_after_10_mb": early,
                "rss_after_last_mb": rss[-1],
                "growth_mb": rss[-1] - early,
            }
        self.drop(models_dir)
        return {"soak": sample}

    def plan(self) -> list[tuple[str, Callable[[], dict[str, Sample]]]]:
        """Scenario groups in run order; each floor runs right beside what it bounds."""
        p = self.photos
        return [
            ("help", self.help),
            ("status", self.status),
            ("floor-one", lambda: self.floor("floor-one", self.one_list)),
            ("predict-one", lambda: self.predict("predict-one", p.one)),
            ("first-use", self.first_use),
            ("floor-many", lambda: self.floor("floor-many", p.many)),
            ("predict-many", lambda: self.predict("predict-many", p.many)),
            ("floor-phone", lambda: self.floor("floor-phone", p.phone)),
            ("predict-phone", lambda: self.predict("predict-phone", p.phone)),
            ("floor-20", lambda: self.floor("floor-20", p.small)),
            ("retrain-20x10", self.retrain_small),
            ("retrain-20x10-views1", self.retrain_views1),
            ("retrain-20x10-views8", self.retrain_views8),
            ("upstream-20x10", lambda: self.upstream_train("upstream-20x10", p.small, 10)),
            ("floor-200", lambda: self.floor("floor-200", p.large)),
            ("retrain-200x5", self.retrain_large),
            ("upstream-200x5", lambda: self.upstream_train("upstream-200x5", p.large, 5)),
            ("retrain-1000", self.retrain_huge),
            ("soak", self.soak),
        ]


def scenarios(sizes: Sizes) -> list[Scenario]:
    """What each measured key means, in table order."""
    s = sizes
    return [
        Scenario("help", "`luncher --help`, cold start", "luncher --help"),
        Scenario("status", "`luncher status`, cold start", "luncher status"),
        Scenario("floor-one", "floor: 1 photo", "floor.py (1 photo)"),
        Scenario("predict-one", "predict 1 photo, cold start", "luncher predict PHOTO"),
        Scenario(
            "first-use",
            "predict 1 photo in an empty models dir (initializes from the shipped base)",
            "luncher predict PHOTO",
        ),
        Scenario("floor-many", f"floor: {s.many} photos ~512 px", f"floor.py ({s.many})"),
        Scenario("predict-many", f"predict {s.many} photos ~512 px", "luncher predict DIR"),
        Scenario("floor-phone", f"floor: {s.phone} phone photos 4032x3024", "floor.py"),
        Scenario(
            "predict-phone", f"predict {s.phone} phone photos 4032x3024", "luncher predict DIR"
        ),
        Scenario("floor-20", f"floor: the {s.retrain_small} retrain photos", "floor.py"),
        Scenario(
            "retrain-20x10",
            f"retrain {s.retrain_small} new photos, 10 epochs, default settings "
            "(views: 32 per retrain, so 1 per photo here)",
            "luncher retrain --label L --epochs 10 DIR",
        ),
        Scenario(
            "retrain-again",
            "the same retrain again (every photo from the cache)",
            "luncher retrain --label L --epochs 10 DIR",
        ),
        Scenario(
            "retrain-again-numpy",
            "the same again with the numpy trainer (LUNCHER_TRAINER=numpy)",
            "LUNCHER_TRAINER=numpy luncher retrain --label L --epochs 10 DIR",
        ),
        Scenario(
            "retrain-20x10-views1",
            f"retrain {s.retrain_small} new photos, 10 epochs, augmentation off",
            "luncher retrain --label L --epochs 10 --views 1 DIR",
        ),
        Scenario(
            "retrain-20x10-views8",
            f"retrain {s.retrain_small} new photos, 10 epochs, 8 views per photo",
            "luncher retrain --label L --epochs 10 --views 8 DIR",
        ),
        Scenario(
            "upstream-20x10",
            f"upstream whole-graph recipe, {s.retrain_small} photos x 10 epochs",
            "upstream_train.py",
        ),
        Scenario("floor-200", f"floor: the {s.retrain_large} retrain photos", "floor.py"),
        Scenario(
            "retrain-200x5",
            f"retrain {s.retrain_large} new photos, 5 epochs, default settings (1 view each)",
            "luncher retrain --label L --epochs 5 DIR",
        ),
        Scenario(
            "upstream-200x5",
            f"upstream whole-graph recipe, {s.retrain_large} photos x 5 epochs",
            "upstream_train.py",
        ),
        Scenario(
            "retrain-1000",
            f"retrain {s.retrain_huge} new photos, default epochs, 8 views per photo",
            "luncher retrain --label L --views 8 DIR",
        ),
        Scenario(
            "soak",
            f"{s.soak_retrains} retrains in one process via the API "
            f"(5 photos each, {s.soak_epochs} epochs)",
            "Luncher.retrain(...) in a loop",
        ),
    ]


def targets(sizes: Sizes) -> list[Target]:
    s = sizes
    return [
        Target(
            "upstream 20x10 / retrain 20x10 (speed-up)",
            "upstream-20x10",
            "retrain-20x10",
            7.0,
            at_most=False,
        ),
        Target(
            "retrain 20x10 --views 1 / floor for those photos",
            "retrain-20x10-views1",
            "floor-20",
            1.3,
            at_most=True,
        ),
        Target("retrain again / first retrain", "retrain-again", "retrain-20x10", 0.5, True),
        Target(
            "retrain again, numpy trainer / ONNX Runtime",
            "retrain-again-numpy",
            "retrain-again",
            1.0,
            at_most=True,
        ),
        Target(
            f"predict {s.phone} phone photos / floor (per photo)",
            "predict-phone",
            "floor-phone",
            0.4,
            at_most=True,
        ),
        Target(
            f"predict {s.many} throughput / floor throughput",
            "floor-many",
            "predict-many",
            0.9,
            at_most=False,
            note="floor time / predict time",
        ),
        Target("predict 1 photo cold / floor process", "predict-one", "floor-one", 1.2, True),
        Target("`luncher --help` wall time", "help", None, 0.3, True, unit=" s"),
        Target(
            f"RSS growth, retrain 10 -> {s.soak_retrains} in one process",
            "soak",
            None,
            5.0,
            True,
            unit=" MB",
            metric="growth_mb",
        ),
        Target(
            f"peak RSS, retrain on {s.retrain_huge} photos",
            "retrain-1000",
            None,
            400.0,
            True,
            unit=" MB",
            metric="peak_rss_mb",
        ),
        Target(
            "upstream 200x5 / retrain 200x5 (speed-up)",
            "upstream-200x5",
            "retrain-200x5",
            0.0,
            at_most=False,
            note="no target",
        ),
        Target("retrain 200x5 / floor for those photos", "retrain-200x5", "floor-200", 0, True),
        Target("retrain 20x10 / floor for those photos", "retrain-20x10", "floor-20", 0, True),
        Target(
            "retrain 20x10 --views 8 / --views 1 (augmentation's share)",
            "retrain-20x10-views8",
            "retrain-20x10-views1",
            0,
            True,
        ),
        Target(
            "retrain 20x10 --views 8 / floor for those photos",
            "retrain-20x10-views8",
            "floor-20",
            0,
            True,
        ),
    ]


# -- summarizing -----------------------------------------------------------------------


def value_of(sample: Sample, metric: str) -> float:
    if metric in sample.extra:
        return float(sample.extra[metric])
    return float(getattr(sample, metric))


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(
    results: dict[str, list[Sample]], sizes: Sizes
) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    per_scenario: dict[str, dict[str, Any]] = {}
    for key, samples in results.items():
        good = [s for s in samples if s.returncode == 0]
        entry: dict[str, Any] = {"runs": len(samples), "failed": len(samples) - len(good)}
        if good:
            entry["wall_s"] = spread([s.wall_s for s in good])
            entry["cpu_s"] = spread([s.cpu_s for s in good])
            entry["peak_rss_mb"] = spread([s.peak_rss_mb for s in good])
        per_scenario[key] = entry
    checks = []
    for target in targets(sizes):
        top = results.get(target.numerator, [])
        bottom = results.get(target.denominator, []) if target.denominator else None
        values = []
        for index, sample in enumerate(top):
            if sample.returncode != 0:
                continue
            value = value_of(sample, target.metric)
            if bottom is not None:
                if index >= len(bottom) or bottom[index].returncode != 0:
                    continue
                value /= value_of(bottom[index], target.metric)
            values.append(value)
        row: dict[str, Any] = {**asdict(target), "values": values}
        if target.metric == "wall_s":
            cpu = []
            for index, sample in enumerate(top):
                if sample.returncode != 0:
                    continue
                if bottom is None:
                    cpu.append(sample.cpu_s)
                elif index < len(bottom) and bottom[index].returncode == 0:
                    cpu.append(sample.cpu_s / bottom[index].cpu_s)
            if cpu:
                row["cpu_median"] = statistics.median(cpu)
        if values:
            row.update(spread(values))
            median = row["median"]
            if target.limit:
                row["passed"] = median <= target.limit if target.at_most else median >= target.limit
        checks.append(row)
    return per_scenario, checks


def markdown(report: dict[str, Any], sizes: Sizes) -> str:
    env = report["environment"]
    lines = [
        "# healthyluncher benchmark",
        "",
        f"- date: {report['date']}; commit {env['commit']}; `{report['command']}`",
        f"- machine: {env['cpus']} CPUs, {env['memory_gb']:.1f} GB, load average "
        f"{env['load_before']} before, {env['load_after']} after; Python {env['python']}, "
        f"onnxruntime {env['onnxruntime']}",
        f"- model: `{report['model']}` (sha256 {report['model_sha256'][:12]})",
        f"- photos: {report['photos']['source']}; phone photos average "
        f"{report['photos']['phone_mb']:.1f} MB",
        f"- {report['runs']} run(s), interleaved; median and (min-max) over runs. Ratios are "
        "per run, then summarized; targets are judged on wall time. CPU time (user + sys) is "
        "shown beside it: on a shared machine it moves far less than wall time."
        + ("" if report["memory_every_run"] else " Memory scenarios: first run only."),
        "",
        "## Targets",
        "",
        "| check | median (wall) | range | target | result | CPU-time median |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in report["checks"]:
        if "median" not in row:
            lines.append(f"| {row['name']} | - | - | - | not measured | |")
            continue
        unit = row["unit"]
        fmt = "{:.2f}" if unit == "x" or unit == " s" else "{:.1f}"
        limit = ("<= " if row["at_most"] else ">= ") + fmt.format(row["limit"]) + unit
        if not row["limit"]:
            limit, result = "-", row["note"]
        else:
            result = "pass" if row.get("passed") else "**FAIL**"
        rng = f"{fmt.format(row['min'])}-{fmt.format(row['max'])}"
        cpu = fmt.format(row["cpu_median"]) + unit if "cpu_median" in row else ""
        lines.append(
            f"| {row['name']} | {fmt.format(row['median'])}{unit} | {rng} | {limit} | {result} "
            f"| {cpu} |"
        )
    lines += [
        "",
        "## Scenarios",
        "",
        "| scenario | what | wall s, median (min-max) | CPU s | peak RSS MB |",
        "|---|---|---:|---:|---:|",
    ]
    for scenario in scenarios(sizes):
        entry = report["scenarios"].get(scenario.key)
        if entry is None:
            continue
        if "wall_s" not in entry:
            lines.append(f"| {scenario.key} | {scenario.title} | failed | | |")
            continue
        wall, cpu, rss = entry["wall_s"], entry["cpu_s"], entry["peak_rss_mb"]
        failed = f" ({entry['failed']} failed)" if entry["failed"] else ""
        lines.append(
            f"| {scenario.key} | {scenario.title} | {wall['median']:.2f} "
            f"({wall['min']:.2f}-{wall['max']:.2f}){failed} | {cpu['median']:.2f} | "
            f"{rss['median']:.0f} |"
        )
    soak = report["raw"].get("soak")
    if soak and soak[0].get("extra"):
        lines += ["", "## RSS over retrains in one process (MB)", ""]
        for index, sample in enumerate(soak):
            extra = sample["extra"]
            if not extra:
                continue
            lines.append(
                f"- run {index + 1}: after 1: {extra['rss_mb'][0]:.1f}, after 10: "
                f"{extra['rss_after_10_mb']:.1f}, after {len(extra['rss_mb'])}: "
                f"{extra['rss_after_last_mb']:.1f} (growth {extra['growth_mb']:+.1f}); "
                f"{extra['retrains']} retrains, median "
                f"{statistics.median(extra['seconds']):.2f} s each"
            )
    errors = [
        f"- {key} run {i + 1}: {s['error']}"
        for key, samples in report["raw"].items()
        for i, s in enumerate(samples)
        if s["error"]
    ]
    if errors:
        lines += ["", "## Failures", "", *errors]
    lines += [
        "",
        "Floor: onnxruntime + numpy + pillow only, the same model, full decode (no draft mode), "
        f"resize 256, crop 224, batches of {FLOOR_BATCH}. Upstream: ORT training artifacts over "
        "the whole graph (backbone frozen_params, last Gemm requires_grad), photos decoded "
        f"once, batch {UPSTREAM_BATCH}, AdamW lr {UPSTREAM_LR}, then "
        "export_model_for_inferencing and a checkpoint. luncher runs with its bytecode "
        "compiled first (as `pip install` does). Commands print to a file, not a terminal.",
        "",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip()

    ort = subprocess.run(
        [sys.executable, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    return {
        "commit": git("rev-parse", "--short", "HEAD") + (" (modified)" if dirty else ""),
        "python": platform.python_version(),
        "onnxruntime": ort,
        "cpus": os.cpu_count(),
        "memory_gb": memory,
        "platform": platform.platform(),
        "load_before": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def default_model() -> Path:
    return DEFAULT_MODEL


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", type=Path, default=None, help="Base ONNX model.")
    parser.add_argument(
        "--photos", type=Path, default=DEFAULT_PHOTOS, help="Food photos (read, never copied)."
    )
    parser.add_argument("--runs", type=int, default=None, help="Runs per scenario (default 5).")
    parser.add_argument(
        "--quick", action="store_true", help="1 run and fewer photos: a smoke check."
    )
    parser.add_argument(
        "--only", default=None, help="Comma-separated scenario groups to run (see the table)."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="Output path without suffix; .md and .json are written.",
    )
    parser.add_argument(
        "--memory-every-run",
        action="store_true",
        help="Repeat the memory scenarios (1,000-photo retrain, soak) in every run.",
    )
    parser.add_argument(
        "--keep-temp", action="store_true", help="Keep the temporary directory (logs, photos)."
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK_SIZES if args.quick else Sizes()
    runs = args.runs or (1 if args.quick else 5)
    model = (args.model or default_model()).resolve()
    if not model.is_file():
        raise SystemExit(f"no model at {model}; pass --model")
    env_info = environment()
    work = Path(tempfile.mkdtemp(prefix="luncher-bench-"))
    try:
        print(f"workspace {work}; preparing photos", file=sys.stderr)
        photos = prepare_photos(args.photos, sizes, work)
        bench = Bench(model, photos, sizes, work)
        plan = bench.plan()
        if args.only:
            wanted = set(args.only.split(","))
            unknown = wanted - {name for name, _ in plan}
            if unknown:
                raise SystemExit(f"unknown scenario groups: {', '.join(sorted(unknown))}")
            plan = [(name, step) for name, step in plan if name in wanted]
        # The upstream recipe needs the training package, which plain onnxruntime lacks.
        bench.setup(upstream=any(name.startswith("upstream") for name, _ in plan))
        results: dict[str, list[Sample]] = {}
        started = time.time()
        for run in range(runs):
            bench.run_number = run
            for name, step in plan:
                if run > 0 and name in MEMORY_SCENARIOS and not args.memory_every_run:
                    continue
                for key, sample in step().items():
                    results.setdefault(key, []).append(sample)
                    status = "ok" if sample.returncode == 0 else f"FAILED: {sample.error}"
                    print(
                        f"[run {run + 1}/{runs}] {key:<22} {sample.wall_s:7.2f} s "
                        f"{sample.peak_rss_mb:6.0f} MB  {status}",
                        file=sys.stderr,
                    )
        env_info["load_after"] = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        per_scenario, checks = summarize(results, sizes)
        report = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["scripts/bench.py", *(argv or sys.argv[1:])]),
            "duration_s": round(time.time() - started, 1),
            "environment": env_info,
            "model": shown(model),
            "model_sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
            "photos": {"source": photos.source, "phone_mb": photos.phone_mb},
            "sizes": asdict(sizes),
            "runs": runs,
            "memory_every_run": args.memory_every_run,
            "scenarios": per_scenario,
            "checks": checks,
            "raw": {key: [asdict(s) for s in samples] for key, samples in results.items()},
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        text = markdown(report, sizes)
        args.out.with_suffix(".md").write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        print(text)
        print(f"wrote {args.out.with_suffix('.md')} and .json", file=sys.stderr)
    finally:
        if args.keep_temp:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
