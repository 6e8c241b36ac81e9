"""Plugin loading from dotted paths, with real modules written to a temporary directory on sys.path."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.core.plugins import SLIME_ALIASES, PluginLoadError, load_class, load_function, resolve_alias

FLAG = "--custom-generate-function-path"

PLUGIN_SOURCE = """
LIMIT = 3


def generate(args, sample, sampling_params):
    return ("generated", sample)


def generate_rollout(args, rollout_id, data_source, evaluation=False):
    return "our rollout"


class Base:
    pass


class Middleware(Base):
    @staticmethod
    def build():
        return "built"


class Unrelated:
    pass
"""


@pytest.fixture
def plugin_pkg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A package with a plugin module, a module with a missing dependency and one that fails on import."""
    name = f"plugtest_{uuid.uuid4().hex[:8]}"
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(PLUGIN_SOURCE)
    (pkg / "needs_dep.py").write_text("import dependency_that_is_not_installed_xyz\n\ndef fn():\n    pass\n")
    (pkg / "boom.py").write_text("raise RuntimeError('bad plugin config')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for module in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[module]


def test_dotted_and_colon_paths_load_the_same_function(plugin_pkg: str) -> None:
    fn = load_function(f"{plugin_pkg}.mod.generate", flag=FLAG)
    assert fn(None, "s", {}) == ("generated", "s")
    assert load_function(f"{plugin_pkg}.mod:generate", flag=FLAG) is fn


def test_nested_attributes(plugin_pkg: str) -> None:
    assert load_function(f"{plugin_pkg}.mod.Middleware.build", flag=FLAG)() == "built"
    assert load_function(f"{plugin_pkg}.mod:Middleware.build", flag=FLAG)() == "built"


def test_missing_module_names_the_flag_and_module(plugin_pkg: str) -> None:
    with pytest.raises(PluginLoadError, match=rf"^{FLAG} .*no module named '{plugin_pkg}.nomod'") as info:
        load_function(f"{plugin_pkg}.nomod.generate", flag=FLAG)
    assert info.value.flag == FLAG
    with pytest.raises(PluginLoadError, match=r"no module named 'no_such_top_pkg_xyz'"):
        load_function("no_such_top_pkg_xyz.mod.fn", flag=FLAG)


def test_missing_attribute_suggests_close_names(plugin_pkg: str) -> None:
    with pytest.raises(PluginLoadError, match=r"has no attribute 'generat'; did you mean generate"):
        load_function(f"{plugin_pkg}.mod.generat", flag=FLAG)


def test_not_callable(plugin_pkg: str) -> None:
    with pytest.raises(PluginLoadError, match=rf"{FLAG} .*LIMIT.*int, which is not callable"):
        load_function(f"{plugin_pkg}.mod.LIMIT", flag=FLAG)


@pytest.mark.parametrize(
    "path", ["", "   ", "generate", "a..b", "a.b.", "1pkg.mod.fn", "a:b:c", "a.b:", "a b.c"]
)
def test_malformed_paths(path: str) -> None:
    with pytest.raises(PluginLoadError, match=rf"^{FLAG} "):
        load_function(path, flag=FLAG)


def test_a_missing_dependency_is_not_reported_as_a_missing_plugin(plugin_pkg: str) -> None:
    with pytest.raises(
        PluginLoadError,
        match=r"importing module '.*needs_dep' failed: No module named 'dependency_that_is_not_installed_xyz'",
    ):
        load_function(f"{plugin_pkg}.needs_dep.fn", flag=FLAG)


def test_an_import_time_error_is_wrapped_with_its_cause(plugin_pkg: str) -> None:
    with pytest.raises(PluginLoadError, match=r"RuntimeError: bad plugin config") as info:
        load_function(f"{plugin_pkg}.boom.fn", flag=FLAG)
    assert isinstance(info.value.__cause__, RuntimeError)


def test_load_class_checks_kind_and_base(plugin_pkg: str) -> None:
    base = load_class(f"{plugin_pkg}.mod.Base", flag="--slime-router-middleware-paths")
    assert load_class(
        f"{plugin_pkg}.mod.Middleware", flag="--slime-router-middleware-paths", base=base
    ).__name__ == ("Middleware")
    with pytest.raises(PluginLoadError, match="Unrelated is not a subclass of Base"):
        load_class(f"{plugin_pkg}.mod.Unrelated", flag="--slime-router-middleware-paths", base=base)
    with pytest.raises(PluginLoadError, match="function, not a class"):
        load_class(f"{plugin_pkg}.mod.generate", flag="--slime-router-middleware-paths")


def test_slime_paths_resolve_to_ours_before_import(plugin_pkg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slime_path = "slime.rollout.sglang_rollout.generate_rollout"
    monkeypatch.setitem(SLIME_ALIASES, slime_path, f"{plugin_pkg}.mod.generate_rollout")
    flag = "--rollout-function-path"
    fn = load_function(slime_path, flag=flag)
    assert fn(None, 0, None) == "our rollout"
    assert load_function("slime.rollout.sglang_rollout:generate_rollout", flag=flag) is fn
    assert "slime" not in sys.modules, "slime itself must never be imported"


def test_bare_radix_tree_middleware_name(plugin_pkg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(SLIME_ALIASES, "RadixTreeMiddleware", f"{plugin_pkg}.mod.Middleware")
    assert load_class("RadixTreeMiddleware", flag="--slime-router-middleware-paths").__name__ == "Middleware"


def test_alias_table() -> None:
    expected = {
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
        "RadixTreeMiddleware": "router.middleware.radix_tree.RadixTreeMiddleware",
        "slime.rollout.rm_hub.async_rm": "services.reward_model.hub.async_rm",
        "slime.rollout.rm_hub.batched_async_rm": "services.reward_model.hub.batched_async_rm",
    }
    assert expected == SLIME_ALIASES
    for slime_path, ours in expected.items():
        assert resolve_alias(slime_path) == ours
        assert resolve_alias(f" {slime_path} ") == ours
    assert resolve_alias("my_pkg.rollout.fn") == "my_pkg.rollout.fn"


def test_errors_for_an_aliased_path_name_both_paths(plugin_pkg: str, monkeypatch: pytest.MonkeyPatch) -> None:
    slime_path = "slime.rollout.rm_hub.async_rm"
    monkeypatch.setitem(SLIME_ALIASES, slime_path, f"{plugin_pkg}.reward_hub.async_rm")
    with pytest.raises(
        PluginLoadError,
        match=rf"--custom-rm-path '{plugin_pkg}.reward_hub.async_rm': no module .*"
        rf"slime's '{slime_path}' maps here",
    ):
        load_function(slime_path, flag="--custom-rm-path")
