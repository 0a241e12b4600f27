import pytest

from control_helpers import Harness
from tsnet.control.server import ControlServer, ServerConfig
from tsnet.control.store import Store


@pytest.fixture
async def control(nursery, tmp_path):
    store = Store.open(tmp_path / "state")
    server = ControlServer(store, ServerConfig(keepalive_interval=55.0, ephemeral_timeout=3600))
    port = await nursery.start(server.serve, "127.0.0.1", 0)
    yield Harness(server, port, nursery)
    store.close()
