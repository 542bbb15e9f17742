"""Run the real `luncher` CLI on every model of a zoo and tabulate what happens.

For each model of a zoo written by `scripts/make_model_zoo.py` and each number N of
trainable layers, in a fresh models directory (LUNCHER_MODELS_DIR), it runs as
subprocesses:

1. `luncher make-updatable MODEL --examples EXAMPLES --trainable-layers N --force`
   (where `--examples` is missing: `--labels healthy,fast_food,zoo_class_0002,...` with as
   many labels as the model has outputs);
2. `luncher predict --json` on a few probe photos;
3. `luncher retrain --label healthy --json` on the probes predicted fast_food (else on the
   fast_food probes), and checks that the probability of healthy rose for each;
4. `luncher reset`, then `predict --json` again, and checks that every probability equals
   the one before the retrain (reset restores the base exactly).

Per (model, N) the outcome is `ok`, the one-line refusal of make-updatable, a failed check,
or a bug: a traceback, text that looks like ONNX Runtime internals, a crash or a hang
(a timeout per command). It prints a Markdown table and writes JSON.

Run it with the project's venv (it needs Pillow and numpy, which the package needs too):

    .venv/bin/python scripts/check_model_zoo.py --zoo /tmp/zoo
    .venv/bin/python scripts/check_model_zoo.py --zoo /tmp/zoo \\
        --examples ../shared/food --example-labels healthy,fast_food

Without `--examples` it draws a small synthetic photo folder (deterministic, offline).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
# Text a user should never see: internals of ONNX Runtime or of Python leaking through.
SUSPICIOUS = [
    ("traceback", re.compile(r"Traceback \(most recent call last\)")),
    ("ort-source", re.compile(r"\.(cc|cpp|h):\d+")),
    ("ort-assert", re.compile(r"was false")),
    ("ort-error", re.compile(r"ONNXRuntimeError|onnxruntime::|RUNTIME_EXCEPTION|Status Message")),
    # The CLI's one line for an exception it did not expect (a bug; --debug shows where).
    ("unexpected-error", re.compile(r"error: unexpected \w+")),
]
TARGET, OTHER = "healthy", "fast_food"


@dataclass
class Command:
    """One CLI run: what it was, how it ended, and anything suspicious in its output."""

    argv: list[str]
    returncode: int | None  # None: killed after the timeout
    seconds: float
    stdout: str
    stderr: str
    flags: list[str] = field(default_factory=list)

    @property
    def refusal(self) -> str:
        """The one-line message of a refusal: the last line of stderr, or with --json the
        last error object on stdout."""
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        if lines:
            return lines[-1]
        errors = [row["error"] for row in self.json_lines() if "error" in row]
        return str(errors[-1]) if errors else f"exit code {self.returncode}, no message"

    def json_lines(self) -> list[dict[str, Any]]:
        rows = []
        for line in self.stdout.splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows


@dataclass
class Outcome:
    """The result for one (model, N)."""

    model: str
    layers: int
    status: str = "ok"  # ok, refused, fail or bug
    reason: str = ""
    notes: list[str] = field(default_factory=list)
    commands: list[dict[str, Any]] = field(default_factory=list)
    # What make-updatable printed (its layer table and the cut) and the retrain's
    # before/after per photo: enough to judge a failure without running it again.
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def cell(self, width: int = 70) -> str:
        if self.status == "ok":
            return "ok"
        prefix = {"refused": "refused", "fail": "FAIL", "bug": "BUG"}[self.status]
        reason = self.reason.removeprefix("error: ")
        # The cut refusals are long and alike; what tells them apart is the advice.
        advice = re.search(r"choose --trainable-layers from ([\d, ]+)", reason)
        if "one row per photo" in reason:
            reason = "batch folded at the cut"
            reason += f" (N in {advice.group(1).strip()})" if advice else ""
        elif "cannot cut" in reason or "cannot be split" in reason:
            reason = "skip connection across the cut"
            reason += f" (N in {advice.group(1).strip()})" if advice else ""
        text = f"{prefix}: {reason}"
        text = text if len(text) <= width else text[: width - 1] + "…"
        return text.replace("|", "\\|")


class Stop(Exception):
    """Ends the steps for one (model, N); the Outcome already says why."""


class Runner:
    """Runs luncher against one models directory, with a timeout and output checks."""

    def __init__(self, luncher: Path, models_dir: Path, timeout: float, outcome: Outcome):
        self.luncher = luncher
        self.env = dict(os.environ, LUNCHER_MODELS_DIR=str(models_dir))
        # Plain, wide output: rich must not wrap or colour a refusal.
        self.env.update(COLUMNS="200", NO_COLOR="1", TERM="dumb")
        self.env.pop("LUNCHER_TRAINER", None)
        self.timeout = timeout
        self.outcome = outcome

    def run(self, *args: str, allow_refusal: bool = False) -> Command:
        argv = [str(self.luncher), *args]
        started = time.monotonic()
        # A session of its own, so a hang is ended with every thread and child it started.
        proc = subprocess.Popen(
            argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(timeout=self.timeout)
            returncode: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            returncode = None
        command = Command(argv, returncode, time.monotonic() - started, stdout, stderr)
        command.flags = [name for name, pattern in SUSPICIOUS if pattern.search(stdout + stderr)]
        self.outcome.commands.append(
            {
                "argv": [_short(a) for a in argv[1:]],
                "returncode": returncode,
                "seconds": round(command.seconds, 2),
                "flags": command.flags,
                "stderr_tail": stderr.strip().splitlines()[-5:],
            }
        )
        verb = args[0]
        if returncode is None:
            self._bug(f"{verb} hung (killed after {self.timeout:.0f} s)")
        if returncode < 0 or returncode not in (0, 1, 2):
            self._bug(f"{verb} crashed (exit code {returncode}): {command.refusal}")
        if command.flags:
            self._bug(f"{verb}: {_first_internal(stdout + stderr)}")
        if returncode != 0:
            if allow_refusal:
                self.outcome.status, self.outcome.reason = "refused", command.refusal
                lines = [line for line in stderr.splitlines() if line.strip()]
                if len(lines) > 1:
                    self.outcome.notes.append(f"refusal took {len(lines)} lines of stderr")
                raise Stop
            self.fail(f"{verb} exit {returncode}: {command.refusal}")
        return command

    def fail(self, reason: str) -> None:
        self.outcome.status, self.outcome.reason = "fail", reason
        raise Stop

    def _bug(self, reason: str) -> None:
        self.outcome.status, self.outcome.reason = "bug", reason
        raise Stop


def _short(arg: str) -> str:
    # The --labels fallback is 1000 names long; the JSON needs only its start.
    return arg if len(arg) <= 200 else arg[:120] + f"... ({arg.count(',') + 1} items)"


def _first_internal(text: str) -> str:
    for line in text.splitlines():
        if any(pattern.search(line) for _, pattern in SUSPICIOUS[1:]):
            return line.strip()[:200]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def check_model(
    entry: dict[str, Any],
    model: Path,
    layers: int,
    setup: dict[str, Any],
    work: Path,
    timeout: float,
    keep: bool,
) -> Outcome:
    outcome = Outcome(entry["name"], layers)
    models_dir = Path(tempfile.mkdtemp(prefix=f"{entry['name']}-N{layers}-", dir=work))
    run = Runner(setup["luncher"], models_dir, timeout, outcome)
    started = time.monotonic()
    try:
        args = ["make-updatable", str(model), "--trainable-layers", str(layers), "--force"]
        if setup["has_examples_option"]:
            args += ["--examples", str(setup["examples"])]
        else:
            args += ["--labels", ",".join(fallback_labels(entry.get("outputs", 1000)))]
        prep = entry.get("preprocessing")
        if prep and setup["has_preprocessing_option"] and "name" in prep:
            args += ["--preprocessing", prep["name"]]
        elif prep:
            args += ["--mean", ",".join(map(str, prep["mean"]))]
            args += ["--std", ",".join(map(str, prep["std"]))]
        made = run.run(*args, allow_refusal=True)
        outcome.details["make_updatable_stdout"] = made.stdout.strip().splitlines()[-25:]

        probes = sorted(setup["probes"].iterdir())
        before = predictions(run.run("predict", "--json", *map(str, probes)))
        # Photos the base gets wrong are the user's story; with random weights there may be
        # none, and then the fast_food probes stand in for them.
        targets = [p for p in probes if before[str(p)]["label"] == OTHER]
        if not targets:
            targets = [p for p in probes if p.name.startswith(OTHER)]
            outcome.notes.append(f"no probe predicted {OTHER}; retrained on the {OTHER} probes")
        taught = run.run("retrain", "--label", TARGET, "--json", *map(str, targets))
        if not taught.json_lines():
            run.fail("retrain --json printed no JSON")
        summary = taught.json_lines()[-1]
        outcome.details["predicted_before"] = {
            Path(path).name: {"label": row["label"], "probability": row["probability"]}
            for path, row in before.items()
        }
        outcome.details["retrain"] = {
            "photos": [{**p, "path": Path(p["path"]).name} for p in summary["photos"]],
            "final_loss": summary.get("final_loss"),
            "views_per_photo": summary.get("views_per_photo"),
        }
        # A probability already 1 (at the 6 digits of --json) cannot rise; it must not fall.
        fell = [
            p
            for p in summary["photos"]
            if not (p["after"] > p["before"] or p["after"] == p["before"] == 1.0)
        ]
        if len(summary["photos"]) != len(targets):
            run.fail(f"retrain reported {len(summary['photos'])} of {len(targets)} photos")
        if fell:
            worst = min(fell, key=lambda p: p["after"] - p["before"])
            run.fail(
                f"P({TARGET}) did not rise on {len(fell)}/{len(targets)} "
                f"({worst['before']:.4f} -> {worst['after']:.4f})"
            )
        rises = [p["after"] - p["before"] for p in summary["photos"]]
        outcome.notes.append(f"P({TARGET}) rose by {min(rises):.4f} to {max(rises):.4f}")

        run.run("reset")
        after = predictions(run.run("predict", "--json", *map(str, probes)))
        changed = [
            path
            for path, pred in before.items()
            if after.get(path, {}).get("probabilities") != pred["probabilities"]
        ]
        if changed:
            diff = max(
                abs(after[path]["probabilities"].get(k, -1) - v)
                for path in changed
                for k, v in before[path]["probabilities"].items()
            )
            run.fail(f"reset: {len(changed)} photo(s) changed (max |dp| {diff:.2e})")
    except Stop:
        pass
    outcome.seconds = round(time.monotonic() - started, 1)
    if not keep:
        shutil.rmtree(models_dir, ignore_errors=True)
    return outcome


def predictions(command: Command) -> dict[str, dict[str, Any]]:
    return {row["path"]: row for row in command.json_lines() if "label" in row}


def fallback_labels(count: int) -> list[str]:
    # healthy and fast_food come first so that retrain --label healthy needs no new class.
    return [TARGET, OTHER] + [f"zoo_class_{i:04d}" for i in range(2, count)]


def make_updatable_options(luncher: Path) -> set[str]:
    """The long options of this luncher's make-updatable (--examples is new, for one)."""
    env = dict(os.environ, COLUMNS="300", NO_COLOR="1", TERM="dumb")
    help_text = subprocess.run(
        [str(luncher), "make-updatable", "--help"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    return set(re.findall(r"--[a-z][a-z0-9-]*", help_text))


# ---------------------------------------------------------------- photos


def synthetic_photos(root: Path, per_label: int, seed: int) -> None:
    """Draw root/healthy/*.jpg and root/fast_food/*.jpg: two looks a head can tell apart.

    healthy: green ground with leaf-shaped ellipses and a few red dots (salad);
    fast_food: golden-brown ground with a grid of bars and dark blobs (fries, burgers).
    Sizes vary so that the resize and centre crop are exercised.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    for label in (TARGET, OTHER):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_label):
            width, height = int(rng.integers(240, 400)), int(rng.integers(200, 360))
            if label == TARGET:
                ground = (int(rng.integers(30, 90)), int(rng.integers(120, 200)), 40)
            else:
                ground = (int(rng.integers(170, 230)), int(rng.integers(110, 160)), 40)
            image = Image.new("RGB", (width, height), ground)
            draw = ImageDraw.Draw(image)
            if label == TARGET:
                for _ in range(30):
                    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
                    w, h = int(rng.integers(10, 50)), int(rng.integers(5, 20))
                    green = (int(rng.integers(0, 80)), int(rng.integers(140, 255)), 60)
                    draw.ellipse((x, y, x + w, y + h), fill=green)
                for _ in range(6):
                    x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), 8
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=(210, 30, 30))
            else:
                step = int(rng.integers(12, 24))
                for x in range(0, width, step):
                    gold = (240, int(rng.integers(180, 220)), int(rng.integers(40, 90)))
                    draw.rectangle((x, 0, x + step // 3, height), fill=gold)
                for _ in range(4):
                    x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
                    r = int(rng.integers(20, 50))
                    draw.ellipse((x - r, y - r, x + r, y + r), fill=(90, 45, 20))
            noise = rng.normal(0, 12, (height, width, 3))
            pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255)
            image = Image.fromarray(pixels.astype(np.uint8)).filter(ImageFilter.SMOOTH)
            image.save(root / label / f"{label}_{i:02d}.jpg", quality=90)


def sample_photos(
    source: Path, labels: list[str], per_label: int, probes: int, dest: Path, probe_dir: Path
) -> None:
    """Copy per_label photos of each label (searched recursively) to dest/label/, and the
    next `probes` of each to probe_dir, evenly spread over the sorted list (deterministic)."""
    for label in labels:
        found = sorted(
            p
            for p in (source / label).rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        need = per_label + probes
        if len(found) < need:
            sys.exit(f"error: {source / label} has {len(found)} photos, {need} are needed")
        picked = [found[i * len(found) // need] for i in range(need)]
        (dest / label).mkdir(parents=True, exist_ok=True)
        for i, photo in enumerate(picked):
            if i < per_label:
                shutil.copy(photo, dest / label / f"{label}_{i:02d}{photo.suffix.lower()}")
            else:
                shutil.copy(photo, probe_dir / f"{label}_{i - per_label:02d}{photo.suffix.lower()}")


def prepare_photos(args: argparse.Namespace, work: Path) -> tuple[Path, Path, str]:
    """The examples folder for make-updatable and a flat folder of probe photos."""
    examples, probes = work / "examples", work / "probes"
    probes.mkdir(parents=True)
    if args.examples is None:
        synthetic_photos(examples, args.per_label, seed=0)
        # Probes are drawn with another seed: photos the examples do not contain.
        synthetic_photos(work / "probe-src", args.probes, seed=1)
        for photo in sorted((work / "probe-src").rglob("*.jpg")):
            shutil.move(photo, probes / photo.name)
        return examples, probes, f"synthetic ({args.per_label} per label)"
    source = args.examples.resolve()
    labels = args.example_labels.split(",") if args.example_labels else None
    labels = labels or sorted(p.name for p in source.iterdir() if p.is_dir())
    if TARGET not in labels or OTHER not in labels:
        sys.exit(f"error: the examples need {TARGET}/ and {OTHER}/ folders (--example-labels)")
    sample_photos(source, labels, args.per_label, args.probes, examples, probes)
    return examples, probes, f"{source} ({args.per_label} per label of {','.join(labels)})"


# ---------------------------------------------------------------- main


def load_zoo(zoo: Path) -> list[dict[str, Any]]:
    manifest = zoo / "manifest.json"
    if manifest.exists():
        return list(json.loads(manifest.read_text())["models"])
    return [{"name": p.stem, "file": p.name} for p in sorted(zoo.glob("*.onnx"))]


def markdown(outcomes: list[Outcome], layers: list[int]) -> str:
    by_model: dict[str, dict[int, Outcome]] = {}
    for outcome in outcomes:
        by_model.setdefault(outcome.model, {})[outcome.layers] = outcome
    head = "| model | " + " | ".join(f"N={n}" for n in layers) + " |"
    rule = "|---|" + "---|" * len(layers)
    rows = [
        f"| {model} | " + " | ".join(cells[n].cell() if n in cells else "" for n in layers) + " |"
        for model, cells in by_model.items()
    ]
    return "\n".join([head, rule, *rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, required=True, help="Directory of make_model_zoo.py.")
    parser.add_argument(
        "--examples",
        type=Path,
        help="A folder with one subfolder of photos per label (searched recursively), "
        "e.g. ../shared/food; default: synthetic photos.",
    )
    parser.add_argument(
        "--example-labels", help="Which subfolders of --examples to use (default: all)."
    )
    parser.add_argument("--per-label", type=int, default=12, help="Examples per label.")
    parser.add_argument("--probes", type=int, default=3, help="Probe photos per label.")
    parser.add_argument("--layers", default="1,2,3", help="Trainable layer counts to try.")
    default_luncher = REPO / ".venv" / "bin" / "luncher"
    parser.add_argument(
        "--luncher",
        type=Path,
        default=default_luncher if default_luncher.exists() else shutil.which("luncher"),
        help="The luncher executable (default: .venv/bin/luncher).",
    )
    parser.add_argument("--timeout", type=float, default=300, help="Seconds per command.")
    parser.add_argument("--only", help="Comma-separated model names (default: all).")
    parser.add_argument("--json", type=Path, help="Where to write JSON (default: ZOO/check.json).")
    parser.add_argument("--keep", action="store_true", help="Keep the models directories.")
    parser.add_argument(
        "--labels-fallback",
        action="store_true",
        help="Pass --labels with made-up names even where --examples exists "
        "(the model keeps its 1000 outputs).",
    )
    parser.add_argument(
        "--report", type=Path, help="Print the table of an earlier run's JSON and exit."
    )
    args = parser.parse_args(argv)
    if args.report:
        data = json.loads(args.report.read_text())
        outcomes = [Outcome(**row) for row in data["results"]]
        print(markdown(outcomes, sorted({o.layers for o in outcomes})))
        return 0
    if args.luncher is None:
        parser.error("no luncher found: pass --luncher")

    args.source_at_start = source_state()
    zoo = args.zoo.resolve()
    entries = load_zoo(zoo)
    if args.only:
        wanted = args.only.split(",")
        entries = [e for e in entries if e["name"] in wanted]
    layers = [int(n) for n in args.layers.split(",")]
    out_json = args.json or zoo / "check.json"
    work = Path(tempfile.mkdtemp(prefix="luncher-zoo-check-"))
    started = time.monotonic()
    try:
        examples, probes, photos = prepare_photos(args, work)
        options = make_updatable_options(args.luncher)
        setup = {
            "luncher": args.luncher,
            "examples": examples,
            "probes": probes,
            "has_examples_option": "--examples" in options and not args.labels_fallback,
            "has_preprocessing_option": "--preprocessing" in options,
        }
        mode = "--examples" if setup["has_examples_option"] else "--labels fallback"
        print(f"luncher: {args.luncher}; make-updatable gets {mode}; photos: {photos}", flush=True)
        if "--examples" not in options:
            print(
                "note: this luncher's make-updatable has no --examples option: each model "
                "keeps its 1000 outputs, named healthy, fast_food, zoo_class_0002, ...",
                flush=True,
            )
        outcomes: list[Outcome] = []
        for entry in entries:
            for n in layers:
                outcome = check_model(
                    entry, zoo / entry["file"], n, setup, work, args.timeout, args.keep
                )
                outcomes.append(outcome)
                print(f"{entry['name']:32} N={n}  {outcome.seconds:6.1f} s  {outcome.cell()}")
                sys.stdout.flush()
                # Written after every model, so an interrupted run still leaves its results.
                write_json(out_json, args, mode, photos, outcomes, time.monotonic() - started)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(markdown(outcomes, layers))
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ok", "refused", "fail", "bug")}
    print(
        f"\n{len(outcomes)} runs: "
        + ", ".join(f"{k} {v}" for k, v in counts.items())
        + f"; {time.monotonic() - started:.0f} s; JSON: {out_json}"
    )
    return 1 if counts["bug"] or counts["fail"] else 0


def source_state() -> dict[str, Any]:
    """Which commit of this repository the luncher ran from, and whether the package's
    work tree had changes (an editable install runs them)."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip()

    changed = git("status", "--porcelain", "--", "healthyluncher").splitlines()
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed_package_files": len(changed)}


def write_json(
    path: Path,
    args: argparse.Namespace,
    mode: str,
    photos: str,
    outcomes: list[Outcome],
    seconds: float,
) -> None:
    data = {
        "luncher": str(args.luncher),
        # An editable install runs whatever the package's files say at each command.
        "source_at_start": args.source_at_start,
        "source_at_end": source_state(),
        "make_updatable_mode": mode,
        "photos": photos,
        "timeout": args.timeout,
        "seconds": round(seconds, 1),
        "results": [asdict(o) for o in outcomes],
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
