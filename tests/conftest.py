"""Suite-wide rules.

With ``MESHVPN_REQUIRE_E2E=1`` (set by ``./run test`` and so by CI) a skipped
end-to-end test is a failure, and a run in which no end-to-end test passed
fails too: a green run must mean the real network was exercised. Tests that
need hardware this machine lacks (``kernel_wg``) may still skip, honestly.
"""

from __future__ import annotations

import os
from collections.abc import Generator

import pytest
from hypothesis import settings

# Hypothesis' per-example deadline is a timing assertion, and timings belong
# in bench/: on a loaded two-core machine it fails correct code at random.
settings.register_profile("meshvpn", deadline=None)
settings.load_profile("meshvpn")

REQUIRE_E2E = os.environ.get("MESHVPN_REQUIRE_E2E") == "1"
_e2e_passed = 0


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    global _e2e_passed  # noqa: PLW0603
    report = yield
    is_e2e = item.get_closest_marker("e2e") is not None
    may_skip = item.get_closest_marker("kernel_wg") is not None
    if is_e2e and report.when == "call" and report.passed:
        _e2e_passed += 1
    if REQUIRE_E2E and is_e2e and not may_skip and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"end-to-end test skipped, but MESHVPN_REQUIRE_E2E=1: {reason}"
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    collected_e2e = any(item.get_closest_marker("e2e") for item in session.items)
    if REQUIRE_E2E and collected_e2e and _e2e_passed == 0 and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print("\nMESHVPN_REQUIRE_E2E=1 but no end-to-end test passed")
