"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import npu_double  # noqa: E402  (import as top-level `npu_double`, never `tests.npu_double`)


@pytest.fixture
def torch_npu_double(monkeypatch: pytest.MonkeyPatch) -> Iterator[npu_double.TorchNpuDouble]:
    """A fresh strict ``torch_npu`` double installed as ``sys.modules['torch_npu']``.

    Also patches ``ProcessGroup._get_backend`` for device "npu" (see tests/npu_double.py);
    everything is undone after the test. In spawned workers use
    ``npu_double.install_double()`` instead.
    """
    double = npu_double.TorchNpuDouble()
    monkeypatch.setitem(sys.modules, "torch_npu", double)
    monkeypatch.setitem(sys.modules, "torch_npu.npu", double.npu)
    npu_double.activate(double)
    try:
        yield double
    finally:
        npu_double.deactivate()


# Hypothesis: derandomized in CI (reproducible), a fixed example budget everywhere.
try:
    import os

    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci",
        derandomize=True,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.register_profile(
        "dev",
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    settings.load_profile("ci" if os.environ.get("CI") else "dev")
except ImportError:  # hypothesis is a test extra
    pass


def pytest_sessionfinish(session, exitstatus):
    """Shut down the spawned rank pools so the run exits promptly."""
    from mp_harness import shutdown_pools

    shutdown_pools()
