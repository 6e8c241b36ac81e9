"""slime's rollout-buffer generator modules: discovery from a directory or dotted paths, and running one.

A generator module defines ``TASK_TYPE`` and ``run_rollout(data: dict)`` and may define ``transform_group``,
``is_valid_group`` and ``get_group_data_meta_info`` (slime's contract, unchanged).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

OPTIONAL_HOOKS = ("transform_group", "is_valid_group", "get_group_data_meta_info")


class GeneratorError(ValueError):
    """A generator module could not be loaded; the message names the flag and the file or module."""


@dataclass(frozen=True)
class Generator:
    task_type: str
    run_rollout: Callable[[dict[str, Any]], Any]
    source: str
    transform_group: Callable[..., Any] | None = None
    is_valid_group: Callable[..., Any] | None = None
    get_group_data_meta_info: Callable[..., Any] | None = None


def _from_module(module: ModuleType, source: str) -> Generator | None:
    task_type = getattr(module, "TASK_TYPE", None)
    run_rollout = getattr(module, "run_rollout", None)
    if task_type is None or run_rollout is None:
        return None
    if not isinstance(task_type, str) or not task_type:
        raise GeneratorError(f"{source}: TASK_TYPE must be a non-empty string, got {task_type!r}")
    if not callable(run_rollout):
        raise GeneratorError(f"{source}: run_rollout is not callable")
    hooks = {name: getattr(module, name, None) for name in OPTIONAL_HOOKS}
    for name, hook in hooks.items():
        if hook is not None and not callable(hook):
            raise GeneratorError(f"{source}: {name} is not callable")
    return Generator(task_type=task_type, run_rollout=run_rollout, source=source, **hooks)


def _import_file(path: Path) -> ModuleType:
    # A stable, unique module name per file so that pickling (multiprocessing) and re-discovery work.
    name = "rollout_buffer_generator_" + re.sub(r"\W", "_", str(path.resolve().with_suffix("")))
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise GeneratorError(f"--generator-dir: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(name, None)
        raise GeneratorError(
            f"--generator-dir: importing {path} failed: {type(exc).__name__}: {exc}"
        ) from exc
    return module


def discover_directory(directory: str | Path) -> list[Generator]:
    """Every ``*.py`` in ``directory`` (not ``__init__.py``) that defines TASK_TYPE and run_rollout."""
    path = Path(directory)
    if not path.is_dir():
        raise GeneratorError(f"--generator-dir {str(directory)!r}: not a directory")
    found = []
    for file in sorted(path.glob("*.py")):
        if file.name == "__init__.py":
            continue
        generator = _from_module(_import_file(file), str(file))
        if generator is None:
            logger.info("%s defines no TASK_TYPE/run_rollout; not a generator", file)
            continue
        found.append(generator)
    return found


def load_module(dotted: str) -> Generator:
    """The generator defined by the module at a dotted path (``pkg.generators.math``)."""
    try:
        module = importlib.import_module(dotted)
    except Exception as exc:
        raise GeneratorError(
            f"--generator-module {dotted!r}: import failed: {type(exc).__name__}: {exc}"
        ) from exc
    generator = _from_module(module, dotted)
    if generator is None:
        raise GeneratorError(
            f"--generator-module {dotted!r}: the module must define TASK_TYPE and run_rollout"
        )
    return generator


class GeneratorRegistry:
    """Generators by task type, and the background threads running them (one per task type at a time)."""

    def __init__(self, generators: Iterable[Generator] = ()):
        self._by_type: dict[str, Generator] = {}
        self._running: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        for generator in generators:
            self.add(generator)

    @classmethod
    def discover(cls, directories: Iterable[str | Path], modules: Iterable[str]) -> GeneratorRegistry:
        """Generators from the directories then the modules; a later one replaces an earlier of the same type."""
        registry = cls()
        for directory in directories:
            for generator in discover_directory(directory):
                registry.add(generator)
        for dotted in modules:
            registry.add(load_module(dotted))
        return registry

    def add(self, generator: Generator) -> None:
        previous = self._by_type.get(generator.task_type)
        if previous is not None:
            logger.info(
                "task type %r: %s replaces %s", generator.task_type, generator.source, previous.source
            )
        self._by_type[generator.task_type] = generator
        logger.info("generator for task type %r: %s", generator.task_type, generator.source)

    def get(self, task_type: str | None) -> Generator | None:
        return self._by_type.get(task_type) if task_type else None

    @property
    def task_types(self) -> list[str]:
        return sorted(self._by_type)

    def is_running(self, task_type: str) -> bool:
        thread = self._running.get(task_type)
        return thread is not None and thread.is_alive()

    def start(self, task_type: str, payload: dict[str, Any]) -> bool:
        """Run the task type's ``run_rollout(payload)`` in a background thread; False if one already runs."""
        generator = self._by_type[task_type]
        with self._lock:
            if self.is_running(task_type):
                return False
            thread = threading.Thread(
                target=self._run, args=(generator, payload), name=f"generator-{task_type}", daemon=True
            )
            self._running[task_type] = thread
            thread.start()
        return True

    @staticmethod
    def _run(generator: Generator, payload: dict[str, Any]) -> None:
        logger.info("generator %r (%s) started", generator.task_type, generator.source)
        try:
            generator.run_rollout(payload)
        except Exception:
            logger.exception("generator %r (%s) failed", generator.task_type, generator.source)
            return
        logger.info("generator %r finished", generator.task_type)
