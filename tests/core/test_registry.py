"""Resolving backends by name, environment variable and third-party entry point."""

from __future__ import annotations

import logging
import sys
import textwrap
from pathlib import Path

import pytest

import statebackends
from statebackends import DEPRECATED_ENV_STATE_BACKEND, ENV_STATE_BACKEND, StateStore, get_store, store_from_config

BUILTINS = ["contextvar", "instance", "invocation_id", "otel_context", "threadlocal"]


def test_available_lists_the_five_builtins() -> None:
    assert set(BUILTINS) <= set(statebackends.available())


@pytest.mark.parametrize("name", BUILTINS)
def test_get_store_by_name(name: str) -> None:
    store = get_store(name, dict)
    assert isinstance(store, StateStore) and store.name == name
    assert get_store(f"  {name.upper()} ", dict).name == name


def test_get_store_passes_a_store_through() -> None:
    store = get_store("contextvar", dict)
    assert get_store(store, list) is store


@pytest.mark.parametrize("bad", ["nope", "", 42, None])
def test_unknown_backend_names_the_value_and_every_valid_name(bad: object) -> None:
    with pytest.raises(ValueError) as info:
        get_store(bad, dict)  # type: ignore[arg-type]
    message = str(info.value)
    assert repr(bad) in message
    assert all(name in message for name in BUILTINS)


def test_bad_factory_is_rejected() -> None:
    with pytest.raises(TypeError, match="factory"):
        get_store("contextvar", "not callable")  # type: ignore[arg-type]


def test_store_from_config_precedence() -> None:
    env = {"FIRST": "threadlocal", "SECOND": "instance"}
    assert store_from_config("invocation_id", dict, env_vars=["FIRST", "SECOND"], environ=env).name == "invocation_id"
    assert store_from_config(None, dict, env_vars=["FIRST", "SECOND"], environ=env).name == "threadlocal"
    assert store_from_config(None, dict, env_vars=["UNSET", "SECOND"], environ=env).name == "instance"
    assert store_from_config(None, dict, env_vars=["UNSET"], environ=env).name == "contextvar"


def test_store_from_config_bad_env_logs_and_uses_default(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="statebackends"):
        store = store_from_config(None, dict, env_vars=["SB_VAR"], environ={"SB_VAR": "bogus"}, default="threadlocal")
    assert store.name == "threadlocal"
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "SB_VAR" in record.getMessage() and "bogus" in record.getMessage() and "contextvar" in record.getMessage()


def test_store_from_config_bad_value_raises() -> None:
    with pytest.raises(ValueError, match="bogus"):
        store_from_config("bogus", dict, env_vars=[], environ={})


def _write_dist(root: Path, dist: str, module: str, source: str, entry: str) -> None:
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[statebackends]\n{entry}\n")


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder on ``sys.path`` where a test installs plugins; the registry reads the group afresh, before and after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    statebackends.invalidate_caches()
    yield tmp_path
    for mod in list(sys.modules):
        if mod.startswith("sb_thirdparty_"):
            sys.modules.pop(mod, None)
    statebackends.invalidate_caches()


def test_third_party_backend_through_a_real_entry_point(plugin_path: Path) -> None:
    _write_dist(
        plugin_path,
        "sb_thirdparty_ok",
        "sb_thirdparty_ok",
        """
        from statebackends.contextvar import ContextVarStore

        class TaskLocalStore(ContextVarStore):
            \"\"\"A third-party backend: a ContextVar store under another name.\"\"\"
            name = "tasklocal"
        """,
        "tasklocal = sb_thirdparty_ok:TaskLocalStore",
    )
    assert "tasklocal" in statebackends.available()
    store = get_store("tasklocal", dict)
    with store.invocation(object()) as state:
        assert store.current(None) is state
    assert type(store).__module__ == "sb_thirdparty_ok"


def test_broken_third_party_entry_point_is_reported_and_hides_nothing(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_dist(plugin_path, "sb_thirdparty_broken", "sb_thirdparty_broken", "raise ImportError('no such dep')\n",
                "brokenstore = sb_thirdparty_broken:Store")
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        names = statebackends.available()
    assert set(BUILTINS) <= set(names) and "brokenstore" not in names
    assert any("brokenstore" in r.getMessage() and "no such dep" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError) as info:
        get_store("brokenstore", dict)
    assert "failed to load" in str(info.value) and "no such dep" in str(info.value)
    assert get_store("contextvar", dict).name == "contextvar"


BAD_PLUGINS = {
    # name: (module source, entry object, what the message must name)
    "ctorraises": (
        """
        from statebackends.contextvar import ContextVarStore

        class Store(ContextVarStore):
            name = "ctorraises"

            def __init__(self, factory):
                raise RuntimeError("no license key")
        """,
        "Store",
        "no license key",
    ),
    "factoryraises": (
        """
        def make(factory):
            raise OSError("socket refused")
        """,
        "make",
        "socket refused",
    ),
    "notastore": (
        """
        class Store:
            def __init__(self, factory):
                pass
        """,
        "Store",
        "not a StateStore",
    ),
    "buildsjunk": (
        """
        def make(factory):
            return {"not": "a store"}
        """,
        "make",
        "not a StateStore",
    ),
}


def _install_bad_plugin(root: Path, name: str) -> str:
    source, obj, cause = BAD_PLUGINS[name]
    module = f"sb_thirdparty_{name}"
    _write_dist(root, module, module, source, f"{name} = {module}:{obj}")
    return cause


@pytest.mark.parametrize("name", list(BAD_PLUGINS))
def test_a_plugin_that_cannot_build_a_store_gives_a_value_error_naming_backend_cause_and_valid_names(
    plugin_path: Path, name: str
) -> None:
    cause = _install_bad_plugin(plugin_path, name)
    with pytest.raises(ValueError) as info:
        get_store(name, dict)
    message = str(info.value)
    assert name in message and cause in message, message
    assert all(builtin in message for builtin in BUILTINS), message


@pytest.mark.parametrize("name", list(BAD_PLUGINS))
def test_a_plugin_that_cannot_build_a_store_named_by_the_environment_logs_one_error_and_uses_the_default(
    plugin_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    cause = _install_bad_plugin(plugin_path, name)
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        store = store_from_config(None, dict, environ={ENV_STATE_BACKEND: name})
    assert store.name == "contextvar"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, [r.getMessage() for r in errors]
    message = errors[0].getMessage()
    assert ENV_STATE_BACKEND in message and repr(name) in message and cause in message


def test_the_library_wide_variable_is_outside_the_otel_namespace() -> None:
    assert ENV_STATE_BACKEND == "STATEBACKENDS_BACKEND"
    assert DEPRECATED_ENV_STATE_BACKEND == "OTEL_PYTHON_STATE_BACKEND"
    assert store_from_config(None, dict, environ={"STATEBACKENDS_BACKEND": "threadlocal"}).name == "threadlocal"


def test_the_old_variable_is_a_deprecated_alias_read_after_the_new_one(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        store = store_from_config(None, dict, environ={"OTEL_PYTHON_STATE_BACKEND": "instance"})
    assert store.name == "instance"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "STATEBACKENDS_BACKEND" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="statebackends"):
        both = {"STATEBACKENDS_BACKEND": "threadlocal", "OTEL_PYTHON_STATE_BACKEND": "instance"}
        assert store_from_config(None, dict, environ=both).name == "threadlocal"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # an instrumentation's own variable first, then the library-wide one, then its old name
    env = {"OTEL_PYTHON_STATE_BACKEND": "instance"}
    assert store_from_config(None, dict, env_vars=("MY_INSTRUMENTATION_BACKEND", ENV_STATE_BACKEND),
                             environ=env).name == "instance"
    env["MY_INSTRUMENTATION_BACKEND"] = "invocation_id"
    assert store_from_config(None, dict, env_vars=("MY_INSTRUMENTATION_BACKEND", ENV_STATE_BACKEND),
                             environ=env).name == "invocation_id"
    # a list without the library-wide variable does not read its old name either
    assert store_from_config(None, dict, env_vars=("OTHER",), environ=env).name == "contextvar"


def test_the_default_environment_is_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_STATE_BACKEND, "threadlocal")
    assert store_from_config(None, dict).name == "threadlocal"


def test_a_store_built_by_a_plugin_factory_is_checked_and_used(plugin_path: Path) -> None:
    _write_dist(
        plugin_path, "sb_thirdparty_factory", "sb_thirdparty_factory",
        """
        from statebackends.threadlocal import ThreadLocalStore

        def make(factory):
            return ThreadLocalStore(factory)
        """,
        "madebyfactory = sb_thirdparty_factory:make",
    )
    assert get_store("madebyfactory", dict).name == "threadlocal"


def test_a_plugin_registered_with_upper_case_letters_resolves_whatever_the_case(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_dist(
        plugin_path, "sb_thirdparty_acme", "sb_thirdparty_acme",
        """
        from statebackends.contextvar import ContextVarStore

        class AcmeStore(ContextVarStore):
            name = "AcmeStore"
        """,
        "AcmeStore = sb_thirdparty_acme:AcmeStore",
    )
    assert "AcmeStore" in statebackends.available()  # listed under its registered spelling
    for spelling in ("AcmeStore", "acmestore", " ACMESTORE "):
        assert type(get_store(spelling, dict)).__name__ == "AcmeStore"
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        store = store_from_config(None, dict, environ={ENV_STATE_BACKEND: "AcmeStore"})
    assert type(store).__name__ == "AcmeStore"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_plugin_whose_name_differs_from_a_builtin_only_by_case_cannot_shadow_it(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_dist(plugin_path, "sb_thirdparty_shadow", "sb_thirdparty_shadow",
                "from statebackends.threadlocal import ThreadLocalStore as Store\n",
                "ContextVar = sb_thirdparty_shadow:Store")
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        assert get_store("CONTEXTVAR", dict).name == "contextvar"
        assert "ContextVar" not in statebackends.available()
    assert any("'ContextVar' ignored" in r.getMessage() for r in caplog.records)


BASE_EXCEPTION_PLUGINS = {
    "exitatimport": ("import sys\nsys.exit(3)\nStore = None\n", "SystemExit"),
    "exitinctor": (
        "from statebackends.contextvar import ContextVarStore\n"
        "class Store(ContextVarStore):\n"
        "    def __init__(self, factory):\n"
        "        raise SystemExit('license server said no')\n",
        "license server said no",
    ),
    "customatimport": ("class Fatal(BaseException):\n    pass\nraise Fatal('plugin self-destructed')\n",
                       "plugin self-destructed"),
    "custominctor": (
        "from statebackends.contextvar import ContextVarStore\n"
        "class Fatal(BaseException):\n    pass\n"
        "class Store(ContextVarStore):\n"
        "    def __init__(self, factory):\n"
        "        raise Fatal('no can do')\n",
        "no can do",
    ),
}


@pytest.mark.parametrize("name", list(BASE_EXCEPTION_PLUGINS))
def test_a_plugin_raising_a_base_exception_never_stops_the_host(
    plugin_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    source, cause = BASE_EXCEPTION_PLUGINS[name]
    module = f"sb_thirdparty_{name}"
    (plugin_path / f"{module}.py").write_text(source)
    info = plugin_path / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[statebackends]\n{name} = {module}:Store\n")
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        store = store_from_config(None, dict, environ={ENV_STATE_BACKEND: name})
    assert store.name == "contextvar"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and name in errors[0] and cause in errors[0], errors
    with pytest.raises(ValueError, match=cause):
        get_store(name, dict)
    assert set(BUILTINS) <= set(statebackends.available())


def test_a_plugin_interrupted_by_the_user_is_not_swallowed(plugin_path: Path) -> None:
    _write_dist(plugin_path, "sb_thirdparty_interrupt", "sb_thirdparty_interrupt",
                """
                from statebackends.contextvar import ContextVarStore

                class Store(ContextVarStore):
                    def __init__(self, factory):
                        raise KeyboardInterrupt
                """,
                "interrupted = sb_thirdparty_interrupt:Store")
    with pytest.raises(KeyboardInterrupt):
        store_from_config(None, dict, environ={ENV_STATE_BACKEND: "interrupted"})


class Fatal(BaseException):
    """A custom ``BaseException`` subclass, as a broken log handler may raise."""


@pytest.mark.parametrize("exc", [RuntimeError, GeneratorExit, SystemExit, Fatal], ids=lambda e: e.__name__)
def test_a_raising_log_handler_never_breaks_configuration_from_the_environment(
    plugin_path: Path, exc: type[BaseException]
) -> None:
    class Boom(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise exc("handler failed")

    logger, handler = logging.getLogger("statebackends"), Boom()
    logger.addHandler(handler)
    try:
        assert store_from_config(None, dict, environ={ENV_STATE_BACKEND: "bogus"}).name == "contextvar"
        assert store_from_config(None, dict, environ={DEPRECATED_ENV_STATE_BACKEND: "instance"}).name == "instance"
    finally:
        logger.removeHandler(handler)


def _counting_plugin(root: Path, module: str, name: str, *, broken: bool) -> Path:
    """A plugin whose import appends a line to a file (and then raises, if ``broken``): the file counts the imports."""
    marker = root / f"{module}.imports"
    body = "raise ImportError('no such dep')\n" if broken else (
        "from statebackends.contextvar import ContextVarStore\n\nclass Store(ContextVarStore):\n    name = 'counted'\n")
    _write_dist(root, module, module, f"with open({str(marker)!r}, 'a') as f:\n    f.write('imported\\n')\n{body}",
                f"{name} = {module}:Store")
    return marker


def _imports(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


def test_a_built_in_name_never_imports_a_plugin(plugin_path: Path) -> None:
    marker = _counting_plugin(plugin_path, "sb_thirdparty_slow", "slowstore", broken=False)
    for name in BUILTINS:
        assert get_store(f" {name.upper()}", dict).name == name
    assert store_from_config(None, dict, environ={}).name == "contextvar"
    assert store_from_config(None, dict, environ={ENV_STATE_BACKEND: "threadlocal"}).name == "threadlocal"
    assert _imports(marker) == 0 and "sb_thirdparty_slow" not in sys.modules
    assert get_store("slowstore", dict).name == "counted" and _imports(marker) == 1


def test_plugins_load_once_per_process_until_the_caches_are_invalidated(
    plugin_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    marker = _counting_plugin(plugin_path, "sb_thirdparty_flaky", "flakystore", broken=True)
    with caplog.at_level(logging.WARNING, logger="statebackends"):
        for _ in range(3):
            with pytest.raises(ValueError, match="no such dep"):
                get_store("flakystore", dict)
            assert "flakystore" not in statebackends.available()
            assert store_from_config(None, dict, environ={ENV_STATE_BACKEND: "flakystore"}).name == "contextvar"
    assert _imports(marker) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING and "failed to load" in r.getMessage()]) == 1
    _counting_plugin(plugin_path, "sb_thirdparty_late", "latestore", broken=False)  # installed while running
    with pytest.raises(ValueError, match="unknown state backend 'latestore'"):
        get_store("latestore", dict)
    statebackends.invalidate_caches()
    assert get_store("latestore", dict).name == "counted"
    with pytest.raises(ValueError, match="no such dep"):
        get_store("flakystore", dict)
    assert _imports(marker) == 2
