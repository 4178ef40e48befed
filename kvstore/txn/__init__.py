"""Two-phase commit across shards, as pure state machines over the shards' logs."""

from kvstore.txn.coordinator import Coordinator, Recovery
from kvstore.txn.participant import LOCK_ONLY, DecisionTable, ParticipantState, Store, TxnBugs
from kvstore.txn.records import ABORT, COMMIT, OUTCOMES, TXN_ID_BYTES, TxnDecision, TxnFence, TxnForget, TxnPrepare, TxnResolve, decode, encode

__all__ = ["Coordinator", "Recovery", "TxnFence", "TxnForget", "LOCK_ONLY", "ParticipantState", "DecisionTable", "Store", "TxnBugs", "TxnPrepare",
           "TxnDecision", "TxnResolve", "COMMIT", "ABORT", "OUTCOMES", "TXN_ID_BYTES", "encode", "decode"]
