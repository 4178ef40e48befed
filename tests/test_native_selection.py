"""Which kernels are used: compiled by default, pure with KVSTORE_PURE=1 (msgpack style)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = ("import json, kvstore, kvstore._native as n; "
         "print(json.dumps([n.IMPLEMENTATION, kvstore.status()['implementation'], "
         "n.shard_of.__module__]))")


def probe(pure: str | None) -> list:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("KVSTORE_PURE", None)
    if pure is not None:
        env["KVSTORE_PURE"] = pure
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return json.loads(out)


def test_compiled_kernels_are_used_when_built():
    impl, reported, module = probe(None)
    assert impl == "native", (
        "the compiled kernels did not load; build them with `pip install -e .`")
    assert reported == "native"
    assert module == "kvstore._native._hashing"


def test_kvstore_pure_forces_the_reference():
    impl, reported, module = probe("1")
    assert (impl, reported) == ("pure", "pure")
    assert module == "kvstore._native.hashing_py"


def test_kvstore_pure_0_means_not_forced():
    assert probe("0")[0] == "native"


def test_status_of_an_open_store_names_the_kernels(tmp_path):
    import kvstore
    from kvstore import _native
    with kvstore.open(str(tmp_path / "kv")) as db:
        assert db.status()["implementation"] == _native.IMPLEMENTATION
