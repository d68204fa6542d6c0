"""AioChannels.prune: the channels to members no call or stream uses are closed and forgotten
(with their stubs); the next use opens one again."""

from __future__ import annotations

import asyncio

from pyetcd import etcdrpc

from discovery.registry.etcd_aio import AioChannels, Endpoint


def test_prune_closes_the_channels_not_kept() -> None:
    members = [Endpoint("127.0.0.1", port, secure=False) for port in (1, 2, 3)]

    async def run() -> None:
        channels = AioChannels()
        opened = [channels.get(m) for m in members]
        stubs = [channels.stub(etcdrpc.KVStub, m) for m in members]
        await channels.prune({members[1].netloc})
        assert channels.get(members[1]) is opened[1]  # kept, with its stub
        assert channels.stub(etcdrpc.KVStub, members[1]) is stubs[1]
        assert [await _closed(opened[i]) for i in (0, 2)] == [True, True]
        again = channels.get(members[0])  # used again: a new channel
        assert again is not opened[0]
        assert channels.stub(etcdrpc.KVStub, members[0]) is not stubs[0]
        await channels.prune(set())
        assert await _closed(again) and await _closed(opened[1])

    asyncio.run(run())
    for m in members:
        m.close()


async def _closed(channel: object) -> bool:
    """A closed grpc.aio channel refuses a new call."""
    try:
        etcdrpc.KVStub(channel).Range(etcdrpc.RangeRequest(key=b"k"))
    except Exception as exc:  # grpc's UsageError: "Channel is closed."
        return "closed" in str(exc).lower()
    return False
