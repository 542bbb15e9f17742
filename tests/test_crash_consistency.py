"""Crash consistency, SQLite-style: every writing command is killed at every write step.

The write steps are not picked by hand: a child process counts every call that changes
the filesystem (an open for writing, os.replace, os.rename, os.unlink, os.rmdir, os.mkdir,
os.fsync, shutil.rmtree, ...) while the command runs once, and then one child per step
runs the command again and dies with os._exit (no cleanup handler runs, as with kill -9)
just before that step. After each death this test checks that

- state.json is exactly the old state or exactly the new one, and `predict` works;
- no example is lost, and every example of every kept state has its thumbnail;

and, after the next command (`luncher repair`, which any writer amounts to), that nothing
is left over: no staging or scratch directory, no directory state.json does not name, no
temporary file, no thumbnail or cached input that no kept state uses (so no file of a
forgotten photo remains).

Children come from a fork server that has the package imported but has never run a
model, so each one starts in a few milliseconds and owns no thread of ONNX Runtime.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import solid
from tests.models import pytorch_style

CRASHED = 86
NEVER = 10**9


class _Steps:
    def __init__(self, crash_at: int) -> None:
        self.count = 0
        self.crash_at = crash_at

    def step(self) -> None:
        self.count += 1
        if self.count == self.crash_at:
            os._exit(CRASHED)


def _hook_writes(steps: _Steps) -> None:
    """Count (and crash at) every call that changes the filesystem, in this process."""
    import builtins
    import io

    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if any(c in mode for c in "wax+"):
            steps.step()
        return real_open(file, mode, *args, **kwargs)

    builtins.open = open_  # type: ignore[assignment]
    io.open = open_  # type: ignore[assignment]
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    real_os_open = os.open

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing:
            steps.step()
        return real_os_open(path, flags, *args, **kwargs)

    os.open = os_open  # type: ignore[assignment]
    for module, name in [
        (os, "replace"),
        (os, "rename"),
        (os, "unlink"),
        (os, "remove"),
        (os, "rmdir"),
        (os, "mkdir"),
        (os, "fsync"),
        (os, "link"),
        (os, "symlink"),
        (os, "truncate"),
        (shutil, "rmtree"),
        (shutil, "copyfile"),
        (shutil, "move"),
    ]:
        real = getattr(module, name)

        def wrapper(*args: Any, _real: Any = real, **kwargs: Any) -> Any:
            steps.step()
            return _real(*args, **kwargs)

        setattr(module, name, wrapper)


def _child(command: str, models_dir: str, inputs: dict[str, str], crash_at: int) -> None:
    """Run one command against `models_dir`, dying just before write step `crash_at`; the
    step count goes to models_dir/../steps when it runs to the end."""
    os.environ["LUNCHER_MODELS_DIR"] = models_dir
    os.environ["LUNCHER_BUNDLED_MODEL"] = ""
    import logging

    import healthyluncher

    # As `luncher` does: with a root handler, the library writes training files in this
    # process, where the hooks below count (and kill at) their writes too, rather than in
    # a child Python that they never see (and that costs a second a trial).
    logging.getLogger().addHandler(logging.NullHandler())

    steps = _Steps(crash_at)
    lun = healthyluncher.open(models_dir)
    _hook_writes(steps)
    red, green = (
        [Path(p) for p in inputs["red"].split("|")],
        [Path(p) for p in inputs["green"].split("|")],
    )
    if command == "retrain":
        lun.retrain("healthy", red[:2])
    elif command == "new label":
        lun.retrain("dessert", green[:2], new_label=True)
    elif command == "forget":
        lun.forget(red[:1])
    elif command == "undo":
        lun.undo()
    elif command == "reset":
        lun.reset()
    elif command == "reset --purge":
        lun.reset(purge=True)
    elif command == "import":
        lun.import_backup(inputs["backup"])
    elif command == "import --rebuild":
        lun.import_backup(inputs["other_backup"], rebuild=True)
    elif command == "make-updatable":
        healthyluncher.make_updatable(inputs["other_model"], models_dir=models_dir, force=True)
    elif command == "make-updatable --keep-personalization":
        healthyluncher.make_updatable(
            inputs["other_model"], models_dir=models_dir, keep_personalization=True
        )
    elif command == "repair":
        lun.repair()
    else:  # pragma: no cover
        raise AssertionError(command)
    count = steps.count
    steps.crash_at = NEVER
    Path(models_dir).parent.joinpath("steps").write_text(str(count))
    os._exit(0)


# -- what a models directory holds ---------------------------------------------------------


def _personal_examples(models_dir: Path, name: str) -> dict[str, str]:
    with np.load(models_dir / name / "examples.npz", allow_pickle=False) as data:
        digests = (str(d) for d in data["digests"])
        return dict(zip(digests, (str(x) for x in data["labels"]), strict=True))


def _snapshot(models_dir: Path) -> tuple[Any, ...]:
    """What the user sees: the base's identity, the labels, and the examples by label."""
    import json

    state = json.loads((models_dir / "state.json").read_text())
    base = json.loads((models_dir / state["base"] / "meta.json").read_text())
    examples: dict[str, str] = {}
    labels = tuple(base["labels"])
    if state["personal"]:
        examples = _personal_examples(models_dir, state["personal"])
        labels = tuple(
            json.loads((models_dir / state["personal"] / "meta.json").read_text())["labels"]
        )
    return (base["sha256"], labels, tuple(sorted(examples.items())))


def _kept_digests(models_dir: Path) -> set[str]:
    import json

    state = json.loads((models_dir / "state.json").read_text())
    names = [state["personal"]] + [step.get("personal") for step in state.get("history", [])]
    used: set[str] = set()
    for name in names:
        if name:
            used.update(_personal_examples(models_dir, name))
    return used


def _check_after_crash(
    models_dir: Path, before: tuple[Any, ...], after: tuple[Any, ...], probe: Path
) -> None:
    import healthyluncher

    now = _snapshot(models_dir)
    assert now in (before, after), "a mixed state"
    thumbnails = models_dir / "thumbnails"
    missing = [d for d in _kept_digests(models_dir) if not (thumbnails / f"{d}.jpg").is_file()]
    assert not missing, f"kept examples without a thumbnail: {missing}"
    assert healthyluncher.open(str(models_dir)).predict([probe])  # readers work


def _check_cleaned(models_dir: Path, forgotten: set[str]) -> None:
    import json

    state = json.loads((models_dir / "state.json").read_text())
    named = {state["base"], state["personal"]} | {
        v for step in state.get("history", []) for v in step.values() if v
    }
    for entry in models_dir.iterdir():
        if entry.is_dir() and entry.name.startswith(
            ("base-", "personal-", ".staging-", ".scratch-")
        ):
            assert entry.name in named, f"left over: {entry.name}"
    temporary = list(models_dir.rglob("*.tmp"))
    assert not temporary, f"temporary files left: {temporary}"
    used = _kept_digests(models_dir)
    for folder in [models_dir / "thumbnails", *(models_dir / "cache").glob("*")]:
        if folder.is_dir():
            stray = {p.name.split(".")[0] for p in folder.iterdir()} - used
            assert not stray, f"files of photos no state uses in {folder.name}: {stray}"
    for digest in forgotten - used:
        assert not list(models_dir.rglob(f"{digest}*")), f"a forgotten photo's file: {digest}"


# -- the scenarios ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Models directories in the state each command starts from, built once."""
    import healthyluncher

    root = tmp_path_factory.mktemp("crash")
    model = pytorch_style(root / "tiny.onnx")
    other_model = pytorch_style(root / "other.onnx", seed=5)
    red = [solid(root / "red" / f"r{i}.png", (190 + 20 * i, 30, 40)) for i in range(3)]
    green = [solid(root / "green" / f"g{i}.jpg", (30, 190 + 20 * i, 40)) for i in range(3)]
    env = {"LUNCHER_BUNDLED_MODEL": ""}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        personalized = root / "personalized"
        healthyluncher.make_updatable(model, models_dir=str(personalized))
        lun = healthyluncher.open(str(personalized))
        lun.retrain("fast_food", red)
        lun.retrain("healthy", green[:1])
        backup = root / "backup.tar.gz"
        lun.export_backup(backup)
        other = root / "other"
        healthyluncher.make_updatable(other_model, models_dir=str(other))
        healthyluncher.open(str(other)).retrain("healthy", green)
        other_backup = root / "other.tar.gz"
        healthyluncher.open(str(other)).export_backup(other_backup)
        fresh = root / "fresh"
        healthyluncher.make_updatable(model, models_dir=str(fresh))
        damaged = root / "damaged"
        shutil.copytree(personalized, damaged)
        (damaged / "state.json").write_text("{ torn")
    finally:
        for key, value in old_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    inputs = {
        "red": "|".join(map(str, red)),
        "green": "|".join(map(str, green)),
        "backup": str(backup),
        "other_backup": str(other_backup),
        "other_model": str(other_model),
    }
    context = multiprocessing.get_context("forkserver")
    # Everything a command imports, loaded once in the server: a child then only forks.
    context.set_forkserver_preload(
        [
            "tests.test_crash_consistency",
            "healthyluncher.api",
            "healthyluncher.personalizing",
            "healthyluncher.teaching",
            "healthyluncher.backup",
            "healthyluncher.exporting",
            "healthyluncher.bases",
            "healthyluncher.embedder",
            "healthyluncher.imaging",
            "healthyluncher.trainers",
            "onnxruntime",
            "onnx",
        ]
    )
    return {
        "root": root,
        "inputs": inputs,
        "probe": red[0],
        "start": {"personalized": personalized, "fresh": fresh, "damaged": damaged},
        "context": context,
        "digest_of_red0": _digest(red[0]),
    }


def _digest(path: Path) -> str:
    from healthyluncher.photos import digest_of

    return digest_of(path.read_bytes())


SCENARIOS: list[tuple[str, str]] = [
    ("retrain", "personalized"),
    ("new label", "personalized"),
    ("forget", "personalized"),
    ("undo", "personalized"),
    ("reset", "personalized"),
    ("reset --purge", "personalized"),
    ("import", "fresh"),
    ("import --rebuild", "personalized"),
    ("make-updatable", "personalized"),
    ("make-updatable --keep-personalization", "personalized"),
    ("repair", "damaged"),
]


def _run_child(world: dict[str, Any], command: str, models_dir: Path, crash_at: int) -> int:
    process = world["context"].Process(
        target=_child, args=(command, str(models_dir), world["inputs"], crash_at)
    )
    process.start()
    process.join(timeout=120)
    assert process.exitcode is not None, "the command hung"
    return int(process.exitcode)


@pytest.mark.parametrize(("command", "start"), SCENARIOS, ids=[c for c, _ in SCENARIOS])
def test_a_kill_at_any_write_step_leaves_the_old_or_the_new_state(
    world: dict[str, Any], command: str, start: str, tmp_path: Path
) -> None:
    import healthyluncher

    source = world["start"][start]
    # The command once, to its end: how many write steps it takes, and the new state.
    clean = tmp_path / "clean" / "models"
    shutil.copytree(source, clean)
    if start == "damaged":
        before = _snapshot_recovered(source)
    else:
        before = _snapshot(clean)
    assert _run_child(world, command, clean, NEVER) == 0
    steps = int((clean.parent / "steps").read_text())
    after = _snapshot(clean)
    assert steps > 5, steps
    forgotten = {world["digest_of_red0"]} if command == "forget" else set()
    for crash_at in range(1, steps + 1):
        trial = tmp_path / f"trial{crash_at}" / "models"
        shutil.copytree(source, trial)
        code = _run_child(world, command, trial, crash_at)
        assert code == CRASHED, (crash_at, code)
        where = f"{command}, killed before write step {crash_at} of {steps}"
        try:
            if start == "damaged" and _state_unreadable(trial):
                assert _snapshot_recovered(trial) == before  # still the damaged original
            else:
                _check_after_crash(trial, before, after, world["probe"])
            healthyluncher.open(str(trial)).repair()  # the next command
            _check_after_crash(trial, before, after, world["probe"])
            _check_cleaned(trial, forgotten if _snapshot(trial) == after else set())
        except AssertionError as exc:
            raise AssertionError(f"{where}: {exc}") from None
        shutil.rmtree(trial.parent)


def _state_unreadable(models_dir: Path) -> bool:
    import json

    try:
        json.loads((models_dir / "state.json").read_text())
    except ValueError:
        return True
    return False


def _snapshot_recovered(models_dir: Path) -> tuple[Any, ...]:
    """The snapshot of the state `luncher repair` would write for a damaged state.json."""
    import json

    from healthyluncher.store import ModelStore

    state = ModelStore(models_dir).recover_state()
    base = json.loads((models_dir / str(state.base) / "meta.json").read_text())
    labels, examples = tuple(base["labels"]), {}
    if state.personal:
        examples = _personal_examples(models_dir, state.personal)
        labels = tuple(
            json.loads((models_dir / state.personal / "meta.json").read_text())["labels"]
        )
    return (base["sha256"], labels, tuple(sorted(examples.items())))
