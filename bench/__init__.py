"""Benchmarks run by ``headrace bench NAME``: each module exposes ``run(**params) -> dict``
with its figures and a reference measured in the same run on the same machine."""

__all__: list[str] = []
