"""Shared test fixtures: a dirty-reactor check for every test."""

from __future__ import annotations

import pytest_twisted
from twisted.internet import reactor, task


@pytest_twisted.async_yield_fixture(autouse=True)
async def _clean_reactor():
    """Fail a test that leaves DelayedCalls behind (pytest-twisted does not check).

    Connections closed at the end of a test finish closing in the next reactor turns, so
    the check runs after letting the reactor spin briefly.
    """
    yield
    for _ in range(5):
        await task.deferLater(reactor, 0.02, lambda: None)
    leftover = [c for c in reactor.getDelayedCalls()
                if c.active() and "threadpool" not in repr(c.func).lower()]
    described = [f"{c.func!r}{c.args!r}" for c in leftover]  # cancel() drops func/args
    for call in leftover:
        call.cancel()
    assert not leftover, f"test left delayed calls behind: {described}"
