"""Fixtures: a recorder per test, a server per test, and clients disconnected at the end."""

import pytest
import pytest_asyncio

from harness import Recorder, Server, capture_sdk_log


@pytest.fixture
def recorder(request):
    rec = Recorder(request.node.name)
    stop = capture_sdk_log(rec)
    yield rec
    stop()
    rec.save()
    print(f"frames and server output: {rec.path}")


@pytest_asyncio.fixture
async def server(recorder):
    srv = Server(recorder)
    try:
        await srv.wait_healthy()
        yield srv
    finally:
        srv.cleanup()


@pytest_asyncio.fixture
async def clients():
    """Append every Client made in a test here: each is disconnected afterwards."""
    made = []
    yield made
    for client in made:
        try:
            await client.disconnect()
        except Exception:  # noqa: BLE001 - already gone
            pass
