"""Shared test fixtures: a dirty-reactor check for every test."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _clean_reactor():
    """Fail a test that leaves DelayedCalls behind (pytest-twisted does not check)."""
    yield
    from twisted.internet import reactor

    leftover = [c for c in reactor.getDelayedCalls()
                if c.active() and "threadpool" not in repr(c.func).lower()
                and "_shutdown" not in repr(c.func)]
    for call in leftover:
        call.cancel()
    assert not leftover, f"test left delayed calls behind: {leftover}"
