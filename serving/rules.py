"""The cold-start rule as both services apply it: which rule, compiled once, and fallback.

The rule itself lives in :mod:`feature_defs.coldstart` (shared with the offline
training sets). This module is the one serving-side application of it, used by
``GetOnlineFeatures`` (:mod:`serving.service`) and ``Score`` (:mod:`serving.scoring`):

* :meth:`RuleCache.rule` picks the rule of a :class:`~serving.reader.ReadPlan`
  (:func:`~feature_defs.coldstart.rule_entity_of`: a user read without the history
  feature follows the rule of the other entities) and compiles it once per request
  shape, segment and priors; callers apply it per entity with
  :meth:`~feature_defs.coldstart.ColdStartRule.apply`.
* :func:`fallback_row` is what an entity gets when the store cannot answer.
"""

from __future__ import annotations

from typing import Any

from feature_defs.coldstart import (
    USER_ENTITY,
    ColdStartRule,
    Priors,
    Segment,
    Tier,
    fallback_values,
    rule_entity_of,
)
from serving.reader import ReadPlan

__all__ = ["RuleCache", "fallback_row"]

_MAX_RULES = 4096


class RuleCache:
    """Compiled :class:`~feature_defs.coldstart.ColdStartRule` per request shape.

    A rule is keyed by (entity, feature names, segment) and rebuilt when the priors
    object changes (:class:`~serving.priors.PriorsCache` swaps it on refresh). The
    segment is part of the key only for users: other entities have no segment prior.
    Request shapes are few; ``max_rules`` bounds a misbehaving client (the cache is
    cleared when full). Safe under concurrent requests (a race compiles a rule twice).

    Args:
        max_rules: most cached rules.
    """

    __slots__ = ("_rules", "_max")

    def __init__(self, max_rules: int = _MAX_RULES) -> None:
        self._rules: dict[tuple[str, tuple[str, ...], Segment | None], ColdStartRule] = {}
        self._max = max_rules

    def rule(self, plan: ReadPlan, priors: Priors, segment: Segment | None) -> ColdStartRule:
        """The rule for entities read with ``plan``.

        Args:
            plan: the request shape (entity, names, whether the history is read).
            priors: the current priors.
            segment: (country, device_type) of the request, or None.

        Returns:
            The compiled rule; apply it with ``rule.apply(values, is_default, stale,
            history)`` per entity, values in ``plan.names`` order.
        """
        seg = segment if plan.entity == USER_ENTITY else None
        key = (plan.entity, plan.names, seg)
        rule = self._rules.get(key)
        if rule is None or rule.priors is not priors:
            entity = rule_entity_of(plan.entity, plan.history is not None)
            rule = ColdStartRule(entity, plan.names, priors, seg)
            if len(self._rules) >= self._max:
                self._rules.clear()
            self._rules[key] = rule
        return rule


def fallback_row(plan: ReadPlan, priors: Priors, segment: Segment | None
                 ) -> tuple[list[Any], Tier]:
    """The values of an entity of ``plan`` when the store cannot answer (status FALLBACK).

    Args:
        plan: the request shape.
        priors: the current priors.
        segment: (country, device_type) of the request, or None.

    Returns:
        Values in ``plan.names`` order (prior, else the definition default; None is
        null) and the tier: SEGMENT for a user whose segment the priors know, else GLOBAL.
    """
    vals, tier = fallback_values(
        plan.entity, dict(zip(plan.names, plan.defaults, strict=True)), priors, segment)
    return [vals[n] for n in plan.names], tier
