"""Tests for the simulator's linearizability checker (kvstore.sim.linearizability)."""

from __future__ import annotations

import itertools
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstore.sim.linearizability import (
    CheckerGaveUp,
    CheckResult,
    Operation,
    check_history,
)

K = b"k"


def op(client, kind, args, call, ret, result=None, key=K):
    return Operation(client=client, key=key, kind=kind, args=args, call=call,
                     ret=ret, result=result)


def get(c, call, ret, result, key=K):
    return op(c, "get", (), call, ret, result, key)


def put(c, v, call, ret, key=K):
    return op(c, "put", (v,), call, ret, None, key)


def delete(c, call, ret, result, key=K):
    return op(c, "delete", (), call, ret, result, key)


def cas(c, exp, new, call, ret, result, key=K):
    return op(c, "cas", (exp, new), call, ret, result, key)


def ok(ops, initial=None):
    return check_history(ops, initial).ok


# ---------------------------------------------------------------------------
# Reference model and brute-force oracle, independent of the checker.


def apply_model(state, o):
    """Return (result, new_state) for a register op."""
    if o.kind == "get":
        return state, state
    if o.kind == "put":
        return None, o.args[0]
    if o.kind == "delete":
        return state is not None, None
    exp, new = o.args
    if state == exp:
        return True, new
    return False, state


def brute_force(ops, initial=None):
    """Linearizable iff some choice of pending ops to include and some
    permutation respecting real time reproduces every completed result."""
    by_key = {}
    for o in ops:
        by_key.setdefault(o.key, []).append(o)
    for key, kops in by_key.items():
        done = [o for o in kops if o.ret is not None]
        pend = [o for o in kops if o.ret is None]
        init = (initial or {}).get(key)
        found = False
        for r in range(len(pend) + 1):
            for chosen in itertools.combinations(pend, r):
                for perm in itertools.permutations(done + list(chosen)):
                    if _perm_ok(perm, init):
                        found = True
                        break
                if found:
                    break
            if found:
                break
        if not found:
            return False
    return True


def _perm_ok(perm, init):
    for i, a in enumerate(perm):
        for b in perm[i + 1:]:
            if b.ret is not None and b.ret < a.call:
                return False  # b finished before a started, yet a is first
    state = init
    for o in perm:
        res, state = apply_model(state, o)
        if o.ret is None:
            continue
        if o.kind == "get" and res != o.result:
            return False
        if o.kind in ("delete", "cas") and res != bool(o.result):
            return False
    return True


# ---------------------------------------------------------------------------
# Hand-written cases


def test_empty_history_passes():
    r = check_history([])
    assert isinstance(r, CheckResult)
    assert r.ok and r.key is None


def test_sequential_history_passes():
    h = [
        get(1, 0, 1, None),
        put(1, b"a", 2, 3),
        get(2, 4, 5, b"a"),
        put(2, b"b", 6, 7),
        get(1, 8, 9, b"b"),
        delete(1, 10, 11, True),
        get(2, 12, 13, None),
        delete(2, 14, 15, False),
    ]
    assert ok(h)


def test_stale_read_after_completed_put_fails():
    h = [put(1, b"a", 0, 1), put(1, b"b", 2, 3), get(2, 4, 5, b"a")]
    r = check_history(h)
    assert not r.ok
    assert r.key == K


def test_read_of_value_never_written_fails():
    h = [put(1, b"a", 0, 10), get(2, 1, 9, b"zzz")]
    assert not ok(h)


def test_read_of_absent_after_put_fails():
    assert not ok([put(1, b"a", 0, 1), get(2, 2, 3, None)])


def test_overlapping_ops_allow_either_order():
    # get overlapping a put may see the old or the new value
    assert ok([put(1, b"a", 0, 10), get(2, 5, 6, b"a")])
    assert ok([put(1, b"a", 0, 10), get(2, 5, 6, None)])
    # two overlapping puts then a read: either may have won
    assert ok([put(1, b"a", 0, 10), put(2, b"b", 1, 9), get(3, 11, 12, b"a")])
    assert ok([put(1, b"a", 0, 10), put(2, b"b", 1, 9), get(3, 11, 12, b"b")])


def test_get_sees_new_value_before_put_returns():
    h = [put(1, b"new", 0, 100), get(2, 10, 20, b"new"), get(3, 30, 40, b"new")]
    assert ok(h, {K: b"old"})
    # ... but once seen, a later read cannot return the old value
    h2 = [put(1, b"new", 0, 100), get(2, 10, 20, b"new"), get(3, 30, 40, b"old")]
    assert not ok(h2, {K: b"old"})


def test_pending_put_may_or_may_not_take_effect():
    assert ok([put(1, b"a", 0, None), get(2, 5, 6, None)])
    assert ok([put(1, b"a", 0, None), get(2, 5, 6, b"a")])
    # may take effect long after the call, after completed reads of the old
    assert ok([put(1, b"a", 0, None), get(2, 5, 6, None), get(2, 50, 60, b"a")])


def test_pending_put_cannot_be_unseen():
    h = [put(1, b"a", 0, None), get(2, 5, 6, b"a"), get(2, 10, 11, None)]
    assert not ok(h)


def test_pending_put_cannot_take_effect_before_its_call():
    h = [get(2, 0, 1, b"a"), put(1, b"a", 5, None)]
    assert not ok(h)


def test_pending_get_is_ignored():
    assert ok([get(1, 0, None, b"garbage"), put(2, b"a", 1, 2), get(3, 3, 4, b"a")])


def test_pending_result_is_ignored():
    # a pending delete claiming False while the key exists is still fine
    assert ok([put(1, b"a", 0, 1), delete(2, 2, None, False), get(3, 5, 6, None)])


def test_pending_ops_linearized_at_most_once():
    # one pending put of b can explain one transition to b, not two
    h = [
        put(1, b"b", 0, None),
        get(2, 1, 2, b"b"),
        put(3, b"a", 3, 4),
        get(2, 5, 6, b"b"),
    ]
    assert not ok(h)
    # two identical pending puts can explain it
    h2 = h + [put(4, b"b", 0, None)]
    assert ok(h2)
    # same for a pending cas
    h3 = [
        cas(1, None, b"a", 0, None, None),
        get(2, 1, 2, b"a"),
        delete(3, 3, 4, True),
        get(2, 5, 6, b"a"),
    ]
    assert not ok(h3)
    assert ok(h3 + [cas(4, None, b"a", 0, None, None)])


def test_pending_op_right_before_a_completed_delete():
    # the only linearization: pending cas(a -> absent), delete -> False, put b
    h = [
        put(0, b"b", 4, 5),
        cas(1, b"a", None, 5, None, None),
        delete(2, 5, 13, False),
    ]
    assert ok(h, {K: b"a"})
    assert not ok(h[:1] + h[2:], {K: b"a"})


def test_pending_tokens_not_wasted_by_memo():
    # the pending put a must be kept for the end (the pending delete is
    # useless); a search that uses it early reaches the same configuration
    # with more tokens spent, which must not hide the cheaper one
    h = [
        delete(0, 4, None, None),
        get(1, 8, 14, None),
        put(2, b"a", 12, 13),
        delete(3, 16, 17, True),
        put(4, b"a", 17, None),
        get(5, 24, 25, b"a"),
    ]
    assert ok(h)
    assert not ok(h[:4] + h[5:])


def test_cas_semantics():
    assert ok([put(1, b"a", 0, 1), cas(1, b"a", b"b", 2, 3, True), get(1, 4, 5, b"b")])
    assert ok([put(1, b"a", 0, 1), cas(1, b"x", b"b", 2, 3, False), get(1, 4, 5, b"a")])
    # a cas claiming success with the wrong expected value
    assert not ok([put(1, b"a", 0, 1), cas(1, b"x", b"b", 2, 3, True)])
    # a cas claiming failure although it should have swapped
    assert not ok([put(1, b"a", 0, 1), cas(1, b"a", b"b", 2, 3, False)])
    # a failed cas changes nothing
    assert not ok([put(1, b"a", 0, 1), cas(1, b"x", b"b", 2, 3, False), get(1, 4, 5, b"b")])


def test_cas_expected_none_and_new_none():
    # expected None: must be absent
    assert ok([cas(1, None, b"a", 0, 1, True), get(1, 2, 3, b"a")])
    assert not ok([cas(1, None, b"a", 0, 1, True)], {K: b"x"})
    assert ok([cas(1, None, b"a", 0, 1, False)], {K: b"x"})
    assert not ok([cas(1, None, b"a", 0, 1, False)])
    # new None deletes
    assert ok([put(1, b"a", 0, 1), cas(1, b"a", None, 2, 3, True), get(1, 4, 5, None)])
    assert not ok([put(1, b"a", 0, 1), cas(1, b"a", None, 2, 3, True), get(1, 4, 5, b"a")])


def test_concurrent_cas_only_one_wins():
    h = [cas(1, None, b"a", 0, 10, True), cas(2, None, b"b", 0, 10, True)]
    assert not ok(h)
    h = [cas(1, None, b"a", 0, 10, True), cas(2, None, b"b", 0, 10, False),
         get(3, 11, 12, b"a")]
    assert ok(h)


def test_delete_results():
    assert ok([put(1, b"a", 0, 1), delete(1, 2, 3, True), delete(1, 4, 5, False)])
    assert not ok([put(1, b"a", 0, 1), delete(1, 2, 3, False)])
    assert not ok([delete(1, 0, 1, True)])
    assert not ok([put(1, b"a", 0, 1), delete(1, 2, 3, True), delete(1, 4, 5, True)])
    # two concurrent deletes: exactly one can see the key
    assert ok([put(1, b"a", 0, 1), delete(1, 2, 9, True), delete(2, 3, 8, False)])
    assert not ok([put(1, b"a", 0, 1), delete(1, 2, 9, True), delete(2, 3, 8, True)])


def test_initial_state_honoured():
    assert ok([get(1, 0, 1, b"init")], {K: b"init"})
    assert not ok([get(1, 0, 1, None)], {K: b"init"})
    assert not ok([get(1, 0, 1, b"init")])
    assert ok([delete(1, 0, 1, True)], {K: b"init"})


def test_equal_times_count_as_overlapping():
    # put returns at 5, get called at 5: concurrent, so old value allowed
    assert ok([put(1, b"a", 0, 5), get(2, 5, 6, None)])
    assert not ok([put(1, b"a", 0, 5), get(2, 6, 7, None)])


def test_keys_are_independent_and_explanation_names_key():
    h = [
        put(1, b"a", 0, 1, key=b"alpha"),
        get(2, 2, 3, b"a", key=b"alpha"),
        put(1, b"x", 0, 1, key=b"beta"),
        put(1, b"y", 2, 3, key=b"beta"),
        get(2, 4, 5, b"x", key=b"beta"),  # stale
        get(3, 4, 5, b"a", key=b"gamma"),  # never written on gamma
    ]
    r = check_history(h)
    assert not r.ok
    assert r.key == b"beta"  # first failing key in sorted order
    assert "b'beta'" in r.explanation
    # one line per op of the key, with its times and result
    assert "[4, 5]" in r.explanation and "get() -> b'x'" in r.explanation
    assert "put(b'y')" in r.explanation
    # the value of one key does not leak into another
    assert not ok([put(1, b"a", 0, 1, key=b"p"), get(2, 2, 3, b"a", key=b"q")])


def test_invalid_operations_rejected():
    with pytest.raises(ValueError):
        check_history([op(1, "incr", (), 0, 1)])
    with pytest.raises(ValueError):
        check_history([put(1, b"a", 5, 5)])
    with pytest.raises(ValueError):
        check_history([op(1, "put", (), 0, 1)])


def test_gives_up_instead_of_passing():
    # many concurrent puts and gets; a tiny budget must raise, not pass
    h = [put(i, bytes([i]), 0, 100) for i in range(8)]
    h += [get(10 + i, 1, 99, bytes([i])) for i in range(8)]
    h += [get(30, 101, 102, b"\x09")]  # not linearizable, but hard to prove
    with pytest.raises(CheckerGaveUp, match="max_states|configurations"):
        check_history(h, max_states=20)
    assert not check_history(h).ok


# ---------------------------------------------------------------------------
# Property tests

VALUES = [None, b"a", b"b", b"c"]


@st.composite
def true_executions(draw, max_ops=40):
    """Ops applied to a real register at linearization points 10, 20, ...;
    each op's interval is widened randomly around its point.  Some ops get
    no response: they either took effect at their point or never did."""
    n = draw(st.integers(1, max_ops))
    width = draw(st.integers(1, 40))
    init = draw(st.sampled_from(VALUES))
    state = init
    ops = []
    for k in range(n):
        point = 10 * (k + 1)
        kind = draw(st.sampled_from(["get", "put", "delete", "cas"]))
        if kind == "put":
            args = (draw(st.sampled_from(VALUES[1:])),)
        elif kind == "cas":
            exp = state if draw(st.booleans()) else draw(st.sampled_from(VALUES))
            args = (exp, draw(st.sampled_from(VALUES)))
        else:
            args = ()
        call = point - draw(st.integers(0, width))
        fate = draw(st.sampled_from(["done"] * 6 + ["lost", "applied"]))
        o = op(k, kind, args, call, None)
        if fate == "lost":
            ops.append(o)  # never took effect
            continue
        result, state = apply_model(state, o)
        ret = None if fate == "applied" else point + draw(st.integers(1, width))
        ops.append(op(k, kind, args, call, ret, result))
    return ops, init


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(true_executions())
def test_true_register_executions_pass(ex):
    ops, init = ex
    initial = {K: init} if init is not None else None
    r = check_history(ops, initial)
    assert r.ok, r.explanation


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(true_executions(), st.data())
def test_read_of_unwritten_value_fails(ex, data):
    ops, init = ex
    gets = [i for i, o in enumerate(ops) if o.kind == "get" and o.ret is not None]
    if not gets:
        return
    i = data.draw(st.sampled_from(gets))
    bad = op(ops[i].client, "get", (), ops[i].call, ops[i].ret, b"never-written")
    ops = ops[:i] + [bad] + ops[i + 1:]
    initial = {K: init} if init is not None else None
    assert not check_history(ops, initial).ok


@st.composite
def tiny_histories(draw, pending_one_in=6, max_ops=6):
    """Up to 6 ops with random intervals on one or two keys; results come
    from a random sequential run and are then possibly corrupted, so both
    linearizable and non-linearizable histories are common."""
    n = draw(st.integers(1, max_ops))
    keys = [b"x", b"y"] if draw(st.booleans()) else [b"x"]
    init = {}
    for k in keys:
        v = draw(st.sampled_from(VALUES))
        if v is not None:
            init[k] = v
    state = dict(init)
    ops = []
    for c in range(n):
        key = draw(st.sampled_from(keys))
        kind = draw(st.sampled_from(["get", "put", "delete", "cas"]))
        if kind == "put":
            args = (draw(st.sampled_from(VALUES[1:])),)
        elif kind == "cas":
            args = (draw(st.sampled_from(VALUES)), draw(st.sampled_from(VALUES)))
        else:
            args = ()
        call = draw(st.integers(0, 12))
        ret = None if draw(st.integers(1, pending_one_in)) == 1 else call + draw(st.integers(1, 8))
        o = op(c, kind, args, call, ret, key=key)
        res, state[key] = apply_model(state.get(key), o)
        if draw(st.integers(0, 2)) == 0:  # corrupt
            if kind == "get":
                res = draw(st.sampled_from(VALUES))
            elif kind in ("delete", "cas"):
                res = draw(st.booleans())
        ops.append(op(c, kind, args, call, ret, res, key=key))
    return ops, init


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_histories())
def test_agrees_with_brute_force(h):
    ops, init = h
    expected = brute_force(ops, init)
    r = check_history(ops, init)
    assert r.ok == expected, (expected, r.explanation, ops, init)
    if not r.ok:
        assert r.key is not None and repr(r.key) in r.explanation


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_histories(pending_one_in=2, max_ops=7))
def test_agrees_with_brute_force_many_pending(h):
    # half the ops have no response: exercises the pending-op reductions
    ops, init = h
    assert check_history(ops, init).ok == brute_force(ops, init), (ops, init)


@st.composite
def tiny_true_histories(draw):
    """Up to 7 ops of a real register run with heavily overlapping
    intervals and many ops without response, then maybe one completed
    result corrupted: mostly linearizable, often only just."""
    n = draw(st.integers(1, 7))
    init = draw(st.sampled_from(VALUES))
    state = init
    ops = []
    for k in range(n):
        point = 4 * (k + 1)
        kind = draw(st.sampled_from(["get", "put", "delete", "cas"]))
        if kind == "put":
            args = (draw(st.sampled_from(VALUES[1:3])),)
        elif kind == "cas":
            args = (draw(st.sampled_from(VALUES[:3])), draw(st.sampled_from(VALUES[:3])))
        else:
            args = ()
        call = point - draw(st.integers(0, 12))
        fate = draw(st.sampled_from(["done", "done", "lost", "applied"]))
        o = op(k, kind, args, call, None)
        if fate == "lost":
            ops.append(o)
            continue
        res, state = apply_model(state, o)
        ret = None if fate == "applied" else point + draw(st.integers(1, 12))
        ops.append(op(k, kind, args, call, ret, res))
    done = [i for i, o in enumerate(ops) if o.ret is not None and o.kind != "put"]
    if done and draw(st.booleans()):
        i = draw(st.sampled_from(done))
        o = ops[i]
        res = draw(st.sampled_from(VALUES)) if o.kind == "get" else not o.result
        ops[i] = op(o.client, o.kind, o.args, o.call, o.ret, res)
    return ops, ({K: init} if init is not None else {})


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tiny_true_histories())
def test_agrees_with_brute_force_on_near_linearizable_runs(h):
    ops, init = h
    assert check_history(ops, init).ok == brute_force(ops, init), (ops, init)


# ---------------------------------------------------------------------------
# Performance


def concurrent_run(n_ops, n_clients, seed, values=(b"a", b"b", b"c", None), pending_every=0):
    """A real register driven by ``n_clients`` clients, each with one op in
    flight: op k belongs to client k % n_clients and takes effect at time
    10k; its interval is widened up to 10 * n_clients / 2 on each side so
    about n_clients ops overlap at any time."""
    rng = random.Random(seed)
    state = None
    ops = []
    half = 5 * n_clients - 1
    for k in range(n_ops):
        point = 10 * (k + 1)
        kind = rng.choice(["get", "get", "put", "delete", "cas"])
        if kind == "put":
            args = (rng.choice([v for v in values if v is not None]),)
        elif kind == "cas":
            args = (rng.choice(values), rng.choice(values))
        else:
            args = ()
        o = op(k % n_clients, kind, args, 0, None)
        res, state = apply_model(state, o)
        call = point - rng.randint(0, half)
        ret = point + rng.randint(1, half)
        if pending_every and k % pending_every == pending_every - 1:
            ret = None
        ops.append(op(k % n_clients, kind, args, call, ret, res))
    return ops


@pytest.mark.parametrize("seed", range(3))
def test_300_op_5_client_history_checks_without_giving_up(seed):
    ops = concurrent_run(300, 5, seed)
    t0 = time.perf_counter()
    r = check_history(ops, max_states=200_000)
    elapsed = time.perf_counter() - t0
    assert r.ok, r.explanation
    print(f"300 ops / 5 clients: {elapsed * 1000:.1f} ms")


def test_300_op_history_with_pending_ops_checks_without_giving_up():
    ops = concurrent_run(300, 5, 7, pending_every=30)
    r = check_history(ops, max_states=200_000)
    assert r.ok, r.explanation


def test_300_op_history_with_one_bad_read_fails_without_giving_up():
    ops = concurrent_run(300, 5, 11)
    i = next(i for i in range(150, 300) if ops[i].kind == "get")
    o = ops[i]
    ops[i] = op(o.client, "get", (), o.call, o.ret, b"never-written")
    r = check_history(ops, max_states=200_000)
    assert not r.ok
    assert "#" in r.explanation and "never-written" in r.explanation
