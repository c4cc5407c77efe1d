"""The topology and event contract are compiled once into the Registry, and every reader
(engine, ``headrace apply``, codecs, validator, offline join) takes them from there."""

from __future__ import annotations

import ast
import inspect
from datetime import timedelta
from pathlib import Path

import xxhash

from feature_defs.contract import FIELD_TYPES, KINDS, ROUTING_KEY
from feature_defs.measures import last_tiebreaks
from feature_defs.model import AggOp, Entity, Feature, FeatureView, Measure, Source
from feature_defs.registry import Registry, load_registry
from feature_defs.standard import AD, USER
from feature_defs.validate import NUMERIC_FIELDS, STRING_FIELDS, validate_views
from feature_defs.windows import sliding
from headrace.core.online_store import MemoryOnlineStore
from streams.engine import Engine
from streams.events import EVENT_SPECS
from streams.sides import MemorySideOutputs

H, M = timedelta(hours=1), timedelta(minutes=1)


def test_standard_topology() -> None:
    topo = load_registry().topology
    assert topo.routing_key == ROUTING_KEY == "user_id"
    assert dict(topo.source_kinds) == {"impressions": "impression", "clicks": "click"}
    assert topo.local_views == ("user_activity@1",)
    assert topo.repartitioned_entities == ("ad", "campaign", "publisher")
    assert dict(topo.repartitioned) == {"ad": ("ad_activity@1",),
                                        "campaign": ("campaign_activity@1",),
                                        "publisher": ("publisher_activity@1",)}
    assert dict(topo.lateness_ms) == {"impressions": 60_000, "clicks": 60_000}
    assert topo.fields_of("user_activity@1", "impressions") == ("ad_id",)
    assert topo.fields_of("ad_activity@1", "impressions") == ()
    assert topo.last_views == frozenset()
    assert list(topo.field_types) == ["impression", "click"]


def test_the_contract_is_the_one_the_codecs_and_the_validator_use() -> None:
    for kind in KINDS:
        assert EVENT_SPECS[kind].field_types == dict(FIELD_TYPES[kind])
        assert EVENT_SPECS[kind].fields == tuple(FIELD_TYPES[kind])  # the Avro file agrees
    assert STRING_FIELDS["click"] == {"event_id", "impression_id", "user_id", "ad_id",
                                      "campaign_id", "publisher_id", "prediction_id",
                                      "model_version", "device_type", "country"}
    assert NUMERIC_FIELDS == {"impression": {"bid_cpm", "ts", "p_ctr"},
                              "click": {"ts", "p_ctr"}}


def _view(name: str, entity: Entity, sources: tuple[Source, ...], op: AggOp = AggOp.COUNT,
          field: str | None = None) -> FeatureView:
    m = Measure(op, sources[0].name, field)
    return FeatureView(name=name, entity=entity, sources=sources,
                       features=(Feature("f", (sliding(H, M),), measure=m),),
                       allowed_lateness=timedelta(seconds=5))


def test_source_kinds_come_from_the_definitions() -> None:
    shown = Source("shown", "impression")
    reg = Registry.build([_view("u", USER, (shown,), AggOp.LAST, "bid_cpm"),
                          _view("a", AD, (shown,))])
    topo = reg.topology
    assert dict(topo.source_kinds) == {"shown": "impression"}
    assert topo.local_views == ("u@1",) and topo.repartitioned_entities == ("ad",)
    assert topo.last_views == {"u@1"} and topo.lateness_ms["shown"] == 5000
    eng = Engine(registry=reg, store=MemoryOnlineStore(), writer=None,
                 sides=MemorySideOutputs(), topic=lambda t: f"p.{t}", redis_prefix="hr",
                 group="g", max_future_ms=0)
    assert eng.input_topics() == ["p.shown", "p.headrace-repartition-ad"]
    assert eng.kinds["shown"] == "impression"


def test_a_source_read_as_two_kinds_is_reported() -> None:
    views = [_view("u", USER, (Source("mixed", "impression"),)),
             _view("a", AD, (Source("mixed", "click"),))]
    problems = validate_views(views)
    assert len(problems) == 1 and "view a.sources[mixed].kind" in problems[0], problems


def test_last_tiebreak_is_the_event_id_hash_halved() -> None:
    ids = ["e1", "é-2", "", None]
    assert last_tiebreaks(ids) == [xxhash.xxh64_intdigest(v.encode()) >> 1
                                   for v in ("e1", "é-2", "", "")]
    assert all(0 <= t < 2**63 for t in last_tiebreaks(ids))


def test_the_worker_uses_only_engine_methods() -> None:
    """``streams/worker.py`` calls the engine's methods and reads none of its state."""
    tree = ast.parse(Path(inspect.getfile(Engine)).with_name("worker.py").read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "engine"):
            used.add(node.attr)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "engine":
            used.add(node.attr)
    assert used, "the worker should drive the engine"
    for name in used:
        member = inspect.getattr_static(Engine, name, None)
        assert inspect.isfunction(member), f"Worker reads Engine.{name}, not a method"
