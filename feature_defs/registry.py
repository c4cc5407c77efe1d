"""The set of definitions a deployment runs, validated and compiled once: per view its
plan, per feature name its plan and output, and the deployment's
:class:`~feature_defs.topology.Topology` (routing key, source kinds, repartitioned
entities, the event contract's field types)."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from feature_defs.model import Entity, FeatureView
from feature_defs.plan import OutputPlan, ViewPlan, compile_view
from feature_defs.topology import Topology, compile_topology
from feature_defs.validate import validate_views

__all__ = ["Registry", "load_registry", "DEFAULT_DEFINITIONS"]

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


def load_registry(spec: str = DEFAULT_DEFINITIONS) -> Registry:
    """Load ``module:attribute`` (a sequence of FeatureView) and build the registry.

    Raises:
        DefinitionError: listing every problem with its location.
        InputError: the module or attribute cannot be found.
    """
    from headrace.core.errors import InputError

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
        views = getattr(module, attr or "VIEWS")
    except (ImportError, AttributeError) as exc:
        raise InputError(f"cannot load feature definitions '{spec}': {exc}") from exc
    return Registry.build(list(views))
