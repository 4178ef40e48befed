"""Linearizability checker for key-value histories produced by the simulator.

The model is a map of registers: each key holds ``bytes`` or ``None`` (absent)
and supports get / put / delete / compare-and-set.  A KV history is
linearizable iff every key's sub-history is (P-compositionality), so the
history is split per key and each key is checked on its own.

Per key the search is Wing & Gong's, with Lowe's improvements:

* **just-in-time linearization** -- the history is replayed event by event;
  an operation is only linearized when it has to be, i.e. when the response
  of a not-yet-linearized operation is reached.  At that point the search
  branches over which of the currently open operations (invoked, not yet
  linearized) are linearized first, ending with the responding one;
* **memoization** -- a configuration is (event index, set of open operations
  already linearized, register state).  Everything that has responded before
  the event index is necessarily linearized, so that triple determines the
  rest of the search; a configuration already explored is never explored
  again.

Operations without a response (``ret is None``: crashed client, timeout) stay
open forever: they may be linearized at any point after their invocation, or
never, and their result is unknown.  They are treated as one-shot state
transition tokens, with sound reductions: a pending ``get`` is dropped; a
transition is only ever made with one canonical token (see ``_check_key``); a
pending op is never linearized where it changes nothing or right before an op
that overwrites it; and a configuration is skipped when one that spent a
subset of its tokens was already explored.

Times: an op A is ordered before op B only when ``A.ret < B.call`` strictly;
equal times count as overlapping (so ticks never produce a false failure).

If a key needs more than ``max_states`` explored configurations the checker
raises :class:`CheckerGaveUp` rather than passing the history silently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

__all__ = ["Operation", "CheckResult", "CheckerGaveUp", "check_history"]

_KINDS = ("get", "put", "delete", "cas")


@dataclass(frozen=True)
class Operation:
    client: int  # who issued it (a client has at most one op in flight)
    key: bytes
    kind: str  # "get" | "put" | "delete" | "cas"
    # get/delete: (); put: (value,); cas: (expected, new)
    # (expected None = must be absent, new None = delete)
    args: tuple
    call: int  # invocation time; call < ret
    # response time; None = no response: the op may or may not have taken
    # effect, at any time after call
    ret: int | None
    # get -> bytes | None; put -> None; delete -> bool; cas -> bool.
    # Ignored when ret is None.
    result: object = None


@dataclass
class CheckResult:
    ok: bool
    key: bytes | None  # the first key whose history is not linearizable
    explanation: str


class CheckerGaveUp(Exception):
    """The search exceeded ``max_states`` configurations for one key."""


# ---------------------------------------------------------------------------
# The register model

_GET, _PUT, _DELETE, _CAS = range(4)
_KIND_CODE = {"get": _GET, "put": _PUT, "delete": _DELETE, "cas": _CAS}
_NO_RESULT = object()  # marks "result unknown" (pending op)


def _validate(op: Operation) -> None:
    if op.kind not in _KIND_CODE:
        raise ValueError(f"unknown operation kind {op.kind!r} in {op!r}")
    want = {"get": 0, "delete": 0, "put": 1, "cas": 2}[op.kind]
    if len(op.args) != want:
        raise ValueError(f"{op.kind} takes {want} args, got {op.args!r} in {op!r}")
    if op.ret is not None and not op.call < op.ret:
        raise ValueError(f"operation returns before it is called: {op!r}")


def _norm(v):
    """bytearray / memoryview values compare like bytes but are unhashable."""
    return bytes(v) if isinstance(v, (bytearray, memoryview)) else v


def _step(code: int, args: tuple, result: object, state):
    """Apply one op to ``state``.  Returns (allowed, new_state).

    ``result is _NO_RESULT`` means the op is pending: any result is accepted.
    """
    if code == _GET:
        if result is _NO_RESULT:
            return True, state
        return result == state, state
    if code == _PUT:
        return True, args[0]
    if code == _DELETE:
        if result is _NO_RESULT:
            return True, None
        return bool(result) == (state is not None), None
    # cas
    expected, new = args
    swapped = state == expected
    if result is _NO_RESULT:
        # a failed pending cas is the same as never linearizing it
        return swapped, (new if swapped else state)
    if bool(result) != swapped:
        return False, state
    return True, (new if swapped else state)


# ---------------------------------------------------------------------------
# Explanation helpers


def _fmt_val(v) -> str:
    return "absent" if v is None else repr(v)


def _fmt_result(op: Operation) -> str:
    if op.kind == "get":
        return _fmt_val(op.result)
    if op.kind == "put":
        return "ok"
    return str(bool(op.result))


def _fmt_op(i: int, op: Operation) -> str:
    if op.kind == "get":
        what = "get()"
    elif op.kind == "put":
        what = f"put({_fmt_val(op.args[0])})"
    elif op.kind == "delete":
        what = "delete()"
    else:
        what = f"cas({_fmt_val(op.args[0])} -> {_fmt_val(op.args[1])})"
    if op.ret is None:
        res = "no response (pending)"
        span = f"[{op.call}, -)"
    else:
        span = f"[{op.call}, {op.ret}]"
        res = f"-> {_fmt_result(op)}"
    return f"  #{i:<4} client {op.client:<4} {span:<16} {what} {res}"


# ---------------------------------------------------------------------------
# Per-key search


def _check_key(key: bytes, ops: list, initial, max_states: int):
    """Check one key.  Returns None if linearizable, else an explanation."""
    # Number ops by invocation order (stable), which the explanation uses and
    # the symmetry reduction relies on (lower index = invoked no later).
    ops = sorted(ops, key=lambda o: o.call)
    n = len(ops)

    # Ops taking part in the search: pending gets can never matter.
    codes = []
    argss = []
    results = []
    pending = []
    for op in ops:
        codes.append(_KIND_CODE[op.kind])
        argss.append(tuple(_norm(a) for a in op.args))
        if op.ret is None:
            results.append(_NO_RESULT)
            pending.append(True)
        else:
            results.append(op.result)
            pending.append(False)

    # Events: (time, 0=call / 1=return, op index).  Calls sort before
    # returns at equal times, so equal times overlap.
    events = []
    for i, op in enumerate(ops):
        if op.ret is None and op.kind == "get":
            continue
        events.append((op.call, 0, i))
        if op.ret is not None:
            events.append((op.ret, 1, i))
    events.sort()
    n_ev = len(events)
    ev_ret = [kind == 1 for _, kind, _ in events]
    ev_op = [i for _, _, i in events]

    # open_before[e]: bitset of ops invoked and not yet responded before
    # event e.
    open_before = [0] * (n_ev + 1)
    cur = 0
    for e in range(n_ev):
        open_before[e] = cur
        if ev_ret[e]:
            cur &= ~(1 << ev_op[e])
        else:
            cur |= 1 << ev_op[e]
    open_before[n_ev] = cur

    # Pending ops are tokens: never required, usable once, at any time after
    # their call, with an unconstrained result.  A token only matters through
    # the state transition it makes, so they are grouped by transition:
    #   cas(e, n) pending:  e -> n only          (cas_tokens[e] -> [(n, mask)])
    #   put v / delete:     any -> v (v = None)  (blind_tokens -> [(v, mask)])
    # To make a transition s -> t the search uses one token only: a cas(s, t)
    # if one is available, else a put t / delete, and within a group the
    # earliest-invoked available one.  Exchange argument: tokens of a group
    # are interchangeable once invoked, and a put t can do whatever a
    # cas(s, t) can, so a linearization using the put where a cas(s, t) was
    # available can swap the two (or drop the put).
    pend_mask = 0
    cas_groups: dict = {}
    blind_groups: dict = {}
    for i in range(n):
        if not pending[i] or codes[i] == _GET:
            continue
        pend_mask |= 1 << i
        if codes[i] == _CAS:
            exp, new = argss[i]
            if exp != new:  # cas(x, x) never changes anything
                cas_groups[(exp, new)] = cas_groups.get((exp, new), 0) | (1 << i)
        else:
            v = argss[i][0] if codes[i] == _PUT else None
            blind_groups[v] = blind_groups.get(v, 0) | (1 << i)
    cas_tokens: dict = {}
    for (exp, new), mask in cas_groups.items():
        cas_tokens.setdefault(exp, []).append((new, mask))
    blind_tokens = list(blind_groups.items())
    done_mask = ~pend_mask

    def advance(e: int, lin: int):
        """Skip events that need no decision.  Returns (e, lin) at the next
        response of an unlinearized op, or (n_ev, lin) at the end."""
        while e < n_ev:
            if ev_ret[e]:
                bit = 1 << ev_op[e]
                if lin & bit:
                    lin &= ~bit  # responded: drop it from the open set
                else:
                    return e, lin
            e += 1
        return e, lin

    # DFS over branching configurations (e, lin, state, after_pend): ``e``
    # is the response event of an op not yet linearized (which must be
    # linearized now, possibly after other open ops); ``lin`` the open ops
    # already linearized; ``after_pend`` whether the last op linearized was
    # a pending one.  ``path`` is a linked list of the ops linearized so far
    # (for the explanation only).
    #
    # Two dominance prunings on top of plain memoization:
    # * a pending op linearized right before a put (or before a pending
    #   delete) is pointless -- its effect is overwritten and dropping it
    #   keeps it available -- so after a pending op those are not tried;
    # * a configuration that used a subset of the pending tokens another
    #   one used (same e, same completed ops linearized, same state, same
    #   flag) can do everything the other can.  The memo is keyed without
    #   the pending part and holds the pending parts explored; a
    #   configuration is skipped when an explored one used a subset.
    memo: dict = {}
    explored = 0
    e0, lin0 = advance(0, 0)
    stack = [(e0, lin0, initial, False, None)]
    best = None  # (event index, lin, state, path) of the most advanced dead end

    while stack:
        e, lin, state, after_pend, path = stack.pop()
        if e == n_ev:
            return None
        cfg = (e, lin & done_mask, state, after_pend)
        used = lin & pend_mask
        seen_used = memo.get(cfg)
        if seen_used is None:
            memo[cfg] = [used]
        else:
            for m in seen_used:
                if not (m & ~used):
                    break  # an explored configuration spent a subset
            else:
                # keep an antichain: masks that spent a superset of ``used``
                # are subsumed by it from now on
                memo[cfg] = [m for m in seen_used if used & ~m]
                memo[cfg].append(used)
                seen_used = None
            if seen_used is not None:
                continue
        explored += 1
        if explored > max_states:
            raise CheckerGaveUp(
                f"linearizability check of key {key!r} gave up after exploring "
                f"more than {max_states} configurations ({n} ops on this key); "
                f"the history is neither verified nor refuted -- raise "
                f"max_states or shorten the run"
            )
        target = ev_op[e]
        children = []
        open_ops = open_before[e] & ~lin

        # Pending tokens, at most one per reachable state.
        avail = open_ops & pend_mask
        if avail:
            reached = set()
            for new, mask in cas_tokens.get(state, ()):
                m = mask & avail
                if m:
                    low = m & -m
                    reached.add(new)
                    children.append((e, lin | low, new, True, (low.bit_length() - 1, path)))
            if not after_pend:
                for v, mask in blind_tokens:
                    if v == state or v in reached:
                        continue
                    m = mask & avail
                    if m:
                        low = m & -m
                        children.append((e, lin | low, v, True, (low.bit_length() - 1, path)))

        # Other completed open ops.
        cand = open_ops & done_mask
        while cand:
            low = cand & -cand
            cand ^= low
            p = low.bit_length() - 1
            if p == target or (after_pend and codes[p] == _PUT):
                continue
            ok, new_state = _step(codes[p], argss[p], results[p], state)
            if ok:
                children.append((e, lin | low, new_state, False, (p, path)))

        # The responding op itself, pushed last so it is tried first.
        if after_pend and codes[target] == _PUT:
            pass  # the configuration before the pending op tries this
        else:
            ok, new_state = _step(codes[target], argss[target], results[target], state)
            if ok:
                ne, nlin = advance(e + 1, lin)
                children.append((ne, nlin, new_state, False, (target, path)))
            elif not after_pend and (best is None or e > best[0]):
                best = (e, lin, state, path)
        stack.extend(children)

    # Not linearizable: build the explanation.
    lines = [f"key {key!r}: history is not linearizable ({n} ops, sorted by call):"]
    lines.extend(_fmt_op(i, op) for i, op in enumerate(ops))
    if best is not None:
        e, lin, state, path = best
        order = []
        while path is not None:
            order.append(path[0])
            path = path[1]
        order.reverse()
        t = ev_op[e]
        shown = ", ".join(f"#{i}" for i in order[-20:]) if order else "(none)"
        if len(order) > 20:
            shown = f"..., {shown} (last 20 shown)"
        lines.append(
            f"most advanced attempt: linearized {len(order)} ops in order "
            f"{shown}, leaving the value {_fmt_val(state)}"
        )
        lines.append(
            f"then #{t} ({ops[t].kind}, returned at {ops[t].ret}) could not take "
            f"effect: its result {_fmt_result(ops[t])} "
            f"does not match the value {_fmt_val(state)}, and no other order of "
            f"the ops open before its response explains it"
        )
    return "\n".join(lines)


def check_history(
    ops: Iterable[Operation],
    initial: Mapping[bytes, bytes] | None = None,
    max_states: int = 1_000_000,
) -> CheckResult:
    """Check a client history of the KV register map for linearizability.

    Returns ``CheckResult(ok=True, key=None, ...)`` if every key's history is
    linearizable, else ``ok=False`` naming the first failing key (keys are
    checked in sorted order) with a readable explanation.  Raises
    :class:`CheckerGaveUp` if some key needs more than ``max_states``
    explored configurations, and ``ValueError`` for malformed operations.
    """
    initial = dict(initial or {})
    by_key: dict = {}
    for op in ops:
        _validate(op)
        by_key.setdefault(op.key, []).append(op)
    for key in sorted(by_key):
        why = _check_key(key, by_key[key], _norm(initial.get(key)), max_states)
        if why is not None:
            return CheckResult(ok=False, key=key, explanation=why)
    return CheckResult(
        ok=True,
        key=None,
        explanation=f"linearizable: {len(by_key)} keys checked",
    )
