"""The WebSocket adapter against a server written with a different library.

The venue is the asyncio ``websockets`` package, run in a subprocess: it shares no code
with trio-websocket/wsproto, so these tests catch anything the adapter only gets right
against servers built on the same stack. It prints its port, then serves:

- an auth message ``{"op":"auth","key":...}``: a text heartbeat ``{"op":"ping"}`` then
  ``{"op":"auth","ok":true}`` for the good key, ``{"op":"auth","ok":false,"error":"invalid
  api key"}`` otherwise; on the path ``/close-on-bad-key`` a bad key is answered with
  close code 4001 instead;
- ``{"op":"subscribe","channel":C,"count":N}``: ``{"op":"subscribed"}``, a text heartbeat
  ``{"op":"ping"}``, then N data messages, an error ``{"op":"error","error":"slow down"}``
  and one binary message;
- pings are answered by the library itself.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
import trio

from daemon.adapters.base import AuthRejected, Batch, ConnectionLost
from daemon.adapters.websocket import WebSocketAdapter

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("websockets") is None,
    reason="the independent venue needs the 'websockets' package (a dev dependency)",
)

GOOD_KEY = "good-key-1234"
VENUE = r"""
import asyncio, json, sys
from websockets.asyncio.server import serve

GOOD_KEY = sys.argv[1]

async def handler(ws):
    async for raw in ws:
        msg = json.loads(raw)
        if msg.get("op") == "auth":
            if msg.get("key") == GOOD_KEY:
                await ws.send(json.dumps({"op": "ping"}))
                await ws.send(json.dumps({"op": "auth", "ok": True}))
            elif ws.request.path == "/close-on-bad-key":
                await ws.close(code=4001, reason="invalid api key")
                return
            else:
                await ws.send(json.dumps({"op": "auth", "ok": False, "error": "invalid api key"}))
        elif msg.get("op") == "subscribe":
            await ws.send(json.dumps({"op": "subscribed", "channel": msg["channel"]}))
            await ws.send(json.dumps({"op": "ping"}))
            for i in range(msg["count"]):
                await ws.send(json.dumps({"channel": msg["channel"], "seq": i}))
            await ws.send(json.dumps({"op": "error", "error": "slow down"}))
            await ws.send(bytes([0, 1, 2]))
        elif msg.get("op") == "bye":
            await ws.close(code=1000)
            return

async def main():
    async with serve(handler, "127.0.0.1", 0) as server:
        print(server.sockets[0].getsockname()[1], flush=True)
        await asyncio.get_running_loop().create_future()

asyncio.run(main())
"""


@pytest.fixture
async def venue_port() -> AsyncIterator[int]:
    """Starts the independent venue; yields its port; kills it afterwards."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-c", VENUE, GOOD_KEY], stdout=subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await process.stdout.receive_some(64)
                if not chunk:
                    pytest.fail(f"the websockets venue exited early (status {process.poll()})")
                line += chunk
        yield int(line)
    finally:
        process.kill()
        with trio.move_on_after(5):
            await process.wait()
        if process.stdout is not None:
            await process.stdout.aclose()


def adapter(key: str, count: int = 0) -> WebSocketAdapter:
    return WebSocketAdapter(
        auth_message=json.dumps({"op": "auth", "key": key}),
        auth_expect={"ok": True},
        subscribe=(json.dumps({"op": "subscribe", "channel": "ticks", "count": count}),),
        heartbeat_interval=5.0,
    )


async def test_connect_auth_subscribe_receive_and_heartbeat(venue_port: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            link = await adapter(GOOD_KEY, count=200).connect(
                nursery, f"ws://127.0.0.1:{venue_port}/feed"
            )
            await link.authenticate()
            await link.subscribe()
            batches: list[Batch] = []
            # 2 heartbeats, the reply to subscribe, 200 data, the error, the binary message.
            while sum(map(len, batches)) < 205:
                batches.append(await link.receive_batch())
            for _ in range(3):
                await link.heartbeat()
            await link.aclose()

    error = '{"op": "error", "error": "slow down"}'
    # The heartbeat that came before the auth reply was kept for the first batch.
    assert batches[0] == Batch([], True, heartbeats=1)
    # The binary message ends the stream in a batch of its own, after text batches only.
    assert batches[-1] == Batch([b"\x00\x01\x02"], False)
    assert all(batch.text for batch in batches[:-1])
    messages = [m for batch in batches for m in batch.messages]
    assert messages[0] == b'{"op": "subscribed", "channel": "ticks"}'
    assert [json.loads(m)["seq"] for m in messages[1:201]] == list(range(200))
    assert messages[201:] == [error.encode(), b"\x00\x01\x02"]
    assert sum(batch.heartbeats for batch in batches) == 2
    assert [e for batch in batches for e in batch.errors] == [error]
    assert sum(map(len, batches)) == 205


async def test_auth_rejected_by_reply(venue_port: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            link = await adapter("wrong").connect(nursery, f"ws://127.0.0.1:{venue_port}/feed")
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
    assert caught.value.reason == "auth rejected: invalid api key"


async def test_auth_rejected_by_close(venue_port: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            link = await adapter("wrong").connect(
                nursery, f"ws://127.0.0.1:{venue_port}/close-on-bad-key"
            )
            with pytest.raises(AuthRejected) as caught:
                await link.authenticate()
            await link.aclose()
    assert caught.value.reason == "venue closed the connection (code 4001: invalid api key)"


async def test_venue_closes_normally(venue_port: int) -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            link = await WebSocketAdapter(subscribe=('{"op":"bye"}',)).connect(
                nursery, f"ws://127.0.0.1:{venue_port}/"
            )
            await link.subscribe()
            with pytest.raises(ConnectionLost) as caught:
                await link.receive_batch()
            await link.aclose()
    assert caught.value.reason == "venue closed the connection (code 1000)"
