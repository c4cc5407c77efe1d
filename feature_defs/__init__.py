"""Declarative feature definitions and the window semantics every runtime shares.

Pure data and arithmetic: no I/O imports here.
"""

from feature_defs.measures import KMV_K, distinct_hash, kmv_estimate
from feature_defs.model import (
    AggOp,
    Entity,
    Feature,
    FeatureType,
    FeatureView,
    Measure,
    Source,
    feature_name,
)
from feature_defs.plan import OutputPlan, RingPlan, ViewPlan, compile_view
from feature_defs.registry import (
    DEFAULT_DEFINITIONS,
    Registry,
    load_registry,
    portable_spec,
    registry_for,
)
from feature_defs.state import NO_TS, ViewState, fence_key, fence_pos
from feature_defs.validate import validate_views
from feature_defs.windows import Window, WindowKind, lifetime, sliding, tumbling

__all__ = [
    "AggOp", "Entity", "Feature", "FeatureType", "FeatureView", "Measure", "Source",
    "feature_name", "Window", "WindowKind", "sliding", "tumbling", "lifetime",
    "OutputPlan", "RingPlan", "ViewPlan", "compile_view", "ViewState", "NO_TS",
    "fence_key", "fence_pos", "Registry", "load_registry", "registry_for", "portable_spec",
    "DEFAULT_DEFINITIONS",
    "validate_views", "KMV_K", "distinct_hash", "kmv_estimate",
]
