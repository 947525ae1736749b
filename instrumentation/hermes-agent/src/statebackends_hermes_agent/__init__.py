"""OpenTelemetry instrumentation of the Hermes agent (``hermes-agent``, ``run_agent.AIAgent``).

Usage::

    from statebackends_hermes_agent import HermesAgentInstrumentor

    HermesAgentInstrumentor().instrument(state_backend="contextvar")

The per-call state (open spans, token sums, the last response id) lives in a
``statebackends`` store: the ``state_backend`` kwarg, else
``OTEL_INSTRUMENTATION_HERMES_AGENT_STATE_BACKEND``, else
the library-wide ``STATEBACKENDS_BACKEND`` (formerly ``OTEL_PYTHON_STATE_BACKEND``), else
``invocation_id`` (chosen from the correctness matrix). A bad kwarg raises ``ValueError``; a bad
environment variable logs one error and the default is used.

The public lifecycle the wrappers go through (and that another driver, such as an async agent,
can use) is :class:`~statebackends_hermes_agent.lifecycle.HermesTelemetry`, available after
``instrument()`` as :attr:`HermesAgentInstrumentor.telemetry`.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import os
import sys
import threading
from collections.abc import Callable, Collection
from typing import Any

import wrapt
from opentelemetry import metrics, trace
from opentelemetry.instrumentation.instrumentor import BaseInstrumentor
from wrapt import wrap_function_wrapper

from statebackends import StateStore, at_fork_in_child, log_safely

from . import genai
from .config import resolve, resolve_store
from .lifecycle import AgentInvocation, ChatCall, HermesTelemetry, ToolCall
from .package import _instruments
from .state import InvocationState
from .version import __version__
from .wrappers import HermesWrappers, _in_chat

__all__ = ["AgentInvocation", "ChatCall", "HermesAgentInstrumentor", "HermesTelemetry", "ToolCall"]

_logger = logging.getLogger(__name__)

# Every wrapt proxy: wrapt 2 splits BaseObjectProxy (which FunctionWrapper derives from) out of ObjectProxy.
_Proxy: Any = getattr(wrapt, "BaseObjectProxy", wrapt.ObjectProxy)
# The wrappers whose _self_* attributes are their own (any other proxy forwards unknown attributes inward).
_FunctionWrappers = (wrapt.FunctionWrapper, wrapt.BoundFunctionWrapper)

# (module, attribute path, wrapper method name)
_WRAPPED = (
    ("run_agent", "AIAgent.run_conversation", "run_conversation"),
    ("run_agent", "AIAgent._interruptible_api_call", "api_call"),
    ("run_agent", "AIAgent._interruptible_streaming_api_call", "streaming_api_call"),
    ("run_agent", "AIAgent._execute_tool_calls", "execute_tool_calls"),
    ("run_agent", "AIAgent._invoke_tool", "invoke_tool"),
    ("run_agent", "AIAgent._dispatch_delegate_task", "dispatch_delegate_task"),
    ("run_agent", "handle_function_call", "handle_function_call"),
    ("tools.delegate_tool", "_build_child_agent", "build_child_agent"),
)
_MODULES = tuple(dict.fromkeys(module for module, _, _ in _WRAPPED))


def _has_path(module: Any, path: str) -> bool:
    """Whether ``module`` has the dotted attribute ``path`` (``AIAgent.run_conversation``)."""
    owner: Any = module
    for part in path.split("."):
        try:
            owner = inspect.getattr_static(owner, part)
        except AttributeError:
            return False
    return True


def _hermes_version() -> str:
    """The installed hermes-agent's version, for log lines."""
    try:  # not `from importlib.metadata import version`: the package's own `version` submodule takes that name
        return importlib.metadata.version("hermes-agent")
    except Exception:  # noqa: BLE001 - only ever named in a message
        return "(version unknown)"


class _WrapOnImport:
    """A ``wrapt`` post-import hook: wraps the methods of one Hermes module when Hermes imports it (at once if it
    already has), unless its instrumentation was uninstrumented meanwhile. Never raises: an exception in a post-import
    hook would fail Hermes's own import.

    ``instrument()`` can run while Hermes is still importing the module: ``import run_agent`` imports ``model_tools``
    before it defines ``AIAgent``, and ``model_tools`` runs Hermes's plugin discovery, so a Hermes plugin's
    ``register()`` (or another thread) finds ``run_agent`` in ``sys.modules`` without ``AIAgent`` yet, and wrapt
    fires the hook at once. What is not defined yet is then wrapped as soon as it is: until then the module's class
    is a ``types.ModuleType`` subclass (the data model's way to customise a module's attribute access) that finishes
    the wrapping on the first attribute read from outside the module (``from run_agent import AIAgent``,
    ``run_agent.AIAgent``), which any use of ``AIAgent`` starts with, and then puts the module's class back.
    """

    def __init__(self, module: str, wrappers: HermesWrappers) -> None:
        self.module = module
        self.wrappers = wrappers
        self._maybe_partial = False  # True while wrapt may fire this hook on a module Hermes is still importing
        self._lock = threading.RLock()
        self._busy = False  # a wrapping in progress on this thread (reads of the module from there pass through)
        self._pending: tuple[tuple[str, str], ...] = ()  # (attribute path, wrapper name) whose owner is not defined
        self._deferred: tuple[Any, type, type] | None = None  # (module, its deferring class, the class it had)
        at_fork_in_child(self._after_fork_in_child)

    def _after_fork_in_child(self) -> None:
        """A thread that held the lock (finishing a deferred wrapping) is not in the child: the lock is made anew."""
        self._lock = threading.RLock()
        self._busy = False

    def register(self) -> None:
        """Register with wrapt; a module already in ``sys.modules`` may be one Hermes is still importing."""
        self._maybe_partial = True
        try:
            wrapt.register_post_import_hook(self, self.module)
        finally:
            self._maybe_partial = False

    def __call__(self, module: Any) -> None:
        if not self.wrappers.active:  # uninstrumented before the import: neutralised
            return
        paths = tuple((name, method) for owner, name, method in _WRAPPED if owner == self.module)
        if self._maybe_partial:  # fired at once, from register(): what is not defined yet may still come
            with self._lock:
                self._pending = self._wrap(module, paths, defer=True)
                if self._pending:
                    self._defer(module)
        else:  # fired by wrapt at the end of Hermes's import: what is missing now is missing in this release
            self._wrap(module, paths, defer=False)

    def _wrap(self, module: Any, paths: tuple[tuple[str, str], ...], *, defer: bool) -> tuple[tuple[str, str], ...]:
        """Wrap each of ``paths`` in ``module``; those whose owner is not defined yet are returned when ``defer``."""
        later = []
        for name, method in paths:
            if defer and not _has_path(module, name.split(".")[0]):  # its class or function is not defined yet
                later.append((name, method))
                continue
            if not _has_path(module, name):  # a Hermes release without it: one line, the rest still traced
                log_safely(_logger, logging.WARNING, "hermes-agent instrumentation: hermes-agent %s has no %s.%s, so "
                           "what it does runs untraced; every wrapped method is in %s", _hermes_version(), self.module,
                           name, ", ".join(_instruments))
                continue
            try:
                wrap_function_wrapper(module, name, getattr(self.wrappers, method))
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001 - Hermes must import whatever happens here
                log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: could not wrap %s.%s; it runs "
                           "untraced", self.module, name, exc_info=True)
        return tuple(later)

    def _defer(self, module: Any) -> None:
        """Give ``module`` a class whose attribute reads finish the wrapping once what is pending is defined."""
        base: Any = type(module)
        hook = self

        def __getattribute__(self: Any, name: str) -> Any:
            if name[:2] != "__":  # the import system's own reads (__spec__, __name__, ...) pass straight through
                hook.arrived(self)
            return base.__getattribute__(self, name)

        try:
            deferring = type(base.__name__, (base,), {"__getattribute__": __getattribute__, "__slots__": (),
                                                      "__module__": base.__module__, "__qualname__": base.__qualname__})
            module.__class__ = deferring
        except Exception:  # noqa: BLE001 - not a module whose class can change: say so, Hermes runs untraced
            log_safely(_logger, logging.WARNING, "hermes-agent instrumentation: instrument() ran while Hermes was "
                       "importing %s, which cannot be wrapped later; %s runs untraced (instrument before or after "
                       "Hermes's import)", self.module, ", ".join(name for name, _ in self._pending), exc_info=True)
            self._pending = ()
            return
        self._deferred = (module, deferring, base)

    def arrived(self, module: Any) -> None:
        """Wrap what was pending in ``module`` if it is defined now; once nothing is, ``module`` is plain again."""
        with self._lock:
            if self._busy or self._deferred is None:  # our own reads while wrapping, or done meanwhile
                return
            self._busy = True
            try:
                if self.wrappers.active:
                    self._pending = self._wrap(module, self._pending, defer=True)
                if not self._pending or not self.wrappers.active:
                    self._undefer()
            except KeyboardInterrupt:
                raise
            except BaseException:  # noqa: BLE001 - a read of Hermes's module must never fail because of us
                log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: could not finish wrapping %s",
                           self.module, exc_info=True)
            finally:
                self._busy = False

    def _undefer(self) -> None:
        deferred, self._deferred, self._pending = self._deferred, None, ()
        if deferred is not None:
            module, deferring, base = deferred
            if type(module) is deferring:  # another party's class since then stays
                module.__class__ = base

    def forget(self) -> None:
        """Take this hook out of wrapt's registry if it has not fired, and give back a module whose wrapping waited
        (best effort for wrapt's registry: the hook is neutralised anyway)."""
        with self._lock:
            self._undefer()
        try:
            import wrapt.importer as importer

            with importer._post_import_hooks_lock:  # noqa: SLF001 - wrapt has no public way to unregister
                hooks = importer._post_import_hooks.get(self.module)  # noqa: SLF001 - likewise
                if hooks:
                    hooks[:] = [hook for hook in hooks if hook is not self]
                    if not hooks:
                        del importer._post_import_hooks[self.module]  # noqa: SLF001 - likewise
        except Exception:  # noqa: BLE001 - best effort: a hook left registered is inert
            log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: post-import hook on %s left, inert",
                       self.module, exc_info=True)


class HermesAgentInstrumentor(BaseInstrumentor):
    """Traces ``AIAgent`` calls: ``invoke_agent``, one step per ReAct round, ``chat`` and ``execute_tool`` spans.

    ``state_backend`` (after ``instrument``) names the backend in use, ``store`` is the store itself
    and ``telemetry`` the live :class:`HermesTelemetry` (None when not instrumented). ``instrument()``
    takes ``tracer_provider``, ``meter_provider``, ``logger_provider`` (for the content events) and
    ``state_backend``; content capture follows ``OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT``.
    """

    state_backend: str | None = None
    store: StateStore[InvocationState] | None = None
    _wrappers: HermesWrappers | None = None
    _hooks: tuple[_WrapOnImport, ...] = ()

    @property
    def telemetry(self) -> HermesTelemetry | None:
        """The live lifecycle (the same object the ``wrapt`` wrappers use), or None when not instrumented."""
        wrappers = self._wrappers
        return wrappers.telemetry if wrappers is not None and self.store is not None else None

    def instrument(self, **kwargs: Any) -> None:
        """``BaseInstrumentor.instrument``; while already instrumented, a ``state_backend`` is still checked (a bad one
        raises ``ValueError``, as on the first call) and one naming another backend than the one in use, or a store
        object other than the one in use, is reported (a WARNING: ``uninstrument()`` first), instead of being silently
        ignored."""
        value = kwargs.get("state_backend")
        if self.is_instrumented_by_opentelemetry and value is not None:
            asked = resolve_store(value, InvocationState)
            # Another name, or another store object (a caller's own, even named as the one in use): not used.
            if asked is not self.store and (asked.name != self.state_backend or not isinstance(value, str)):
                log_safely(_logger, logging.WARNING, "hermes-agent instrumentation: already instrumented with state "
                           "backend %r; state_backend=%r is ignored (uninstrument() first)", self.state_backend,
                           asked.name or value)
        super().instrument(**kwargs)

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        settings = resolve(kwargs, InvocationState)
        store, mode = settings.store, settings.capture_mode
        # The instrumentation's version and the schema of the semantic-conventions release it follows, as contrib does.
        # The global providers are loaded from OTEL_PYTHON_*_PROVIDER here when none is given (see _global_or).
        tracer = _global_or(lambda: trace.get_tracer(__name__, __version__, kwargs.get("tracer_provider"),
                                                     schema_url=genai.SCHEMA_URL),
                            "tracer_provider", trace.NoOpTracer, "nothing is traced")
        meter = _global_or(lambda: metrics.get_meter(__name__, __version__, kwargs.get("meter_provider"),
                                                     schema_url=genai.SCHEMA_URL),
                           "meter_provider", lambda: None, "no metrics are recorded")
        # The Logs API logger is made only when content goes to events: capturing nothing costs nothing.
        logger = _global_or(lambda: genai.event_logger(kwargs.get("logger_provider"), __version__),
                            "logger_provider", lambda: None, "no content events are emitted") if mode.on_event else None
        telemetry = HermesTelemetry(tracer, store, meter=meter, capture_content=mode, event_logger=logger,
                                    error_text=settings.error_text, content_max_length=settings.content_max_length,
                                    legacy_react_attributes=settings.legacy_react_attributes)
        wrappers = HermesWrappers(telemetry)
        self.store, self.state_backend, self._wrappers = store, store.name, wrappers
        # Nothing of Hermes is imported here: its modules are wrapped when Hermes imports them (at once if it has),
        # so its first import stays its own, after its CLI applied `-p PROFILE` (its import-time paths follow it).
        self._hooks = tuple(_WrapOnImport(module, wrappers) for module in _MODULES)
        for hook in self._hooks:
            hook.register()
        # Hermes makes each LLM request in a thread built inside the chat call: carry the chat's context into it.
        # On __init__, not start/run: opentelemetry-instrumentation-threading wraps those, and its unwrap would peel
        # ours.
        # wrapt calls the hook only while the gate is set (enabled=): other threads pay one C-level check.
        wrapt.wrap_object(threading.Thread, "__init__", wrapt.FunctionWrapper, (wrappers.thread_init, _in_chat.get))
        log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: enabled with state backend %r", store.name)

    def _uninstrument(self, **kwargs: Any) -> None:
        wrappers = self._wrappers
        if wrappers is not None:
            wrappers.active = False  # whatever cannot be taken out below only passes calls through from now on
        for hook in self._hooks:  # those not fired yet never will (and are inert if wrapt keeps them)
            hook.forget()
        self._hooks = ()
        for module, name, _ in _WRAPPED:
            owner: Any = sys.modules.get(module)
            if owner is None:  # never imported: nothing was wrapped
                continue
            *path, attribute = name.split(".")
            for part in path:
                owner = getattr(owner, part, None)  # None: not defined (Hermes is still importing it), not wrapped
            if owner is not None and not _take_out(owner, attribute, wrappers):
                log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: our wrapper on %s.%s is out of reach "
                           "(another instrumentation's patch on top, or its unwrap took ours); it stays, inert", module,
                           name)
        if not _take_out(threading.Thread, "__init__", wrappers):
            log_safely(_logger, logging.DEBUG, "hermes-agent instrumentation: our wrapper on threading.Thread.__init__ "
                       "is out of reach; it stays, inert")
        self.store = self.state_backend = None


def _global_or(make: Callable[[], Any], provider: str, fallback: Callable[[], Any], consequence: str) -> Any:
    """``make()``, else ``fallback()`` and one ERROR naming the variable, its value and the valid names.

    With no provider given, OpenTelemetry loads the global one that ``OTEL_PYTHON_<PROVIDER>`` names and re-raises
    when it cannot (a ``StopIteration`` for an unknown name): an environment variable must not fail ``instrument()``.
    """
    try:
        return make()
    except Exception as exc:  # noqa: BLE001 - configuration from the environment never crashes the host
        variable = f"OTEL_PYTHON_{provider.upper()}"
        group = f"opentelemetry_{provider}"
        if variable not in os.environ:  # not the variable: what raised is named, and what is off
            log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: the %s could not be used (%s: %s); %s",
                       provider.replace("_", " "), type(exc).__name__, exc, consequence)
            return fallback()
        try:
            valid = ", ".join(sorted({ep.name for ep in importlib.metadata.entry_points(group=group)}))
        except Exception:  # noqa: BLE001 - only used in the message
            valid = "(could not be listed)"
        log_safely(_logger, logging.ERROR, "hermes-agent instrumentation: the global %s could not be loaded (%s=%r; "
                   "%s); valid names (entry points %r): %s; %s", provider.replace("_", " "), variable,
                   os.environ.get(variable), type(exc).__name__, group, valid or "none installed", consequence)
        return fallback()


def _take_out(owner: Any, attribute: str, wrappers: Any) -> bool:
    """Remove our ``wrapt`` wrapper from ``owner.attribute``, wherever it sits in a chain of wrappers; True if found.

    ``opentelemetry.instrumentation.utils.unwrap`` peels the OUTERMOST wrapper, whoever asks: with another
    instrumentation's wrapper on top of ours it would remove theirs and leave ours. Here the chain is walked
    in the owner's own ``__dict__`` (no descriptor binding) and only the wrapper whose callable belongs to
    ``wrappers`` is cut out; the others keep wrapping what ours wrapped. No other wrapper is ever removed.
    A wrapper that ``unwrap`` left bound to the class (it reads the attribute through the class) is put
    back as the wrapper it was bound from, since a bound wrapper calls through its parent's chain.
    """
    outer: Any = None
    node = vars(owner).get(attribute)
    while isinstance(node, _Proxy):
        # Only a function wrapper's own attributes are read: another proxy would answer with those of what it wraps.
        if isinstance(node, _FunctionWrappers):
            # wrapt's documented _self_ attributes: the wrapper's own, never forwarded to what it wraps.
            parent = node._self_parent  # noqa: SLF001 - wrapt's documented _self_ attribute
            if parent is not None and node._self_instance is None:  # noqa: SLF001 - likewise
                _link(owner, attribute, outer, parent)  # the same wrapper, unbound
                node = parent
            if wrappers is not None and node._self_wrapper in wrappers.callables:  # noqa: SLF001 - likewise
                _link(owner, attribute, outer, node.__wrapped__)
                return True
        outer, node = node, node.__wrapped__
    return False


def _link(owner: Any, attribute: str, outer: Any, node: Any) -> None:
    """Make ``node`` what ``outer`` wraps (``owner.attribute`` itself when ``outer`` is None)."""
    if outer is None:
        setattr(owner, attribute, node)
    else:
        outer.__wrapped__ = node
