"""Fixtures for end-to-end tests in the namespace lab.

``make_lab(relays, clients)`` builds a lab with a prefix no other test (or
concurrent run) uses, and tears every lab it made down at teardown, also when
the test failed. The labs' logs are copied to the test's ``tmp_path/lab-logs``
first, since ``down`` removes the state directory.

Tests marked ``e2e`` are skipped (with the reason) where the lab cannot run;
``requires_lab`` is the same skip as a marker, for modules that want it explicit.
"""

from __future__ import annotations

import itertools
import os
import shutil
from typing import TYPE_CHECKING, Any

import pytest

from meshvpn.lab import Lab

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

LAB_TOOLS = ("ip", "nft", "wireguard-go", "tcpdump")


def lab_unavailable() -> str | None:
    """Why the lab cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (creates network namespaces)"
    missing = [t for t in LAB_TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {', '.join(missing)} on PATH"
    return None


_UNAVAILABLE = lab_unavailable()
requires_lab = pytest.mark.skipif(
    _UNAVAILABLE is not None, reason=f"namespace lab unavailable: {_UNAVAILABLE}"
)

_labs_made = itertools.count(1)


def unique_prefix(letter: str = "t") -> str:
    """A lab prefix no other test in this run, nor a concurrent run, uses.

    The pid part has a fixed width, so ("t27", lab 35) and ("t273", lab 5)
    cannot both come out as "t2735".
    """
    return f"{letter}{os.getpid() % 100_000:05d}{next(_labs_made)}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("e2e") is not None:
            item.add_marker(requires_lab)


@pytest.fixture
def lab_state_root(tmp_path: Path) -> Path:
    return tmp_path / "lab-state"


@pytest.fixture
def new_prefix() -> Callable[[], str]:
    """For tests that drive ``Lab`` by hand (and must tear it down themselves)."""
    if _UNAVAILABLE is not None:
        pytest.skip(f"namespace lab unavailable: {_UNAVAILABLE}")
    return unique_prefix


@pytest.fixture
def make_lab(tmp_path: Path, lab_state_root: Path) -> Iterator[Callable[..., Lab]]:
    if _UNAVAILABLE is not None:
        pytest.skip(f"namespace lab unavailable: {_UNAVAILABLE}")
    labs: list[Lab] = []

    def make(relays: int, clients: int, **options: Any) -> Lab:
        lab = Lab(unique_prefix(), lab_state_root)
        # A failed up() has already torn down what it made; one refused because
        # the lab exists must not tear that lab down. So register only on success.
        lab.up(relays, clients, **options)
        labs.append(lab)
        return lab

    yield make

    failures: list[Exception] = []
    for lab in reversed(labs):
        if lab.state_dir.is_dir():
            for log in lab.state_dir.rglob("*.log"):
                dest = tmp_path / "lab-logs" / lab.prefix / log.relative_to(lab.state_dir)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(log, dest)
        try:
            lab.down()
        except Exception as e:  # noqa: BLE001 - tear every lab down, then report
            failures.append(e)
    if failures:
        raise failures[0]
