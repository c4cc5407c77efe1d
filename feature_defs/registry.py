"""The set of definitions a deployment runs, validated and compiled once: per view its
plan, per feature name its plan and output, and the deployment's
:class:`~feature_defs.topology.Topology` (routing key, source kinds, repartitioned
entities, the event contract's field types)."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from feature_defs.model import Entity, FeatureView
from feature_defs.plan import OutputPlan, ViewPlan, compile_view
from feature_defs.topology import Topology, compile_topology
from feature_defs.validate import validate_views

if TYPE_CHECKING:
    from headrace.core.settings import CommonSettings

__all__ = ["Registry", "load_registry", "registry_for", "definitions_spec", "portable_spec",
           "DEFAULT_DEFINITIONS"]

#: the shipped set: the default of ``HEADRACE_DEFINITIONS``
#: (``headrace.core.settings.SHIPPED_DEFINITIONS``, not imported here: pydantic-settings
#: would double this package's import time; tests/unit/test_definitions.py checks both agree)
DEFAULT_DEFINITIONS = "feature_defs.standard:VIEWS"


@dataclass
class Registry:
    """Validated views with their compiled plans, a feature-name index and the topology.

    Build it with :meth:`build` (or :func:`load_registry`): that validates the views and
    compiles everything once.
    """

    views: tuple[FeatureView, ...]
    plans: dict[str, ViewPlan] = field(default_factory=dict)  # by view id
    by_feature: dict[str, tuple[ViewPlan, OutputPlan]] = field(default_factory=dict)
    #: how events flow through the views (compiled by :meth:`build`)
    topology: Topology = field(init=False, repr=False)
    #: the spec it was loaded from and the file that spec resolved to (set by
    #: :func:`load_registry`; ``None`` for a registry built from objects in code)
    spec: str | None = field(default=None, compare=False)
    source_file: str | None = field(default=None, compare=False)

    @classmethod
    def build(cls, views: Sequence[FeatureView]) -> Registry:
        from headrace.core.errors import DefinitionError

        problems = validate_views(views)
        if problems:
            raise DefinitionError(problems)
        reg = cls(tuple(views))
        for view in views:
            plan = compile_view(view)
            reg.plans[view.id] = plan
            for out in plan.outputs:
                reg.by_feature[out.name] = (plan, out)
        reg.topology = compile_topology(reg.plans)
        return reg

    @property
    def entities(self) -> dict[str, Entity]:
        return {v.entity.name: v.entity for v in self.views}

    def views_of(self, entity: str) -> list[ViewPlan]:
        return [p for p in self.plans.values() if p.view.entity.name == entity]

    def feature_names(self, entity: str | None = None) -> list[str]:
        return [
            o.name
            for p in self.plans.values()
            if entity is None or p.view.entity.name == entity
            for o in p.outputs
        ]

    def source_topics(self) -> list[str]:
        """Source topic names (before the deployment prefix), in definition order."""
        return list(self.topology.sources)


def _split(spec: str) -> tuple[str, str]:
    """``(target, attribute)`` of ``target[:ATTR]``; the last colon splits, so a path may
    hold colons; the attribute defaults to ``VIEWS``."""
    target, sep, attr = spec.strip().rpartition(":")
    if not sep:
        return attr, "VIEWS"
    return target, attr or "VIEWS"


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def portable_spec(spec: str) -> str:
    """``spec`` with a file path made absolute, so that a child process started in another
    directory loads the same file (module specs are returned unchanged)."""
    target, attr = _split(spec)
    return f"{Path(target).resolve()}:{attr}" if _is_file(target) else spec


def _import_file(target: str, spec: str) -> ModuleType:
    from headrace.core.errors import InputError

    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise InputError(f"cannot load feature definitions '{spec}': no file {path}")
    for module in list(sys.modules.values()):
        if getattr(module, "__file__", None) == str(path):
            return module  # loaded before (e.g. the same file as a module, or twice)
    # a unique name: the file's stem may be the name of another module ("standard")
    name = f"headrace_definitions_{abs(hash(str(path))):x}_{path.stem}"
    loader_spec = importlib.util.spec_from_file_location(name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise InputError(f"cannot load feature definitions '{spec}': {path} is not a "
                         "Python file")
    module = importlib.util.module_from_spec(loader_spec)
    # registered before running it (dataclasses look their module up there); the file's
    # folder is searched last, so it may import its own helpers without shadowing others
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        # ``headrace`` is a console script: unlike ``python -m`` it does not search the
        # current directory, where a user's definitions module usually is
        cwd = os.getcwd()
        if exc.name != target.partition(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(target)


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of ``exc`` (where the user's code failed)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" at {exc.filename}:{exc.lineno}"
    return f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""


def load_registry(spec: str = DEFAULT_DEFINITIONS) -> Registry:
    """Load the views of ``spec`` and build the registry.

    ``spec`` is ``package.module:ATTR`` (importable, or found in the current directory) or
    ``path/to/file.py:ATTR`` (relative to the current directory); ``ATTR`` names a
    sequence of :class:`~feature_defs.model.FeatureView` and defaults to ``VIEWS``.

    Raises:
        DefinitionError: the views are invalid (every problem with its location), or
            ``ATTR`` is not a non-empty sequence of views.
        InputError: the module or file cannot be found or fails to import (the error and
            where it happened), or it has no ``ATTR``.
    """
    from headrace.core.errors import DefinitionError, InputError

    target, attr = _split(spec)
    if not target:
        raise InputError(f"cannot load feature definitions '{spec}': no module or file named")
    try:
        module = _import_file(target, spec) if _is_file(target) else _import_module(target)
    except InputError:
        raise
    except ModuleNotFoundError as exc:
        own = exc.name is not None and (target + ".").startswith(exc.name + ".")
        missing = "" if own else f" (imported{_where(exc)}; is it installed?)"
        raise InputError(f"cannot load feature definitions '{spec}': {exc}{missing}") from exc
    except Exception as exc:
        # The user's own code runs here and may raise anything (a typo, a bad window);
        # each becomes one input error naming it and where it happened.
        raise InputError(f"cannot load feature definitions '{spec}': "
                         f"{type(exc).__name__}: {exc}{_where(exc)}") from exc
    try:
        views = getattr(module, attr)
    except AttributeError as exc:
        known = sorted(n for n, v in vars(module).items()
                       if not n.startswith("_") and isinstance(v, (list, tuple))
                       and v and all(isinstance(x, FeatureView) for x in v))
        hint = f" (sequences of views there: {', '.join(known)})" if known else ""
        raise InputError(f"cannot load feature definitions '{spec}': "
                         f"{getattr(module, '__file__', target)} has no attribute "
                         f"{attr!r}{hint}") from exc
    if isinstance(views, FeatureView):
        views = [views]
    if isinstance(views, (str, bytes)) or not isinstance(views, Sequence):
        raise DefinitionError([f"{attr}: must be a sequence of FeatureView, not "
                               f"{type(views).__name__}"], source=spec)
    if not views:
        raise DefinitionError([f"{attr}: holds no views"], source=spec)
    try:
        registry = Registry.build(list(views))
    except DefinitionError as exc:
        raise DefinitionError(exc.problems, source=spec) from None
    registry.spec = spec
    registry.source_file = getattr(module, "__file__", None)
    return registry


def definitions_spec(settings: CommonSettings, override: str | None = None) -> str:
    """The one resolution rule: ``override`` (a command's ``--definitions``) if given,
    else ``settings.definitions`` (``HEADRACE_DEFINITIONS``, by default the shipped set)."""
    return override or settings.definitions


def registry_for(settings: CommonSettings, override: str | None = None) -> Registry:
    """The registry every command and process runs: that of
    :func:`definitions_spec` (flag > ``HEADRACE_DEFINITIONS`` > the shipped set). See
    :func:`load_registry` for the spec forms and the errors.
    """
    return load_registry(definitions_spec(settings, override))
