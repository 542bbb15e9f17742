"""A long operation in a thread of its own, as Core ML's `MLUpdateTask` runs an update:
start it, watch its progress, cancel it, and wait for its result.

    task = healthyluncher.UpdateTask(lun.retrain, "healthy", photos).start()
    ...                                   # the program goes on; lun.predict keeps answering
    task.cancel()                         # a Cancel button: nothing is saved
    result = task.result(timeout=60)      # the RetrainResult, or the operation's error

Any `Luncher` operation that takes `progress` runs as a task: `retrain`, `forget`,
`remove_label`. Cancelling works through that callback: the operation stops at its next
photo or epoch, before its one transaction commits, so the models directory stays exactly
as it was. A cancel that arrives after the last epoch, while the copy is being saved, is
too late: the task then completes, and `result()` says so by returning.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from typing import Any, Generic, Literal, TypeVar

from healthyluncher.arguments import check_options
from healthyluncher.errors import LuncherError
from healthyluncher.events import Progress, ProgressCallback

T = TypeVar("T")
TaskState = Literal["ready", "running", "completed", "cancelled", "failed"]


class Cancelled(LuncherError):
    """The task was cancelled before it saved anything."""


class _Stop(BaseException):
    """Raised from the progress callback to unwind the operation (never seen outside)."""


class UpdateTask(Generic[T]):
    """`operation(*args, **kwargs, progress=...)` in a thread of its own.

    `progress` is called with each `Progress` event, in the task's thread; an exception it
    raises ends the task as failed, with that exception. `completion` is called once with
    the task when it has ended (completed, failed or cancelled): in the task's thread, or in
    the thread that cancels a task that never started.
    """

    def __init__(
        self,
        operation: Callable[..., T],
        /,
        *args: Any,
        progress: ProgressCallback | None = None,
        completion: Callable[[UpdateTask[T]], None] | None = None,
        **kwargs: Any,
    ) -> None:
        if not callable(operation):
            raise TypeError(f"UpdateTask needs an operation to run, not {operation!r}")
        try:
            parameters = inspect.signature(operation).parameters
        except (TypeError, ValueError):
            parameters = {}  # type: ignore[assignment]
        if "progress" not in parameters:
            name = getattr(operation, "__name__", repr(operation))
            raise TypeError(f"{name} reports no progress, so it cannot run as an UpdateTask")
        # Here, not when the operation has started (or ended) in its thread.
        check_options({"progress": progress, "completion": completion})
        self._operation, self._args, self._kwargs = operation, args, kwargs
        self._on_progress, self._completion = progress, completion
        self._lock = threading.RLock()  # a completion run by cancel() may call the task
        self._cancel = threading.Event()
        self._finished = threading.Event()
        self._state: TaskState = "ready"
        self._progress: Progress | None = None
        self._result: T | None = None
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        name = getattr(self._operation, "__name__", "operation")
        return f"<UpdateTask {name} {self._state}>"

    @property
    def state(self) -> TaskState:
        """ "ready", "running", "completed", "cancelled" or "failed"."""
        return self._state

    @property
    def progress(self) -> Progress | None:
        """The last progress event, or None before the first."""
        return self._progress

    def done(self) -> bool:
        """Whether the task has ended (completed, failed or cancelled)."""
        return self._finished.is_set()

    def start(self) -> UpdateTask[T]:
        """Start the operation in a new thread (Core ML's `resume`); returns the task."""
        with self._lock:
            if self._state == "cancelled":
                return self
            if self._thread is not None:
                raise LuncherError("this task has already been started")
            self._state = "running"
            self._thread = threading.Thread(target=self._run, name="healthyluncher-task")
            self._thread.start()
        return self

    def cancel(self) -> bool:
        """Ask the task to stop at its next photo or epoch, saving nothing. False when it
        has already ended; a task that is saving its result completes all the same."""
        with self._lock:
            if self._finished.is_set():
                return False
            self._cancel.set()
            if self._thread is None:  # never started: it never will
                self._end("cancelled")
            return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the task ends (at most `timeout` seconds); whether it has. A task
        that was never started would never end: LuncherError."""
        if self._state == "ready":
            raise LuncherError("this task has not been started: call start() first")
        return self._finished.wait(timeout)

    def result(self, timeout: float | None = None) -> T:
        """The operation's result, once the task ends. Raises `Cancelled` when it was
        cancelled, the operation's own error when it failed, and `TimeoutError` when it
        has not ended within `timeout` seconds."""
        if not self.wait(timeout):
            raise TimeoutError(f"the task has not ended within {timeout} s")
        if self._state == "cancelled":
            raise Cancelled("the task was cancelled; nothing was saved")
        if self._error is not None:
            raise self._error
        return self._result  # type: ignore[return-value]

    def _report(self, event: Progress) -> None:
        if self._cancel.is_set():
            raise _Stop
        self._progress = event
        if self._on_progress is not None:
            self._on_progress(event)

    def _run(self) -> None:
        try:
            self._result = self._operation(*self._args, **self._kwargs, progress=self._report)
        except _Stop:
            self._end("cancelled")
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits
            self._error = error
            self._end("failed")
        else:
            self._end("completed")

    def _end(self, state: TaskState) -> None:
        self._state = state
        self._finished.set()
        if self._completion is not None:
            self._completion(self)  # an error here goes to threading.excepthook
