"""Validation of feature definitions: every problem at once, each with its location."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import timedelta

from feature_defs.contract import FIELD_TYPES, KINDS, numeric_fields, string_fields
from feature_defs.keys import DERIVED_FIELDS
from feature_defs.model import AggOp, Feature, FeatureView, feature_name
from feature_defs.windows import WindowKind, to_ms

__all__ = ["validate_views", "NUMERIC_FIELDS", "STRING_FIELDS"]

#: fields of the event kinds by type, from the input contract (:mod:`feature_defs.contract`)
STRING_FIELDS: dict[str, frozenset[str]] = {k: string_fields(k) for k in KINDS}
NUMERIC_FIELDS: dict[str, frozenset[str]] = {k: numeric_fields(k) for k in KINDS}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _window_problems(where: str, w: object) -> list[str]:
    from feature_defs.windows import Window

    if not isinstance(w, Window):
        return [f"{where}: not a Window (use sliding(), tumbling() or lifetime())"]
    out: list[str] = []
    if w.kind is WindowKind.LIFETIME:
        return out
    if w.length is None or w.length <= timedelta(0):
        return [f"{where}: length must be a positive timedelta"]
    if w.length % timedelta(milliseconds=1):
        out.append(f"{where}: length must be whole milliseconds")
    if w.kind is WindowKind.SLIDING:
        if w.resolution is None or w.resolution <= timedelta(0):
            out.append(f"{where}: a sliding window needs a positive resolution")
        elif w.resolution % timedelta(milliseconds=1):
            out.append(f"{where}: resolution {w.resolution} must be whole milliseconds")
        elif to_ms(w.length) % to_ms(w.resolution) != 0:
            out.append(f"{where}: resolution {w.resolution} does not divide length {w.length}")
    return out


def _feature_problems(view: FeatureView, i: int, feat: Feature) -> list[str]:
    where = f"{view.name}.features[{i}] ({getattr(feat, 'name', '?')})"
    out: list[str] = []
    if not _NAME.match(str(feat.name)):
        out.append(f"{where}.name: must match {_NAME.pattern}")
    if (feat.measure is None) == (feat.ratio is None):
        out.append(f"{where}: set exactly one of measure or ratio")
    if not feat.windows:
        out.append(f"{where}.windows: at least one window is required")
    for j, w in enumerate(feat.windows):
        out.extend(_window_problems(f"{where}.windows[{j}]", w))
    kinds = {s.name: s.kind for s in view.sources}
    for k, m in enumerate(feat.measures):
        mwhere = f"{where}.measure" if feat.measure is not None else f"{where}.ratio[{k}]"
        if not isinstance(m.op, AggOp):
            out.append(f"{mwhere}.op: must be an AggOp, not {m.op!r}")
            continue
        if m.source not in kinds:
            out.append(f"{mwhere}.source: '{m.source}' is not a source of view {view.name}")
            continue
        kind = kinds[m.source]
        if m.op is AggOp.COUNT:
            if m.field is not None:
                out.append(f"{mwhere}.field: count takes no field")
        elif m.op is AggOp.APPROX_DISTINCT:
            if m.field not in STRING_FIELDS.get(kind, frozenset()) | NUMERIC_FIELDS.get(
                    kind, frozenset()):
                out.append(f"{mwhere}.field: '{m.field}' is not a field of {kind} events")
        elif m.field not in NUMERIC_FIELDS.get(kind, frozenset()):
            out.append(f"{mwhere}.field: {m.op.value} needs a numeric field of {kind} events, "
                       f"got '{m.field}'")
    if feat.ratio is not None and feat.default is not None and not isinstance(
        feat.default, (int, float)
    ):
        out.append(f"{where}.default: must be a number or None")
    if feat.measure is not None and feat.measure.op in (AggOp.COUNT, AggOp.APPROX_DISTINCT):
        if feat.default is not None and not isinstance(feat.default, int):
            out.append(f"{where}.default: a count's default must be an int")
    return out


def _key_problems(view: FeatureView, where: str) -> list[str]:
    """A key is a field name, or a tuple of at least two distinct ones (composite); each
    part of a composite key must be a string field of every source kind of the view, or
    a derived field whose base field is (:mod:`feature_defs.keys`)."""
    key = view.entity.key
    if isinstance(key, str):
        return [] if _NAME.match(key) else [f"{where}.entity.key: must match {_NAME.pattern}"]
    if not isinstance(key, tuple) or not all(isinstance(k, str) for k in key):
        return [f"{where}.entity.key: a field name or a tuple of field names, not {key!r}"]
    if len(key) < 2:
        return [f"{where}.entity.key: a composite key needs at least two fields "
                "(name one field as a plain string)"]
    out: list[str] = []
    if len(set(key)) != len(key):
        out.append(f"{where}.entity.key: a field appears twice in {key!r}")
    kinds = [s.kind for s in view.sources if s.kind in FIELD_TYPES]
    for part in key:
        if not _NAME.match(part):
            out.append(f"{where}.entity.key: {part!r} must match {_NAME.pattern}")
            continue
        for kind in dict.fromkeys(kinds):
            base = DERIVED_FIELDS.get(part)
            if base is not None:
                if base not in NUMERIC_FIELDS.get(kind, frozenset()):
                    out.append(f"{where}.entity.key: derived {part!r} needs field {base!r}, "
                               f"which {kind} events do not have")
            elif part not in STRING_FIELDS.get(kind, frozenset()):
                out.append(f"{where}.entity.key: {part!r} is not a string field of {kind} "
                           "events")
    return out


def validate_views(views: Iterable[FeatureView]) -> list[str]:
    """Return every problem found in ``views`` (empty list when they are valid)."""
    problems: list[str] = []
    seen_names: dict[str, str] = {}
    seen_views: set[str] = set()
    seen_kinds: dict[str, tuple[str, str]] = {}  # source -> (kind, first view reading it)
    for view in views:
        where = f"view {getattr(view, 'name', '?')}"
        if not isinstance(view, FeatureView):
            problems.append(f"{where}: not a FeatureView")
            continue
        if not _NAME.match(view.name):
            problems.append(f"{where}.name: must match {_NAME.pattern}")
        if view.id in seen_views:
            problems.append(f"{where}: defined twice (same name and version)")
        seen_views.add(view.id)
        if not _NAME.match(str(view.entity.name)):
            problems.append(f"{where}.entity.name: must match {_NAME.pattern}")
        problems.extend(_key_problems(view, where))
        if view.version < 1:
            problems.append(f"{where}.version: must be >= 1")
        if not view.sources:
            problems.append(f"{where}.sources: at least one source topic is required")
        for s in view.sources:
            if s.kind not in FIELD_TYPES:
                problems.append(f"{where}.sources[{s.name}].kind: unknown event kind '{s.kind}'")
            elif seen_kinds.setdefault(s.name, (s.kind, where))[0] != s.kind:
                kind, first = seen_kinds[s.name]
                problems.append(f"{where}.sources[{s.name}].kind: '{s.kind}', but {first} "
                                f"reads it as '{kind}' (a topic carries one event kind)")
        if view.allowed_lateness < timedelta(0):
            problems.append(f"{where}.allowed_lateness: must not be negative")
        elif view.allowed_lateness % timedelta(milliseconds=1):
            # the engine decides lateness per view in whole ms (feature_defs.topology)
            problems.append(f"{where}.allowed_lateness: must be whole milliseconds")
        if view.online_ttl is not None and view.online_ttl <= timedelta(0):
            problems.append(f"{where}.online_ttl: must be positive")
        if not view.features:
            problems.append(f"{where}.features: at least one feature is required")
        for i, feat in enumerate(view.features):
            problems.extend(_feature_problems(view, i, feat))
            for w in feat.windows:
                try:
                    name = feature_name(view.entity.name, feat.name, w)
                except Exception:  # noqa: BLE001 - a broken window is reported above
                    continue
                if name in seen_names:
                    problems.append(f"{where}: feature name {name} also defined in "
                                    f"{seen_names[name]}")
                seen_names[name] = where
    return problems
