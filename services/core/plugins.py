"""Load user plugins (every ``--*-path`` flag) from dotted paths, mapping slime's own built-in paths to ours.

A path is ``pkg.module.attr`` (slime's form) or ``pkg.module:attr``; errors name the flag and say what went wrong.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any

logger = logging.getLogger(__name__)

# slime's built-in plugin paths, as found in its defaults and example scripts, and where each lives here.
SLIME_ALIASES: dict[str, str] = {
    "slime.rollout.sglang_rollout.generate_rollout": "trainer.rollout.queue_rollout.generate_rollout",
    "slime.rollout.sglang_rollout.generate": "rollout_buffer.generate.generate",
    "slime.rollout.sglang_rollout.eval_rollout": "trainer.rollout.queue_rollout.eval_rollout",
    "slime.rollout.filter_hub.dynamic_sampling_filters.check_reward_nonzero_std": (
        "trainer.rollout.filters.check_reward_nonzero_std"
    ),
    "slime.rollout.filter_hub.buffer_filters.pop_first": "trainer.rollout.filters.pop_first",
    "slime.rollout.sft_rollout.generate_rollout": "trainer.rollout.sft_rollout.generate_rollout",
    "slime_plugins.rollout_buffer.rollout_buffer_example.generate_rollout": (
        "trainer.rollout.buffer_rollout.generate_rollout"
    ),
    "slime.router.middleware_hub.radix_tree_middleware.RadixTreeMiddleware": (
        "router.middleware.radix_tree.RadixTreeMiddleware"
    ),
    # slime's rollout recognises the radix-tree middleware by its bare class name as well.
    "RadixTreeMiddleware": "router.middleware.radix_tree.RadixTreeMiddleware",
    "slime.rollout.rm_hub.async_rm": "services.reward_model.hub.async_rm",
    "slime.rollout.rm_hub.batched_async_rm": "services.reward_model.hub.batched_async_rm",
}

_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*")


class PluginLoadError(ValueError):
    """A plugin path given to ``flag`` could not be turned into the object it names."""

    def __init__(self, flag: str, path: str, reason: str) -> None:
        super().__init__(f"{flag} {path!r}: {reason}")
        self.flag = flag
        self.path = path
        self.reason = reason


def resolve_alias(path: str) -> str:
    """Our dotted path for one of slime's built-in plugin paths (either separator); other paths unchanged."""
    return SLIME_ALIASES.get(path.strip().replace(":", "."), path.strip())


def _split(path: str, flag: str) -> list[tuple[str, list[str]]]:
    """The (module, attribute chain) readings of ``path``, longest module first."""
    if path.count(":") > 1:
        raise PluginLoadError(flag, path, "use at most one ':' (as in pkg.module:attr)")
    if ":" in path:
        module, _, attrs = path.partition(":")
        if not _DOTTED.fullmatch(module) or not _DOTTED.fullmatch(attrs):
            raise PluginLoadError(flag, path, "expected a dotted path like pkg.module:attr")
        return [(module, attrs.split("."))]
    if not _DOTTED.fullmatch(path) or "." not in path:
        raise PluginLoadError(flag, path, "expected a dotted path like pkg.module.attr (or pkg.module:attr)")
    parts = path.split(".")
    # pkg.module.Class.method is legal too, so shorter module prefixes are tried when a longer one is no module.
    return [(".".join(parts[:i]), parts[i:]) for i in range(len(parts) - 1, 0, -1)]


def _import(module: str, flag: str, path: str) -> ModuleType | str:
    """Import ``module``; when it (or a package above it) does not exist, the name of the missing one."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        missing = exc.name or module
        if module == missing or module.startswith(missing + "."):
            return missing
        raise PluginLoadError(flag, path, f"importing module {module!r} failed: {exc}") from exc
    except Exception as exc:
        raise PluginLoadError(
            flag, path, f"importing module {module!r} failed: {type(exc).__name__}: {exc}"
        ) from exc


def _walk(module: ModuleType, module_name: str, attrs: list[str]) -> tuple[Any, str | None]:
    """Follow ``attrs`` from ``module``: (object, None), or (None, why it failed)."""
    obj: Any = module
    owner = module_name
    for attr in attrs:
        if not hasattr(obj, attr):
            names = [name for name in dir(obj) if not name.startswith("_")]
            close = difflib.get_close_matches(attr, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            return None, f"{owner!r} has no attribute {attr!r}{hint}"
        obj = getattr(obj, attr)
        owner = f"{owner}.{attr}"
    return obj, None


def _load(path: str, flag: str) -> Any:
    if not isinstance(path, str) or not path.strip():
        raise PluginLoadError(flag, str(path), "empty plugin path")
    resolved = resolve_alias(path)
    if resolved == path.strip():
        return _load_resolved(resolved, flag)
    logger.info("%s: slime path %s maps to %s", flag, path, resolved)
    try:
        return _load_resolved(resolved, flag)
    except PluginLoadError as exc:
        raise PluginLoadError(flag, resolved, f"{exc.reason} (slime's {path.strip()!r} maps here)") from exc


def _load_resolved(resolved: str, flag: str) -> Any:
    missing = ""
    for module_name, attrs in _split(resolved, flag):
        module = _import(module_name, flag, resolved)
        if isinstance(module, str):
            missing = missing or module
            continue
        obj, failure = _walk(module, module_name, attrs)
        if failure is None:
            return obj
        if not missing:
            raise PluginLoadError(flag, resolved, failure)
        # A longer reading was meant as a module path; naming that missing module is the useful message.
        break
    raise PluginLoadError(
        flag, resolved, f"no module named {missing!r} (is its package installed and on sys.path?)"
    )


def load_function(path: str, *, flag: str) -> Callable[..., Any]:
    """The callable named by ``path`` (``pkg.module.fn`` or ``pkg.module:fn``), slime aliases applied first."""
    obj = _load(path, flag)
    if not callable(obj):
        raise PluginLoadError(flag, path, f"resolves to a {type(obj).__name__}, which is not callable")
    return obj


def load_class(path: str, *, flag: str, base: type | None = None) -> type:
    """The class named by ``path``; with ``base``, it must be a subclass of it (e.g. a middleware base)."""
    obj = _load(path, flag)
    if not isinstance(obj, type):
        raise PluginLoadError(flag, path, f"resolves to a {type(obj).__name__}, not a class")
    if base is not None and not issubclass(obj, base):
        raise PluginLoadError(flag, path, f"class {obj.__name__} is not a subclass of {base.__qualname__}")
    return obj
