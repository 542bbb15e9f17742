"""UpdateTask: a retrain in a thread of its own that a program can watch, cancel and wait
for, as Core ML's MLUpdateTask."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import healthyluncher
from healthyluncher import Cancelled, LuncherError, Progress, UpdateTask


@pytest.fixture
def lun(pt_model: Path, models_dir: Path) -> healthyluncher.Luncher:
    healthyluncher.make_updatable(pt_model, models_dir=str(models_dir))
    return healthyluncher.open(str(models_dir))


def counts(lun: healthyluncher.Luncher) -> tuple[object, ...]:
    status = lun.status()
    return status.examples_per_label, status.retrains, status.undo_steps


def test_a_task_retrains_in_another_thread_and_returns_the_result(lun, photos):
    events: list[Progress] = []
    threads: set[str] = set()
    ended: list[UpdateTask[object]] = []

    def on_progress(event: Progress) -> None:
        events.append(event)
        threads.add(threading.current_thread().name)

    task = UpdateTask(
        lun.retrain, "healthy", photos["red"][:2], epochs=2, progress=on_progress,
        completion=ended.append,
    )  # fmt: skip
    assert task.state == "ready" and task.progress is None and not task.done()
    assert task.start() is task
    result = task.result(timeout=120)
    assert task.state == "completed" and task.done() and task.wait(0)
    assert result.examples_per_label == {"healthy": 2}
    assert result.label == "healthy" and len(result.photos) == 2
    assert lun.personalized and lun.status().examples_per_label == {"healthy": 2}
    assert threads == {"healthyluncher-task"}  # never the caller's thread
    assert events[-1] == Progress("training", 2, 2, result.final_loss) == task.progress
    assert ended == [task]
    assert task.cancel() is False  # too late: it has ended
    with pytest.raises(LuncherError, match="already been started"):
        task.start()


def test_cancel_stops_the_retrain_and_saves_nothing(lun, photos):
    lun.retrain("fast_food", photos["green"][:2])
    before = counts(lun)
    for stage in ("embedding", "training"):
        holder: list[UpdateTask[object]] = []

        def cancel_at(
            event: Progress, stage: str = stage, holder: list[UpdateTask[object]] = holder
        ) -> None:
            if event.stage == stage:
                assert holder[0].cancel() is True  # what a Cancel button does

        task = UpdateTask(lun.retrain, "healthy", photos["red"], progress=cancel_at)
        holder.append(task)
        task.start()
        with pytest.raises(Cancelled, match="nothing was saved"):
            task.result(timeout=120)
        assert task.state == "cancelled"
        assert counts(lun) == before
    assert isinstance(Cancelled("x"), LuncherError)  # one except clause catches both


def test_a_task_cancelled_before_it_starts_never_runs(lun, photos):
    ended: list[str] = []
    task = UpdateTask(
        lun.retrain, "healthy", photos["red"], completion=lambda t: ended.append(t.state)
    )
    assert task.cancel() is True
    assert task.state == "cancelled" and task.done() and ended == ["cancelled"]
    assert task.start() is task and task.state == "cancelled"
    with pytest.raises(Cancelled):
        task.result()
    assert not lun.personalized


def test_the_operations_error_comes_out_of_result(lun, photos):
    task = UpdateTask(lun.retrain, "heathy", photos["red"][:1]).start()
    with pytest.raises(healthyluncher.UnknownLabelError, match="did you mean 'healthy'"):
        task.result(timeout=60)
    assert task.state == "failed" and not lun.personalized


def test_forget_runs_as_a_task_too(lun, photos):
    lun.retrain("healthy", photos["red"][:2])
    result = UpdateTask(lun.forget, photos["red"][:1]).start().result(timeout=120)
    assert result.examples_per_label == {"healthy": 1}


def test_result_times_out_while_the_task_runs(lun, photos):
    release = threading.Event()
    task = UpdateTask(lun.retrain, "healthy", photos["red"], progress=lambda _: release.wait(30))
    task.start()
    with pytest.raises(TimeoutError):
        task.result(timeout=0.05)
    assert task.state == "running" and not task.done()
    release.set()
    assert task.result(timeout=120).examples_per_label == {"healthy": 3}


def test_an_operation_without_progress_cannot_be_a_task(lun):
    with pytest.raises(TypeError, match="status reports no progress"):
        UpdateTask(lun.status)
    with pytest.raises(TypeError, match="needs an operation"):
        UpdateTask("retrain")  # type: ignore[arg-type]


def test_a_completion_may_use_its_task_when_cancel_runs_it(lun, photos):
    """Cancelling a task that never started runs `completion` in the cancelling thread,
    inside the task's lock: a completion that asked the task anything hung there."""
    answers: list[bool] = []
    task = UpdateTask(
        lun.retrain, "healthy", photos["red"], completion=lambda t: answers.append(t.cancel())
    )
    caller = threading.Thread(target=task.cancel, daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert not caller.is_alive(), "cancel() hung in its own completion"
    assert answers == [False] and task.state == "cancelled"
