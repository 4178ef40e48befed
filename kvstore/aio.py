"""``await kvstore.aio.connect(addresses, timeout=...)``: the asyncio client, by its public name.

The code lives in ``kvstore.client.aio`` beside the synchronous client whose
engine it shares; this module is the public name (docs/api.md).
"""

from kvstore.client.aio import AsyncKV, AsyncLease, AsyncTxn, connect

__all__ = ["connect", "AsyncKV", "AsyncTxn", "AsyncLease"]
