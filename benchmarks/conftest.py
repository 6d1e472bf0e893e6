"""Collects the ``bench_*.py`` files of this folder for ``pytest benchmarks --benchmark-only``.

They are named ``bench_*.py`` so that they never collide with the tests; the default ``pytest``
run (``testpaths = ["tests"]``) never sees them.
"""

import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
