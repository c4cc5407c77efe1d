"""The model artifact: versioned folders and the champion pointer, shared by training
and serving (training writes them, the server reads them).

Layout of ``MODELS_DIR`` (a local folder; the server reads it)::

    MODELS_DIR/
      CHAMPION                  the champion's version + newline (replaced atomically)
      2024-05-01-13/            one folder per trained model, never modified afterwards
        model.txt  metadata.json  calibration.png  importance.png
        calibration.json        optional: the map applied to the booster's probability
        coldstart/model.txt  coldstart/metadata.json
      2024-05-01-13-2/          a second model trained in the same UTC hour

A version is the UTC hour of training (``YYYY-MM-DD-HH``, from an injected clock) with
``-2``, ``-3``, … appended when that name is taken. A folder is claimed with ``mkdir``
(atomic) and filled through a temporary sibling folder renamed onto the claim, so a
reader never sees a half-written version. Promotion gates live with training
(:mod:`offline.models`).

``calibration.json`` (:class:`CalibrationMap`, fitted by :mod:`offline.calibration`) maps
the booster's probability ``p`` to the shipped probability; training and serving apply it
through :meth:`CalibrationMap.apply` only, so they cannot drift. A version without the
file predicts the booster's probability unchanged.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from headrace.core.errors import InputError
from headrace.model.booster import lightgbm
from headrace.model.coldstart import ColdStartModel, load_coldstart

__all__ = [
    "CHAMPION_FILE",
    "CALIBRATION_FILE",
    "VERSION_FORMAT",
    "CalibrationKind",
    "CalibrationMap",
    "save_calibration",
    "load_calibration",
    "ModelLoadError",
    "LoadedModel",
    "version_key",
    "list_versions",
    "write_artifact",
    "champion_version",
    "set_champion",
    "registry_lock",
    "load_model",
    "load_champion",
]

CHAMPION_FILE = "CHAMPION"
CALIBRATION_FILE = "calibration.json"
VERSION_FORMAT = "%Y-%m-%d-%H"
_VERSION = re.compile(r"^(\d{4}-\d{2}-\d{2}-\d{2})(?:-(\d+))?$")


class ModelLoadError(InputError):
    """A model folder or the champion pointer is missing, incomplete or unreadable."""


def version_key(version: str) -> tuple[str, int]:
    """Sort key: hour, then suffix (``-2`` after the bare name, ``-10`` after ``-9``)."""
    m = _VERSION.match(version)
    if m is None:
        return (version, 0)
    return (m.group(1), int(m.group(2) or 1))


def list_versions(models_dir: Path) -> list[str]:
    """Complete versions (folders holding ``metadata.json``), oldest first."""
    if not models_dir.is_dir():
        return []
    names = [p.name for p in models_dir.iterdir()
             if _VERSION.match(p.name) and (p / "metadata.json").is_file()]
    return sorted(names, key=version_key)


def write_artifact(models_dir: Path, now: datetime, fill: Callable[[Path, str], None]
                   ) -> tuple[str, Path]:
    """Claim the next free version for ``now`` and fill its folder atomically.

    ``fill(folder, version)`` writes the files into a temporary folder that is then
    renamed onto the claimed (empty) version folder. On failure nothing is left behind
    and the version is free again.

    Raises:
        ValueError: ``now`` has no time zone.
        InputError: ``models_dir`` cannot be created or written.
    """
    if now.tzinfo is None:
        raise ValueError("the training clock must return an aware datetime")
    base = now.astimezone(UTC).strftime(VERSION_FORMAT)
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        n = 1
        while True:
            version = base if n == 1 else f"{base}-{n}"
            final = models_dir / version
            try:
                final.mkdir()
                break
            except FileExistsError:
                n += 1
    except OSError as exc:
        raise InputError(f"cannot write models to {models_dir}: {exc.strerror or exc}") from exc
    tmp = models_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        fill(tmp, version)
        os.replace(tmp, final)  # onto the empty claim: atomic on POSIX
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(OSError):
            final.rmdir()
        raise
    return version, final


def champion_version(models_dir: Path | str) -> str | None:
    """The champion's version, or None when there is none. One small file read: cheap
    enough to poll for hot reload."""
    try:
        text = (Path(models_dir) / CHAMPION_FILE).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ModelLoadError(f"cannot read {Path(models_dir) / CHAMPION_FILE}: {exc}") from exc
    return text or None


def set_champion(models_dir: Path, version: str) -> None:
    """Point ``CHAMPION`` at ``version`` (temp file, fsync, rename: readers see the old
    or the new version, never a torn file)."""
    if not (models_dir / version / "metadata.json").is_file():
        raise ModelLoadError(f"cannot promote {version}: {models_dir / version} is incomplete")
    tmp = models_dir / f".{CHAMPION_FILE}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, models_dir / CHAMPION_FILE)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # make the rename durable; not all systems allow it
        fd = os.open(models_dir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def registry_lock(models_dir: Path) -> Iterator[None]:
    """Serialize "read champion, decide, write, promote" between training runs."""
    import fcntl

    models_dir.mkdir(parents=True, exist_ok=True)
    with open(models_dir / ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class CalibrationKind(StrEnum):
    """How :class:`CalibrationMap` turns a probability into a calibrated one."""

    PLATT = "platt"
    ISOTONIC = "isotonic"


#: probabilities are clipped to ``[eps, 1 - eps]`` before the logit of Platt scaling
_LOGIT_EPS = 1e-15


@dataclass(frozen=True)
class CalibrationMap:
    """A monotone map from the booster's click probability to the shipped one.

    * ``platt``: ``sigmoid(a * logit(p) + b)``, ``p`` clipped to ``[1e-15, 1 - 1e-15]``
      first (``a`` > 0 keeps the order of the predictions).
    * ``isotonic``: linear interpolation through the points ``(x[i], y[i])`` (``x``
      non-decreasing, ``y`` non-decreasing, both in ``[0, 1]``), constant ``y[0]`` below
      ``x[0]`` and ``y[-1]`` above ``x[-1]`` — exactly :func:`numpy.interp`.
    """

    kind: CalibrationKind
    a: float = 1.0
    b: float = 0.0
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", CalibrationKind(self.kind))
        if self.kind is CalibrationKind.ISOTONIC:
            xs, ys = np.asarray(self.x, dtype=np.float64), np.asarray(self.y, dtype=np.float64)
            if xs.size == 0 or xs.shape != ys.shape:
                raise ValueError("an isotonic map needs as many x as y points, at least one")
            if (np.diff(xs) < 0).any() or (np.diff(ys) < 0).any():
                raise ValueError("an isotonic map's x and y points must be non-decreasing")
            if not (((ys >= 0) & (ys <= 1)).all() and np.isfinite(xs).all()):
                raise ValueError("an isotonic map's y points must be probabilities")
        elif not (math.isfinite(self.a) and math.isfinite(self.b)):
            raise ValueError("a Platt map needs finite a and b")

    def apply(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities of booster probabilities ``p`` (any shape; one
        vectorised expression)."""
        p = np.asarray(p, dtype=np.float64)
        if self.kind is CalibrationKind.ISOTONIC:
            return np.interp(p, self.x, self.y)
        q = np.clip(p, _LOGIT_EPS, 1.0 - _LOGIT_EPS)
        return 1.0 / (1.0 + np.exp(-(self.a * np.log(q / (1.0 - q)) + self.b)))

    def to_json(self) -> dict[str, Any]:
        """The ``calibration.json`` object (``kind`` plus its parameters)."""
        if self.kind is CalibrationKind.ISOTONIC:
            return {"kind": self.kind.value, "x": list(self.x), "y": list(self.y),
                    "interpolation": "linear between points, constant outside (numpy.interp)"}
        return {"kind": self.kind.value, "a": self.a, "b": self.b,
                "formula": "sigmoid(a * logit(clip(p, 1e-15, 1 - 1e-15)) + b)"}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CalibrationMap:
        """Parse :meth:`to_json` output. Raises ValueError/KeyError/TypeError when malformed."""
        kind = CalibrationKind(d["kind"])
        if kind is CalibrationKind.ISOTONIC:
            return cls(kind, x=tuple(map(float, d["x"])), y=tuple(map(float, d["y"])))
        return cls(kind, a=float(d["a"]), b=float(d["b"]))


def save_calibration(cal: CalibrationMap, folder: Path) -> None:
    """Write ``folder/calibration.json``."""
    (folder / CALIBRATION_FILE).write_text(json.dumps(cal.to_json(), indent=2) + "\n",
                                           encoding="utf-8")


def load_calibration(folder: Path) -> CalibrationMap | None:
    """The map of ``folder/calibration.json``, or None when the file does not exist.

    Raises:
        ModelLoadError: the file is unreadable or malformed.
    """
    path = folder / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        return CalibrationMap.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"cannot read the calibration map {path}: {exc}") from exc


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: ``features`` in the booster's column order;
    ``calibration``: the map applied to the booster's probability (None: none)."""

    version: str
    booster: Any
    features: tuple[str, ...]
    metadata: Mapping[str, Any]
    coldstart: ColdStartModel | None = None
    calibration: CalibrationMap | None = None

    def matrix(self, rows: Sequence[Mapping[str, float | int | None]]) -> np.ndarray:
        """Feature rows (name → value; absent or None → NaN) as a float64 matrix."""
        x = np.full((len(rows), len(self.features)), np.nan)
        for i, row in enumerate(rows):
            for j, name in enumerate(self.features):
                v = row.get(name)
                if v is not None:
                    x[i, j] = v
        return x

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Click probabilities for a ``(rows, len(features))`` float matrix (calibrated
        when the version has a map)."""
        p = np.asarray(self.booster.predict(x), dtype=np.float64)
        return p if self.calibration is None else self.calibration.apply(p)


def load_model(models_dir: Path | str, version: str) -> LoadedModel:
    """Load one version (main booster, metadata and, when present, the calibration map
    and the cold-start model).

    Raises:
        ModelLoadError: missing or unreadable files, or a booster whose feature names
            differ from the stored list.
    """
    lgb = lightgbm()
    folder = Path(models_dir) / version
    try:
        metadata = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        booster = lgb.Booster(model_file=str(folder / "model.txt"))
        features = tuple(metadata["features"])
    except (OSError, ValueError, KeyError, lgb.basic.LightGBMError) as exc:
        raise ModelLoadError(f"cannot load model {version} from {folder}: {exc}") from exc
    if tuple(booster.feature_name()) != features:
        raise ModelLoadError(f"model {version}: model.txt features differ from metadata.json")
    calibration = load_calibration(folder)
    coldstart = None
    if (folder / "coldstart" / "model.txt").is_file():
        try:
            coldstart = load_coldstart(folder / "coldstart")
        except InputError as exc:
            raise ModelLoadError(str(exc)) from exc
    return LoadedModel(version, booster, features, metadata, coldstart, calibration)


def load_champion(models_dir: Path | str) -> LoadedModel | None:
    """The champion model, or None when ``CHAMPION`` does not exist yet.

    Raises:
        ModelLoadError: the pointer names a version that is missing or unreadable.
    """
    version = champion_version(models_dir)
    return None if version is None else load_model(models_dir, version)
