"""What the wheel installs: the product's packages under the names the README gives,
the generated gRPC code and the schemas, and nothing of the source tree's own tools."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: the README's "Layout" section names exactly these
TOP_LEVEL = {"headrace", "feature_defs", "streams", "offline", "serving"}


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    # build from a copy: an in-tree build would leave build/ and *.egg-info behind
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", *TOP_LEVEL, "bench", "tests"):
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out), str(src)], check=True)
    (wheel,) = out.glob("headrace-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return set(zf.namelist())


def test_wheel_installs_exactly_the_product_packages(wheel_names: set[str]) -> None:
    tops = {n.split("/")[0] for n in wheel_names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == TOP_LEVEL


def test_wheel_carries_generated_code_and_schemas(wheel_names: set[str]) -> None:
    for name in ("headrace/api/v1/features_pb2.py", "headrace/api/v1/scoring_pb2_grpc.py",
                 "headrace/api/v1/features.proto", "streams/schemas/impression.avsc",
                 "streams/schemas/click.avsc", "headrace/core/settings.py",
                 "headrace/model/artifact.py", "headrace/core/online_store.py",
                 "streams/__init__.py"):
        assert name in wheel_names, name


def test_wheel_leaves_out_benchmarks_and_tests(wheel_names: set[str]) -> None:
    assert not [n for n in wheel_names if n.startswith(("bench/", "tests/", "proto/"))]
