"""Which sampling run a call belongs to.

A run's caches belong to the run, not to the model: ``lazypass.trajectory(model)`` binds
a fresh :class:`Run` to the current context (a ``contextvars`` variable, so a thread or an
asyncio task sees only the runs it entered itself), and every call made in that context
reads and writes that run's state. Concurrent runs in their own trajectories therefore
give exactly the results they give one after the other.

Calls outside any trajectory share the model's default run. That run has an *owner*, the
thread (and asyncio task) that last called it. A call from another thread or task that
is still alive is refused with :class:`ConcurrentRunError` unless it clearly starts a new
run (the run was reset, or every sample's timestep is above the last one, which makes
the program drop the old caches anyway): two runs interleaved step by step through one
set of caches would mix them.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import weakref
from dataclasses import dataclass, field

_BOUND: contextvars.ContextVar[tuple] = contextvars.ContextVar("lazypass_runs", default=())


class ConcurrentRunError(RuntimeError):
    """Two threads or tasks used one run's caches at the same time."""


def _caller():
    """``(thread, task)`` of the current call; ``task`` is None outside asyncio."""
    task = None
    if asyncio._get_running_loop() is not None:
        task = asyncio.current_task()
    return threading.current_thread(), task


@dataclass(eq=False)
class Run:
    """One sampling run: its state (caches) and the program its last call ran."""

    state: object | None = None  # runtime.State
    program: object | None = None  # runtime.Program
    _owner: tuple | None = field(default=None, repr=False)  # weakrefs to (thread, task)

    def claim(self, starts_new_run) -> None:
        """Make the caller the owner, or refuse if another live caller owns a run in progress.

        ``starts_new_run()`` tells whether this call would start a new run anyway.
        """
        thread, task = _caller()
        owner = self._owner
        if owner is not None and owner[0]() is thread and (owner[1] is None and task is None
                                                           or owner[1] is not None and owner[1]() is task):
            return
        if owner is not None and self.state is not None and _alive(owner) and not starts_new_run():
            other = owner[0]()
            raise ConcurrentRunError(
                f"lazypass: this lazy model is in the middle of a sampling run started by thread "
                f"{getattr(other, 'name', '?')!r}{' (an asyncio task)' if owner[1] is not None else ''}, "
                f"and thread {thread.name!r}{' (an asyncio task)' if task is not None else ''} called it "
                "outside any lazypass.trajectory; both would use the same caches and mix their runs. Sample "
                "each run inside `with lazypass.trajectory(model):` (every thread or task gets its own "
                "caches), or call lazypass.reset(model) before starting a run in another thread"
            )
        self._owner = (weakref.ref(thread), weakref.ref(task) if task is not None else None)

    def reset(self) -> None:
        self.state = None
        self._owner = None


def _alive(owner) -> bool:
    thread = owner[0]()
    if thread is None or not thread.is_alive():
        return False
    if owner[1] is None:
        return True
    task = owner[1]()
    return task is not None and not task.done()


def bound(runtime) -> Run | None:
    """The run bound to ``runtime`` in the current context, innermost first; None if none."""
    for rt, run in reversed(_BOUND.get()):
        if rt is runtime:
            return run
    return None


def bind(runtime, run: Run) -> contextvars.Token:
    return _BOUND.set(_BOUND.get() + ((runtime, run),))


def unbind(token: contextvars.Token) -> None:
    _BOUND.reset(token)


def bound_runs(runtime) -> list[Run]:
    return [run for rt, run in _BOUND.get() if rt is runtime]


__all__ = ["ConcurrentRunError", "Run", "bind", "bound", "bound_runs", "unbind"]
