"""Composite entity keys and the derived ``p_ctr_bucket`` (feature_defs.keys): the join,
null parts, the separator, the bucket edges, validation, and the offline refusal."""

from __future__ import annotations

import pyarrow as pa
import pytest

from feature_defs.evaluation import ARM, ARM_COUNTRY, ARM_PCTR_BUCKET, ARM_PUBLISHER
from feature_defs.keys import (
    PCTR_BUCKET_LABELS,
    PCTR_EDGES,
    SEPARATOR,
    bucket_bounds,
    entity_ids,
    event_entity_id,
    id_problem,
    join_id,
    pctr_bucket,
    split_id,
)
from feature_defs.layout import entity_id_problem, entity_key
from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.registry import load_registry
from feature_defs.validate import validate_views
from feature_defs.windows import lifetime
from headrace.core.errors import InputError


def test_the_separator_cannot_occur_inside_an_id() -> None:
    assert entity_id_problem(SEPARATOR) is not None
    assert all(entity_id_problem(c) is not None for c in SEPARATOR)
    assert join_id(["v4", "p01"]) == "v4}{p01"
    assert entity_key("hr", "arm_publisher", "v4}{p01") == "hr:arm_publisher:{v4}{p01}"
    assert split_id(ARM_PUBLISHER, "v4}{p01") == ("v4", "p01")
    assert split_id(ARM, "v4") == ("v4",)


def test_a_null_or_invalid_part_gives_no_id() -> None:
    assert join_id(["v4", None]) is None
    assert join_id([None, "p1"]) is None
    assert join_id(["v4", "smart tv"]) is None  # not a valid id part
    ev = {"model_version": "v4", "publisher_id": "p1", "country": None, "p_ctr": 0.03}
    assert event_entity_id(ARM_PUBLISHER, ev) == "v4}{p1"
    assert event_entity_id(ARM_COUNTRY, ev) is None
    assert event_entity_id(ARM_PCTR_BUCKET, ev) == "v4}{0.02-0.05"
    assert event_entity_id(ARM, {"model_version": None}) is None


def test_id_problem_checks_every_part() -> None:
    assert id_problem(ARM_PUBLISHER, "v4}{p1") is None
    assert "2 parts" in (id_problem(ARM_PUBLISHER, "v4") or "")
    assert "part publisher_id" in (id_problem(ARM_PUBLISHER, "v4}{") or "")
    assert id_problem(ARM, "v4}{p1") is not None  # a single key: braces are not allowed


@pytest.mark.parametrize(("p", "label"), [
    (0.0, "0-0.001"), (0.000999, "0-0.001"), (0.001, "0.001-0.002"), (0.0049999, "0.002-0.005"),
    (0.005, "0.005-0.01"), (0.01, "0.01-0.02"), (0.02, "0.02-0.05"), (0.05, "0.05-0.1"),
    (0.1, "0.1-0.2"), (0.2, "0.2-0.5"), (0.4999, "0.2-0.5"), (0.5, "0.5-1"), (1.0, "0.5-1"),
    (None, None), (-1e-9, None), (1.0000001, None), (float("nan"), None)])
def test_the_bucket_at_its_edges(p: float | None, label: str | None) -> None:
    assert pctr_bucket(p) == label
    got = entity_ids(Entity("b", ("model_version", "p_ctr_bucket")),
                     pa.table({"model_version": ["v"], "p_ctr": pa.array([p], pa.float64())}))
    assert got.to_pylist() == [None if label is None else f"v{SEPARATOR}{label}"]


def test_bucket_labels_and_bounds() -> None:
    assert PCTR_EDGES == (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    assert len(PCTR_BUCKET_LABELS) == 10
    assert [bucket_bounds(b) for b in PCTR_BUCKET_LABELS[:2]] == [(0.0, 0.001), (0.001, 0.002)]
    assert all(entity_id_problem(b) is None for b in PCTR_BUCKET_LABELS)
    with pytest.raises(KeyError):
        bucket_bounds("nope")


def test_the_vectorized_ids_equal_the_per_event_ids() -> None:
    rows = {"model_version": ["v1", None, "v2", "v2", "v3"],
            "publisher_id": ["p1", "p2", None, "p3", "p4"],
            "country": ["US", "DE", "FR", "a b", "{x"],
            "p_ctr": pa.array([0.1, 0.2, None, 0.001, 1.0], pa.float64())}
    table = pa.table(rows)
    events = table.to_pylist()
    for entity in (ARM, ARM_PUBLISHER, ARM_COUNTRY, ARM_PCTR_BUCKET):
        assert entity_ids(entity, table).to_pylist() == \
            [event_entity_id(entity, e) for e in events], entity.name
    assert entity_ids(ARM_COUNTRY, table).to_pylist() == ["v1}{US", None, "v2}{FR", None, None]


def _view(key: object, sources: tuple[Source, ...] = (Source("impressions", "impression"),
                                                      Source("clicks", "click"))) -> FeatureView:
    return FeatureView("v", Entity("e", key), sources,  # type: ignore[arg-type]
                       (Feature("n", (lifetime(),), measure=Measure(AggOp.COUNT, sources[0].name),
                                default=0),))


def test_the_validator_reports_bad_composite_keys() -> None:
    assert validate_views([_view(("model_version", "publisher_id"))]) == []
    assert validate_views([_view(("model_version", "p_ctr_bucket"))]) == []
    assert validate_views([_view(("model_version",))]) == [
        "view v.entity.key: a composite key needs at least two fields (name one field as a "
        "plain string)"]
    assert validate_views([_view(("model_version", "model_version"))]) == [
        "view v.entity.key: a field appears twice in ('model_version', 'model_version')"]
    assert validate_views([_view(("model_version", "placement"))]) == [
        "view v.entity.key: 'placement' is not a string field of click events"]
    assert validate_views([_view(("model_version", "bid_cpm"))]) == [
        "view v.entity.key: 'bid_cpm' is not a string field of impression events",
        "view v.entity.key: 'bid_cpm' is not a string field of click events"]


def test_the_point_in_time_join_refuses_composite_keys_clearly() -> None:
    from offline.training_set import resolve_features

    reg = load_registry("feature_defs.evaluation")
    with pytest.raises(InputError, match="composite key .*arm_publisher"):
        resolve_features(reg, ["arm_publisher__clicks_lifetime"])
    # single-key views of the same set still join
    assert resolve_features(reg, ["arm__clicks_lifetime", "user__ctr_24h"]).names


def test_the_evaluation_views_are_opt_in() -> None:
    standard = load_registry()
    assert not any(e.startswith("arm") for e in standard.entities)
    reg = load_registry("feature_defs.evaluation")
    assert set(reg.entities) == set(standard.entities) | {
        "arm", "arm_publisher", "arm_device_type", "arm_country", "arm_pctr_bucket"}
    assert reg.topology.entity_keys["arm_pctr_bucket"] == ("model_version", "p_ctr_bucket")
