"""Shared pytest fixtures."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).resolve().parent)
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)

import npu_conformance  # noqa: E402
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


@pytest.fixture(params=npu_conformance.IMPLS)
def npu_impl(request: pytest.FixtureRequest) -> str:
    """What the Ascend backend runs on: ``"double"`` (the strict double) or a torch_npu release
    of the conformance matrix (its real schemas and meta functions, tests/npu_conformance.py).

    A release is fetched on first use; the test is skipped only when the package index cannot
    be reached. Run bodies with ``npu_conformance.run_on(npu_impl, world_size, fn, ...)``.
    """
    impl: str = request.param
    if impl != "double":
        try:
            npu_conformance.ensure(impl)
        except npu_conformance.IndexUnavailable as e:
            pytest.skip(f"torch_npu {impl} conformance: {e}")
    return impl


def pytest_collection_modifyitems(session, config, items):
    """Run the tests on torch_npu releases last, grouped by release, so that each release's
    worker pool is spawned once (tests/npu_conformance.run_on keeps one release alive)."""
    order = {impl: i for i, impl in enumerate(npu_conformance.VERSIONS)}

    def release(item) -> int:
        callspec = getattr(item, "callspec", None)
        impl = callspec.params.get("npu_impl") if callspec is not None else None
        return order.get(impl, -1)

    keyed = [(release(it), i, it) for i, it in enumerate(items)]
    items[:] = [it for _, _, it in sorted(keyed, key=lambda t: (t[0], t[1]))]


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
