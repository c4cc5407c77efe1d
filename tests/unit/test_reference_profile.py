"""headrace.monitor.profile: the binning rule on hand-built data, a brute-force oracle
(quantiles and bin membership written out), the categorical top-k, and the file."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from headrace.core.errors import InputError
from headrace.monitor.profile import (
    MAX_CATEGORIES,
    NULL,
    OTHER,
    PROFILE_FILE,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    build_profile,
    load_profile,
    save_profile,
)

NAN = math.nan


def _tiny() -> ReferenceProfile:
    # a: 0..9 and one null; b: six 0s, four 1s, one null; c: all null
    a = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, NAN]
    b = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, NAN]
    c = [NAN] * 11
    x = np.array([a, b, c]).T
    pred = np.array([0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11])
    ctx = {"country": ["US", "US", "FR", None, "US", "DE", "FR", "US", NAN, "US", "FR"]}
    return build_profile("2024-05-01-13", x, ["a", "b", "c"], pred, ctx, bins=4)


def test_tiny_numeric_profiles_by_hand() -> None:
    p = _tiny()
    assert p.rows == 11 and p.version == "2024-05-01-13"
    assert list(p.features) == ["a", "b", "c"]
    # a: 10 finite values 0..9; linear quantile at q sits at position 9q of the sorted
    # values: 0.25 -> 2.25, 0.5 -> 4.5, 0.75 -> 6.75
    a = p.features["a"]
    assert a.edges == (2.25, 4.5, 6.75)
    # <2.25: 0,1,2 | [2.25,4.5): 3,4 | [4.5,6.75): 5,6 | >=6.75: 7,8,9 | null: 1
    assert a.counts == (3, 2, 2, 3, 1)
    assert a.null_share == pytest.approx(1 / 11)
    # b: sorted 0,0,0,0,0,0,1,1,1,1: positions 2.25 -> 0, 4.5 -> 0, 6.75 -> 1: edges 0, 1
    b = p.features["b"]
    assert b.edges == (0.0, 1.0)
    # <0: none | [0,1): six 0s | >=1: four 1s | null: 1
    assert b.counts == (0, 6, 4, 1)
    # c: nothing but nulls: no edges, one empty value bin and the null bin
    c = p.features["c"]
    assert c.edges == () and c.counts == (0, 11) and c.null_share == 1.0
    # predictions 0.01..0.11 (11 values): positions 2.5, 5, 7.5 -> 0.035, 0.06, 0.085
    assert p.prediction.name == "prediction"
    assert p.prediction.edges == pytest.approx((0.035, 0.06, 0.085), abs=1e-15)
    # <0.035: .01-.03 | [.035,.06): .04,.05 | [.06,.085): .06,.07,.08 | >=.085: .09-.11
    assert p.prediction.counts == (3, 2, 3, 3, 0)


def test_tiny_context_profile_by_hand() -> None:
    country = _tiny().context["country"]
    # US x5, FR x3, DE x1, None and NaN are null (2); most frequent first
    assert list(country.counts.items()) == [("US", 5), ("FR", 3), ("DE", 1), (OTHER, 0),
                                            (NULL, 2)]
    assert country.histogram(["FR", "IT", None, "US", "IT", NAN]) == {
        "US": 1, "FR": 1, "DE": 0, OTHER: 2, NULL: 2}


def test_histogram_puts_a_value_on_an_edge_in_the_bin_above() -> None:
    a = NumericProfile("a", (2.25, 4.5, 6.75), (3, 2, 2, 3, 1))
    got = a.histogram(np.array([4.5, 2.25, -np.inf, np.inf, NAN, 6.75, 6.7499]))
    # 4.5 -> [4.5, 6.75) bin 2; 2.25 -> bin 1; -inf -> 0; inf -> 3; NaN -> null;
    # 6.75 -> 3; 6.7499 -> 2
    assert got.tolist() == [1, 1, 2, 2, 1]
    assert got.dtype == np.int64
    assert a.histogram([1.0, None]).tolist() == [1, 0, 0, 0, 1]


def _oracle_edges(values: list[float], bins: int) -> list[float]:
    """Linear quantiles written out: position (n-1) q in the sorted values, interpolated."""
    s = sorted(v for v in values if not math.isnan(v))
    out: list[float] = []
    for i in range(1, bins):
        pos = (len(s) - 1) * i / bins
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        e = s[lo] + (s[hi] - s[lo]) * (pos - lo)
        if not out or e > out[-1]:
            out.append(e)
    return out


def _oracle_counts(values: list[float], edges: list[float]) -> list[int]:
    """Bin membership written out: bin i holds edges[i-1] <= v < edges[i]; null last."""
    counts = [0] * (len(edges) + 2)
    for v in values:
        if math.isnan(v):
            counts[-1] += 1
            continue
        i = 0
        while i < len(edges) and edges[i] <= v:
            i += 1
        counts[i] += 1
    return counts


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_profile_against_the_oracle(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 700
    x = np.column_stack([
        rng.normal(3.0, 2.0, n),                       # continuous
        rng.poisson(1.5, n).astype(float),             # few distinct values
        np.where(rng.random(n) < 0.3, NAN, rng.exponential(1.0, n)),  # with nulls
    ])
    pred = rng.random(n) * 0.1
    profile = build_profile("v", x, ["f0", "f1", "f2"], pred, bins=10)
    for j, name in enumerate(["f0", "f1", "f2"]):
        col = x[:, j].tolist()
        prof = profile.features[name]
        edges = _oracle_edges(col, 10)
        assert prof.edges == pytest.approx(tuple(edges), rel=1e-12, abs=1e-12)
        assert list(prof.counts) == _oracle_counts(col, list(prof.edges))
        # the histogram of the training column reproduces the stored counts
        assert prof.histogram(x[:, j]).tolist() == list(prof.counts)
        assert sum(prof.counts) == n
    assert len(profile.features["f1"].edges) < 9  # duplicates removed: fewer bins
    assert list(profile.prediction.counts) == _oracle_counts(pred.tolist(),
                                                             list(profile.prediction.edges))


def test_top_categories_and_other() -> None:
    # 52 categories: c00 seen 100 times, c01 99 times, ... c51 49 times; c50 and c51
    # (the two least frequent) go to OTHER; plus 3 nulls
    values: list[str | None] = []
    for i in range(52):
        values += [f"c{i:02d}"] * (100 - i)
    values += [None] * 3
    prof = build_profile("v", np.zeros((len(values), 0)), [], np.zeros(len(values)),
                         {"publisher_id": values}).context["publisher_id"]
    keys = list(prof.counts)
    assert len(keys) == MAX_CATEGORIES + 2
    assert keys[:3] == ["c00", "c01", "c02"] and keys[-2:] == [OTHER, NULL]
    assert prof.counts["c49"] == 51 and "c50" not in prof.counts
    assert prof.counts[OTHER] == 50 + 49 and prof.counts[NULL] == 3
    assert prof.histogram(["c51", "c00", "zz", None]) == {
        **dict.fromkeys(keys, 0), "c00": 1, OTHER: 2, NULL: 1}


def test_ties_between_categories_break_by_name() -> None:
    values = ["b", "a", "c", "a", "b", "c"]
    prof = build_profile("v", np.zeros((6, 0)), [], np.zeros(6), {"x": values}).context["x"]
    assert list(prof.counts) == ["a", "b", "c", OTHER, NULL]


def test_round_trip_and_file(tmp_path: Path) -> None:
    p = _tiny()
    assert ReferenceProfile.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    folder = tmp_path / "2024-05-01-13"
    folder.mkdir()
    save_profile(p, folder)
    assert (folder / PROFILE_FILE).is_file()
    assert [f.name for f in folder.iterdir()] == [PROFILE_FILE]  # no temporary left
    assert load_profile(tmp_path, "2024-05-01-13") == p
    assert load_profile(str(tmp_path), "2024-05-01-13") == p
    # deterministic: the same rows give the same bytes
    save_profile(_tiny(), tmp_path)
    assert (tmp_path / PROFILE_FILE).read_bytes() == (folder / PROFILE_FILE).read_bytes()


def test_absent_profile_is_none(tmp_path: Path) -> None:
    (tmp_path / "2024-05-01-13").mkdir()
    assert load_profile(tmp_path, "2024-05-01-13") is None
    assert load_profile(tmp_path, "2099-01-01-00") is None


@pytest.mark.parametrize(("text", "why"), [
    ("{not json", "is not JSON"),
    ('{"format": 1, "version": "v"}', "not a reference profile"),
    ('[1, 2]', "not a reference profile"),
    ('{"format": 9}', "format 9"),
])
def test_unreadable_profile_names_the_path(tmp_path: Path, text: str, why: str) -> None:
    folder = tmp_path / "v"
    folder.mkdir()
    (folder / PROFILE_FILE).write_text(text)
    with pytest.raises(InputError, match=why) as err:
        load_profile(tmp_path, "v")
    assert str(folder / PROFILE_FILE) in str(err.value)


def test_bad_counts_in_a_file(tmp_path: Path) -> None:
    d = _tiny().to_dict()
    d["features"][0]["counts"] = [3, 2, 2, 3]  # one short
    (tmp_path / "2024-05-01-13").mkdir()
    (tmp_path / "2024-05-01-13" / PROFILE_FILE).write_text(json.dumps(d))
    with pytest.raises(InputError, match="4 counts for 3 edges"):
        load_profile(tmp_path, "2024-05-01-13")


def test_a_profile_of_another_version(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    save_profile(_tiny(), tmp_path / "other")  # the profile of 2024-05-01-13, misplaced
    with pytest.raises(InputError, match="'2024-05-01-13', not 'other'"):
        load_profile(tmp_path, "other")


def test_unreadable_file_is_input_error(tmp_path: Path) -> None:
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / PROFILE_FILE).mkdir()  # a folder where the file should be
    with pytest.raises(InputError, match="cannot read"):
        load_profile(tmp_path, "v")


def test_save_into_a_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="cannot write"):
        save_profile(_tiny(), tmp_path / "nope")


@pytest.mark.parametrize(("kwargs", "why"), [
    ({"x": np.zeros((3, 2)), "features": ["a"]}, "do not match"),
    ({"x": np.zeros((3, 2)), "features": ["a", "a"]}, "do not match"),
    ({"x": np.zeros((0, 1)), "predictions": np.zeros(0)}, "no training rows"),
    ({"predictions": np.zeros(2)}, "2 predictions for 3"),
    ({"context": {"country": ["US"]}}, "'country' has 1 values"),
    ({"bins": 0}, "bins 0"),
])
def test_bad_build_input(kwargs: dict, why: str) -> None:
    args = {"x": np.zeros((3, 1)), "features": ["a"], "predictions": np.zeros(3),
            "context": None, **kwargs}
    with pytest.raises(InputError, match=why):
        build_profile("v", args["x"], args["features"], args["predictions"],
                      args["context"], bins=kwargs.get("bins", 10))


def test_profile_validates_its_shape() -> None:
    with pytest.raises(InputError, match="strictly ascending"):
        NumericProfile("a", (1.0, 1.0), (0, 0, 0, 0))
    with pytest.raises(InputError, match="2 counts for 1 edges"):
        NumericProfile("a", (1.0,), (0, 0))
    with pytest.raises(InputError, match="negative"):
        CategoricalProfile("c", {"x": -1})
    assert math.isnan(NumericProfile("a", (), (0, 0)).null_share)
