"""The asyncio client against one in-process node: the same calls, awaited, many in flight."""

from __future__ import annotations

import asyncio

import pytest

import kvstore
import kvstore.aio
from test_node import RunningNode


@pytest.fixture
def node(tmp_path):
    n = RunningNode(str(tmp_path / "d"), shards=2)
    yield n
    n.stop()


def test_async_calls_with_many_in_flight(node):
    async def main():
        async with await kvstore.aio.connect(node.address, timeout=5) as db:
            await asyncio.gather(*(db.put(b"k%03d" % i, b"v%d" % i) for i in range(200)))
            values = await asyncio.gather(*(db.get(b"k%03d" % i) for i in range(200)))
            assert values == [b"v%d" % i for i in range(200)]
            assert await db.cas(b"k000", b"v0", b"x") is True
            assert await db.delete(b"k001") is True and await db.delete(b"k001") is False
            assert len(await db.scan(b"k")) == 199
            assert (await db.scan(b"k", limit=2)) == [(b"k000", b"x"), (b"k002", b"v2")]
            st = await db.status()
            assert len(st["shards"]) == 2

            async def bump(txn):
                n = int(await txn.get(b"counter") or 0)
                await txn.put(b"counter", str(n + 1))
                return n + 1

            results = await asyncio.gather(*(db.run_transaction(bump, retries=50) for _ in range(10)))
            assert sorted(results) == list(range(1, 11))
            assert await db.get(b"counter") == b"10"
            with pytest.raises(kvstore.InvalidArgument):
                await db.put(b"", b"x")

    asyncio.run(main())


def test_async_connect_to_nothing_is_unavailable():
    async def main():
        with pytest.raises(kvstore.Unavailable):
            await kvstore.aio.connect("tcp://127.0.0.1:1", timeout=0.3)

    asyncio.run(main())


def test_async_transfers_across_shards_keep_the_total_and_audits_see_it(node):
    from kvstore.sharding import shard_of
    accounts = ([k for k in (b"acct%d" % i for i in range(99)) if shard_of(k, 2) == 0][:3]
                + [k for k in (b"acct%d" % i for i in range(99)) if shard_of(k, 2) == 1][:3])

    async def main():
        async with await kvstore.aio.connect(node.address, timeout=10) as db:
            for a in accounts:
                await db.put(a, b"100")

            def transfer(i):
                a, b = accounts[i % 6], accounts[(i * 5 + 1) % 6]

                async def move(txn):
                    x, y = int(await txn.get(a)), int(await txn.get(b))
                    await txn.put(a, b"%d" % (x - 1))
                    await txn.put(b, b"%d" % (y + 1))
                return move

            async def audit(txn):
                return sum([int(await txn.get(a)) for a in accounts])

            moves = [db.run_transaction(transfer(i), retries=100) for i in range(40)]
            audits = [db.run_transaction(audit, retries=100) for _ in range(10)]
            results = await asyncio.gather(*moves, *audits)
            assert results[40:] == [600] * 10
            assert sum([int(await db.get(a)) for a in accounts]) == 600

    asyncio.run(main())
