"""The layering rules: Ray only in the Ray runner, fsspec only in pipeline.io, jobs never imported."""

import re
from pathlib import Path

PIPELINE = Path(__file__).parents[2] / "pipeline"


def _importers(module: str) -> set[str]:
    pattern = re.compile(rf"^\s*(import {module}\b|from {module}\b)", re.M)
    return {str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py") if pattern.search(p.read_text())}


def test_ray_is_imported_only_by_the_ray_runner():
    assert _importers("ray") == {"runners/ray_runner.py"}


def test_fsspec_is_imported_only_by_the_io_package():
    assert all(path.startswith("io/") for path in _importers("fsspec"))


def test_the_library_never_imports_jobs():
    assert _importers("jobs") == set()
