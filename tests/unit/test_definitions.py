"""``HEADRACE_DEFINITIONS``: one setting, honoured by every command, ``--definitions`` over
it, file-path specs, and broken definitions exit 2 listing every problem.

The user module is :mod:`tests.user_views` (its ``VIEWS``: publisher_clicks, ad_bids,
user_spend; the shipped set has none of them). Commands run in-process through
:func:`headrace.cli.main`; the step behind the registry (Redis, Kafka, the offline store,
the server) is replaced by a fake that records the registry it was handed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from feature_defs.registry import (
    DEFAULT_DEFINITIONS,
    Registry,
    definitions_spec,
    load_registry,
    portable_spec,
    registry_for,
)
from headrace.cli import main
from headrace.core.errors import DefinitionError, InputError
from headrace.core.settings import SETTINGS_CLASSES, SHIPPED_DEFINITIONS, CommonSettings

USER_FILE = Path(__file__).resolve().parents[1] / "user_views.py"
USER_MODULE = "tests.user_views:VIEWS"
USER_VIEWS = {"publisher_clicks@1", "ad_bids@1", "user_spend@1"}
SHIPPED_VIEWS = {v.id for v in load_registry().views}

BROKEN = '''
from datetime import timedelta
from feature_defs import AggOp, Entity, Feature, FeatureView, Measure, Source, sliding

CLICKS = Source("clicks", "click")
VIEWS = (
    FeatureView(name="Bad-Name", entity=Entity("publisher", "publisher_id"), sources=(CLICKS,),
                features=(Feature("clicks", (sliding(timedelta(hours=1), timedelta(minutes=7)),),
                                  measure=Measure(AggOp.COUNT, "clicks")),)),
    FeatureView(name="spend", entity=Entity("ad", "ad_id"), sources=(CLICKS,),
                features=(Feature("spend", (sliding(timedelta(hours=1), timedelta(minutes=1)),),
                                  measure=Measure(AggOp.SUM, "impressions", "bid_cpm")),)),
)
'''


class _Handed(Exception):
    """Raised by a fake with what it was handed (stops the command there)."""

    def __init__(self, registry: Registry, **seen: Any) -> None:
        super().__init__("handed")
        self.registry, self.seen = registry, seen


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main(argv)
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _views(registry: Registry) -> set[str]:
    return {v.id for v in registry.views}


@pytest.fixture
def user_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADRACE_DEFINITIONS", USER_MODULE)


@pytest.fixture(autouse=True)
def _no_exported_definitions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_DEFINITIONS", raising=False)


# ------------------------------------------------------------------ the setting and the rule
def test_the_setting_defaults_to_the_shipped_set_in_every_deployable() -> None:
    assert SHIPPED_DEFINITIONS == DEFAULT_DEFINITIONS
    for cls in SETTINGS_CLASSES:
        assert cls.from_env({}).definitions == DEFAULT_DEFINITIONS
        assert cls.from_env({"HEADRACE_DEFINITIONS": " "}).definitions == DEFAULT_DEFINITIONS
        assert cls.from_env({"headrace_definitions": USER_MODULE}).definitions == USER_MODULE
    assert "definitions:" in (CommonSettings.__doc__ or "")


def test_the_environment_is_read_into_settings(user_env: None) -> None:
    assert CommonSettings().definitions == USER_MODULE


def test_flag_over_env_over_default() -> None:
    env = CommonSettings.from_env({"HEADRACE_DEFINITIONS": USER_MODULE})
    assert definitions_spec(CommonSettings.from_env({})) == DEFAULT_DEFINITIONS
    assert definitions_spec(env) == USER_MODULE
    assert definitions_spec(env, "tests.user_views:ALL_VIEWS") == "tests.user_views:ALL_VIEWS"
    assert _views(registry_for(CommonSettings.from_env({}))) == SHIPPED_VIEWS
    assert _views(registry_for(env)) == USER_VIEWS
    assert _views(registry_for(env, DEFAULT_DEFINITIONS)) == SHIPPED_VIEWS


# ---------------------------------------------------------------------------- spec forms
def test_a_file_path_spec_absolute_and_relative(monkeypatch: pytest.MonkeyPatch) -> None:
    reg = load_registry(f"{USER_FILE}:VIEWS")
    assert _views(reg) == USER_VIEWS
    assert reg.spec == f"{USER_FILE}:VIEWS" and reg.source_file == str(USER_FILE)
    monkeypatch.chdir(USER_FILE.parent)
    assert _views(load_registry("user_views.py:ALL_VIEWS")) == USER_VIEWS | SHIPPED_VIEWS
    assert _views(load_registry("./user_views.py")) == USER_VIEWS  # ATTR defaults to VIEWS
    assert portable_spec("user_views.py:VIEWS") == f"{USER_FILE}:VIEWS"
    assert portable_spec(USER_MODULE) == USER_MODULE


def test_a_module_in_the_current_directory(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cwd_views_mod.py").write_text(
        f"import runpy\nVIEWS = runpy.run_path({str(USER_FILE)!r})['VIEWS']\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path
                                     if p not in ("", os.getcwd())])
    assert _views(load_registry("cwd_views_mod:VIEWS")) == USER_VIEWS


def test_a_broken_file_exits_2_listing_every_problem(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken_views.py"
    path.write_text(BROKEN)
    with pytest.raises(DefinitionError) as info:
        load_registry(f"{path}:VIEWS")
    problems = info.value.problems
    assert len(problems) >= 3  # the name, the resolution, the unread source
    assert any("Bad-Name" in p and ".name" in p for p in problems)
    assert any("resolution" in p for p in problems)
    assert any("impressions" in p for p in problems)
    code, _, err = _run(["apply", "--definitions", f"{path}:VIEWS"], capsys)
    assert code == 2
    assert f"'{path}:VIEWS'" in err
    for p in problems:
        assert p in err


@pytest.mark.parametrize(("body", "attr", "expect"), [
    ("VIEWS = (\n", "VIEWS", "SyntaxError"),
    ("import no_such_package_xyz\n", "VIEWS", "no_such_package_xyz"),
    ("raise ValueError('bad window')\n", "VIEWS", "ValueError: bad window"),
    ("VIEWS = ()\n", "VIEWS", "holds no views"),
    ("VIEWS = 'user'\n", "VIEWS", "must be a sequence of FeatureView"),
    ("OTHER = ()\n", "VIEWS", "has no attribute 'VIEWS'"),
])
def test_a_file_that_does_not_load_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           body: str, attr: str, expect: str) -> None:
    path = tmp_path / "defs_that_fail.py"
    path.write_text(body)
    code, _, err = _run(["apply", "--definitions", f"{path}:{attr}"], capsys)
    assert code == 2
    assert expect in err and str(path) in err
    assert "Traceback" not in err


@pytest.mark.parametrize("spec", ["no_such_module_xyz:VIEWS", "no/such/file.py:VIEWS",
                                  "tests.user_views:NO_SUCH", ":VIEWS"])
def test_a_spec_that_does_not_resolve_exits_2(spec: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InputError):
        load_registry(spec)
    code, _, err = _run(["apply", "--definitions", spec], capsys)
    assert code == 2 and "cannot load feature definitions" in err


def test_the_env_value_is_checked_like_the_flag(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HEADRACE_DEFINITIONS", "no_such_module_xyz:VIEWS")
    for argv in (["apply"], ["lag"], ["get", "--entity", "user", "--id", "u1"]):
        code, _, err = _run(argv, capsys)
        assert code == 2 and "no_such_module_xyz" in err, argv


# -------------------------------------------------------------------------- every command
def test_apply_prints_what_it_loaded(user_env: None, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["apply"], capsys)
    assert code == 0
    assert out.splitlines()[0] == f"definitions {USER_MODULE} ({USER_FILE})"
    code, out, _ = _run(["apply", "--json"], capsys)
    plan = json.loads(out)
    assert plan["definitions"] == {"spec": USER_MODULE, "file": str(USER_FILE)}
    assert {v["view"] for v in plan["views"]} == USER_VIEWS
    code, out, _ = _run(["apply", "--json", "--definitions", DEFAULT_DEFINITIONS], capsys)
    plan = json.loads(out)
    assert {v["view"] for v in plan["views"]} == SHIPPED_VIEWS
    assert plan["definitions"]["file"].endswith("feature_defs/standard.py")


def test_get_reads_the_views_of_the_env(user_env: None, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from headrace.core.online_store import MemoryOnlineStore

    monkeypatch.setattr("headrace.core.online_store.RedisOnlineStore",
                        lambda *a, **k: MemoryOnlineStore())
    argv = ["get", "--entity", "publisher", "--id", "pub0001", "--at", "1700000000000",
            "--json"]
    code, out, _ = _run(argv, capsys)
    assert code == 0
    assert json.loads(out)["features"] == {"publisher__clicks_1h": 0, "publisher__clicks_24h": 0}
    code, _, err = _run([*argv, "--definitions", DEFAULT_DEFINITIONS, "--features",
                         "publisher__clicks_1h"], capsys)
    assert code == 2 and "not a feature of 'publisher'" in err


def test_training_set_joins_the_views_of_the_env(
        user_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    def fake(labels: str, out: str, features: str, settings: Any, *, registry: Registry,
             **kw: Any) -> int:
        raise _Handed(registry, settings=settings)

    monkeypatch.setattr("offline.training_set.write_training_set", fake)
    argv = ["training-set", "--labels", str(tmp_path / "l.parquet"), "--out",
            str(tmp_path / "t.parquet")]
    with pytest.raises(_Handed) as info:
        main(argv)
    assert _views(info.value.registry) == USER_VIEWS
    with pytest.raises(_Handed) as info:
        main([*argv, "--definitions", "tests.user_views:ALL_VIEWS"])
    assert _views(info.value.registry) == USER_VIEWS | SHIPPED_VIEWS


def test_the_training_set_library_defaults_to_the_settings_definitions(tmp_path: Path) -> None:
    import pyarrow as pa

    from headrace.core.settings import OfflineSettings
    from offline.training_set import build_training_set

    settings = OfflineSettings.from_env({"HEADRACE_DEFINITIONS": USER_MODULE,
                                         "HEADRACE_OFFLINE_URI": str(tmp_path),
                                         "HEADRACE_PROGRESS": "false"})
    labels = pa.table({"publisher_id": ["pub0001"],
                       "ts": pa.array([1_700_000_000_000], pa.timestamp("ms", tz="UTC"))})
    out = build_training_set(labels, "publisher__clicks_1h", settings)  # an empty store
    assert out.column("publisher__clicks_1h").to_pylist() == [0]
    assert out.column("publisher_clicks__is_default").to_pylist() == [True]


def test_train_uses_the_views_of_the_env(user_env: None, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_train(table: Any, out: Any, *, registry: Registry, **kw: Any) -> Any:
        raise _Handed(registry)

    monkeypatch.setattr("offline.train.read_training_set", lambda *a, **k: None)
    monkeypatch.setattr("offline.train.train", fake_train)
    with pytest.raises(_Handed) as info:
        main(["train", "--training-set", str(tmp_path / "t.parquet"), "--out", str(tmp_path)])
    assert _views(info.value.registry) == USER_VIEWS


def test_priors_use_the_views_of_the_env(user_env: None,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(settings: Any, registry: Registry, **kw: Any) -> Any:
        raise _Handed(registry)

    monkeypatch.setattr("offline.priors.build_priors", fake)
    with pytest.raises(_Handed) as info:
        main(["priors", "--dry-run"])
    assert _views(info.value.registry) == USER_VIEWS
    with pytest.raises(_Handed) as info:
        main(["priors", "--dry-run", "--definitions", DEFAULT_DEFINITIONS])
    assert _views(info.value.registry) == SHIPPED_VIEWS


def test_lag_watches_the_topics_of_the_env(user_env: None, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr("streams.lag.consumer_lag",
                        lambda conf, group, topics: seen.append(list(topics)) or [])
    assert _run(["lag", "--json"], capsys)[0] == 0
    assert _run(["lag", "--json", "--definitions", DEFAULT_DEFINITIONS], capsys)[0] == 0
    user, shipped = seen
    # the user views repartition by ad and publisher only; the shipped set also by campaign
    assert "headrace-repartition-publisher" in user
    assert "headrace-repartition-campaign" not in user
    assert "headrace-repartition-campaign" in shipped


def test_serve_builds_its_server_from_the_env(user_env: None,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("grpc_health")

    def fake(settings: Any, *, registry: Registry, **kw: Any) -> Any:
        raise _Handed(registry)

    monkeypatch.setattr("serving.server.build_server", fake)
    with pytest.raises(_Handed) as info:
        main(["serve", "--port", "0"])
    assert _views(info.value.registry) == USER_VIEWS


def test_worker_runs_the_views_of_the_env(user_env: None,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    def fake(settings: Any, registry: Registry, **kw: Any) -> int:
        raise _Handed(registry)

    monkeypatch.setattr("streams.app.run_worker", fake)
    with pytest.raises(_Handed) as info:
        main(["worker"])
    assert _views(info.value.registry) == USER_VIEWS
    with pytest.raises(_Handed) as info:
        main(["worker", "--definitions", DEFAULT_DEFINITIONS])
    assert _views(info.value.registry) == SHIPPED_VIEWS


def test_the_demo_hands_its_steps_the_same_definitions(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from headrace.demo import definitions_env, run_demo

    rel = definitions_env("tests/user_views.py:VIEWS", str(tmp_path))
    assert rel == {"HEADRACE_DEFINITIONS": f"{Path('tests/user_views.py').resolve()}:VIEWS"}
    mod = definitions_env(USER_MODULE, str(tmp_path))
    assert mod["HEADRACE_DEFINITIONS"] == USER_MODULE
    assert mod["PYTHONPATH"].split(os.pathsep)[-1] == str(tmp_path)
    assert definitions_env(DEFAULT_DEFINITIONS, str(tmp_path)) == {
        "HEADRACE_DEFINITIONS": DEFAULT_DEFINITIONS}
    # broken definitions fail before any stack starts
    monkeypatch.setattr("headrace.stack.local.local_stack",
                        lambda *a, **k: pytest.fail("the stack started"))
    monkeypatch.setenv("HEADRACE_DEFINITIONS", "no_such_module_xyz:VIEWS")
    with pytest.raises(InputError):
        run_demo()
