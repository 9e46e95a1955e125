"""Named fault points: places in the training code where a test can inject a failure in-process.

Production code calls :func:`fault_point` at each point; it does nothing unless a test installed a
callback with :func:`install` (or the :func:`installed` context). The crash tests run a small launcher
script of their own that installs, for instance, ``os.kill(os.getpid(), SIGKILL)`` at
``checkpoint.before_publish`` of step 20 and then calls ``moesaic.cli.main([...])``; nothing in the package
reads an environment variable for it.

Points (keyword arguments passed to the callback in brackets):

* ``checkpoint.after_files`` (step): every file of the step is written and fsynced, no manifest yet;
* ``checkpoint.before_publish`` (step): the manifest is written, the directory is not yet renamed;
* ``checkpoint.after_publish`` (step): ``step-N/`` is in place, ``LATEST`` not yet replaced;
* ``step.begin`` (step, rank): before a training step's forwards (a failing rank);
* ``step.after_backward`` (step, rank): after a step's backwards, before the optimizer;
* ``data.read`` (offset): a chunk of a user's text file was read (:mod:`moesaic.train.text_files`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

POINTS = ("checkpoint.after_files", "checkpoint.before_publish", "checkpoint.after_publish", "step.begin",
          "step.after_backward", "data.read")
FaultCallback = Callable[..., None]
_CALLBACKS: dict[str, list[FaultCallback]] = {}


def fault_point(name: str, **info: int) -> None:
    """Run the callbacks installed at ``name`` (none in production)."""
    for callback in _CALLBACKS.get(name, ()):
        callback(**info)


def install(name: str, callback: FaultCallback) -> Callable[[], None]:
    """Call ``callback(**info)`` whenever the code passes fault point ``name``; returns the remover."""
    if name not in POINTS:
        raise KeyError(f"unknown fault point {name!r}; known: {', '.join(POINTS)}")
    _CALLBACKS.setdefault(name, []).append(callback)
    return lambda: _CALLBACKS[name].remove(callback)


@contextlib.contextmanager
def installed(name: str, callback: FaultCallback) -> Iterator[None]:
    remove = install(name, callback)
    try:
        yield
    finally:
        remove()
