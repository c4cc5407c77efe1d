"""Online evaluation per arm: opt-in feature views of the model version that scored each ad.

Not part of the shipped standard set (so the standard stream figures stay true): run
them with ``--definitions feature_defs.evaluation`` (``VIEWS``: the standard views plus
these) or ``HEADRACE_DEFINITIONS=feature_defs.evaluation``; ``EVALUATION_VIEWS`` alone are
these five. :class:`serving.arm_stats.ViewStatsSource` reads them as the rollout
controller's :class:`~headrace.rollout.gates.ArmStats`.

Every window is ``lifetime`` (cumulative since the views started, what a
``StatsSource`` answers); the online TTL is :data:`EVALUATION_TTL`, so a quiet segment's
counts do not expire during a rollout (≥ 12 days). An impression counts for the arm of
its ``model_version``; a click for the arm of *its own* ``model_version`` (the click
carries it: no join with the impression), and in the bucket and segments of its own
``p_ctr``, ``publisher_id``, ``device_type`` and ``country`` (which producers copy from
the impression clicked, :data:`feature_defs.contract.ADDED_FIELDS`). An event without a
``model_version`` touches none of these views; one without a key part touches none of
that part's view (:mod:`feature_defs.keys`). Late events (beyond the 60 s allowed
lateness) are not counted, as in every view.

Entities and features (``{entity}__{feature}_lifetime``):

* ``arm`` (``model_version``): ``impressions``, ``clicks``, ``sum_pctr`` (Σ p_ctr of
  impressions), ``min_pctr``, ``max_pctr`` (null until a p_ctr is seen).
* ``arm_publisher``, ``arm_device_type``, ``arm_country`` (``model_version`` × the
  segment): ``impressions``, ``clicks``.
* ``arm_pctr_bucket`` (``model_version`` × ``p_ctr_bucket``, the fixed
  :data:`feature_defs.keys.PCTR_EDGES`): ``impressions``, ``clicks``, ``sum_pctr``.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Final

from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure
from feature_defs.standard import CLICKS, IMPS, LATENESS, SOURCES
from feature_defs.standard import VIEWS as STANDARD_VIEWS
from feature_defs.windows import lifetime

__all__ = ["ARM", "ARM_PUBLISHER", "ARM_DEVICE_TYPE", "ARM_COUNTRY", "ARM_PCTR_BUCKET",
           "SEGMENT_ENTITIES", "EVALUATION_TTL", "ARM_EVALUATION", "ARM_PUBLISHER_EVALUATION",
           "ARM_DEVICE_TYPE_EVALUATION", "ARM_COUNTRY_EVALUATION", "ARM_PCTR_BUCKET_EVALUATION",
           "EVALUATION_VIEWS", "VIEWS"]

ARM = Entity("arm", "model_version", "a model version serving traffic (a rollout arm)")
ARM_PUBLISHER = Entity("arm_publisher", ("model_version", "publisher_id"),
                       "an arm on one publisher")
ARM_DEVICE_TYPE = Entity("arm_device_type", ("model_version", "device_type"),
                         "an arm on one device type")
ARM_COUNTRY = Entity("arm_country", ("model_version", "country"), "an arm in one country")
ARM_PCTR_BUCKET = Entity("arm_pctr_bucket", ("model_version", "p_ctr_bucket"),
                         "an arm's predictions in one predicted-CTR bucket")
#: segment dimension (ArmStats.segments' keys) -> its entity
SEGMENT_ENTITIES: Final = {"publisher": ARM_PUBLISHER, "device_type": ARM_DEVICE_TYPE,
                           "country": ARM_COUNTRY}
#: online TTL of the evaluation views: longer than any rollout
EVALUATION_TTL: Final = timedelta(days=60)

_LIFE = (lifetime(),)
_SUM_PCTR = Measure(AggOp.SUM, "impressions", "p_ctr")


def _counts() -> tuple[Feature, ...]:
    return (Feature("impressions", _LIFE, measure=IMPS, default=0,
                    description="impressions scored by the arm"),
            Feature("clicks", _LIFE, measure=CLICKS, default=0,
                    description="clicks attributed to the arm (the click's model_version)"))


def _sum_pctr() -> Feature:
    return Feature("sum_pctr", _LIFE, measure=_SUM_PCTR, default=0.0,
                   description="sum of the impressions' predicted CTR")


def _view(name: str, entity: Entity, features: tuple[Feature, ...], what: str) -> FeatureView:
    return FeatureView(name=name, entity=entity, sources=SOURCES, features=features,
                       allowed_lateness=LATENESS, online_ttl=EVALUATION_TTL,
                       description=what, tags=(("purpose", "evaluation"),))


ARM_EVALUATION = _view("arm_evaluation", ARM, _counts() + (
    _sum_pctr(),
    Feature("min_pctr", _LIFE, measure=Measure(AggOp.MIN, "impressions", "p_ctr"),
            description="smallest predicted CTR served (null: none)"),
    Feature("max_pctr", _LIFE, measure=Measure(AggOp.MAX, "impressions", "p_ctr"),
            description="largest predicted CTR served (null: none)"),
), "per-arm lifetime counts")
ARM_PUBLISHER_EVALUATION = _view("arm_publisher_evaluation", ARM_PUBLISHER, _counts(),
                                 "per arm and publisher")
ARM_DEVICE_TYPE_EVALUATION = _view("arm_device_type_evaluation", ARM_DEVICE_TYPE, _counts(),
                                   "per arm and device type")
ARM_COUNTRY_EVALUATION = _view("arm_country_evaluation", ARM_COUNTRY, _counts(),
                               "per arm and country")
ARM_PCTR_BUCKET_EVALUATION = _view("arm_pctr_bucket_evaluation", ARM_PCTR_BUCKET,
                                   _counts() + (_sum_pctr(),),
                                   "per arm and predicted-CTR bucket (calibration)")

EVALUATION_VIEWS: Final = (ARM_EVALUATION, ARM_PUBLISHER_EVALUATION,
                           ARM_DEVICE_TYPE_EVALUATION, ARM_COUNTRY_EVALUATION,
                           ARM_PCTR_BUCKET_EVALUATION)
#: the standard views plus the evaluation views (``--definitions feature_defs.evaluation``)
VIEWS: Final = tuple(STANDARD_VIEWS) + EVALUATION_VIEWS
