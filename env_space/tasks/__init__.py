"""Task registry: every module in this package that defines a `@register`-ed `Task` is served, nothing else to edit.

Owns the name -> task-instance map. Adding a task means adding one module here; `_discover` imports every module of
the package at first use, so the server, `/v1/tasks`, the reset options and the client all learn the new name without
an if-chain anywhere. Task instances are immutable after construction (prompt lists are built once) and are shared by
all sessions.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import TypeVar

from env_space.tasks.base import Episode, Outcome, Prompt, SingleTurnTask, Task

__all__ = ["Episode", "Outcome", "Prompt", "SingleTurnTask", "Task", "all_tasks", "get", "names", "register"]

_REGISTRY: dict[str, Task] = {}
_T = TypeVar("_T", bound=type[Task])
_NOT_TASK_MODULES = {"base"}


def register(cls: _T) -> _T:
    """Class decorator: instantiate the task once and serve it under `cls.name`."""
    name = cls.name
    if name in _REGISTRY and type(_REGISTRY[name]) is not cls:
        raise ValueError(f"two tasks are named {name!r}")  # hazard: a silent overwrite would swap reward rules
    _REGISTRY[name] = cls()
    return cls


def _discover() -> None:
    for mod in pkgutil.iter_modules(__path__):
        if mod.name not in _NOT_TASK_MODULES and not mod.name.startswith("_"):
            importlib.import_module(f"{__name__}.{mod.name}")


def get(name: str) -> Task | None:
    return _REGISTRY.get(name)


def names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def all_tasks() -> tuple[Task, ...]:
    return tuple(_REGISTRY[n] for n in names())


_discover()
