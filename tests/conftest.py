"""Shared pytest configuration."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Register markers so that `-m` selections and strict runs know them."""
    config.addinivalue_line(
        "markers", "network: needs the package registries (PyPI, Debian) to run"
    )
