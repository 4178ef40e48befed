"""The layers' import rules (docs/architecture.md), checked on the source so a new violation fails.

Every module of the package is parsed (not imported: the rules hold for imports
inside functions too) and each of its imports checked against the rules of the
layer it lives in. A rule names what a layer must not reach; the message of a
failure names the file, the line and the rule, so the fix is to move the code,
not to weaken the test.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "kvstore"

#: What touches the outside world: sockets, files, clocks, threads, processes.
IO_MODULES = ("zmq", "socket", "select", "selectors", "lmdb", "os", "io", "time", "threading",
              "multiprocessing", "subprocess", "asyncio", "signal", "shutil", "tempfile",
              "concurrent", "queue", "mmap", "fcntl", "logging")

#: (the layer, as a module prefix; what it must not import, as module prefixes; why).
RULES = [
    ("kvstore.paxos", ("kvstore.",), "the Paxos core is pure: it may use only itself, "
     "the kernels and the errors", ("kvstore.paxos", "kvstore._native", "kvstore.errors")),
    ("kvstore.txn", ("kvstore.",), "the 2PC core is pure: it may use only itself, "
     "the kernels and the errors", ("kvstore.txn", "kvstore._native", "kvstore.errors")),
    ("kvstore.commands", ("kvstore.",), "the command vocabulary depends on nothing above it",
     ("kvstore.commands", "kvstore._native", "kvstore.errors", "kvstore.keys", "kvstore.txn",
      "kvstore.paxos.ballot")),
    ("kvstore.client", ("kvstore.node", "kvstore.machine", "kvstore.storage",
                        "kvstore.embedded", "kvstore.server", "kvstore.paxos", "kvstore.sim"),
     "the client speaks the wire protocol only", ()),
    ("kvstore.storage", ("kvstore.paxos", "kvstore.txn", "kvstore.node", "kvstore.client",
                         "kvstore.machine", "kvstore.embedded", "kvstore.server", "kvstore.sim"),
     "the storage engine knows logs, pages and tables, not protocols or engines", ()),
    ("kvstore.machine", ("kvstore.node", "kvstore.client", "kvstore.embedded", "kvstore.server",
                         "kvstore.transport", "kvstore.sim"),
     "the state machine is applied by every engine and reaches none", ()),
    ("kvstore.node", ("kvstore.client", "kvstore.embedded", "kvstore.server", "kvstore.sim"),
     "the node never imports a client or the processes around it", ()),
    ("kvstore.transport", ("kvstore.node", "kvstore.client", "kvstore.machine",
                           "kvstore.storage", "kvstore.embedded", "kvstore.server", "kvstore.sim"),
     "the transport frames and moves bytes for whoever uses it", ()),
    ("kvstore.gateway", ("kvstore.node", "kvstore.machine", "kvstore.storage",
                         "kvstore.embedded", "kvstore.server", "kvstore.paxos", "kvstore.txn",
                         "kvstore.transport", "kvstore.sim"),
     "the gateway is a client of the cluster: it reaches it through kvstore.aio only", ()),
    ("kvstore.watch", ("kvstore.",), "the watch history is pure: it may use only itself, "
     "the events and the errors", ("kvstore.watch", "kvstore.events", "kvstore.errors")),
    ("kvstore.embedded.store", ("kvstore.node", "kvstore.client", "kvstore.server",
                                "kvstore.sim"),
     "the embedded store is one replica in this process, no cluster", ()),
]

#: Pure cores: besides the rules above, no I/O module of the standard library. The state
#: machine works inside a transaction handed to it (it may log what it refuses), but it
#: opens nothing, waits for nothing and reads no clock.
PURE = {"kvstore.paxos": IO_MODULES, "kvstore.txn": IO_MODULES, "kvstore.commands": IO_MODULES,
        "kvstore.watch": IO_MODULES,
        "kvstore.machine": tuple(m for m in IO_MODULES if m != "logging")}


def module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path, name: str):
    """``(line, imported module)`` for every import statement of module ``name``, at any depth."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield node.lineno, mod
            for alias in node.names:  # ``from kvstore import node``: the submodule counts
                if mod == "kvstore":
                    yield node.lineno, f"kvstore.{alias.name}"


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def violations(package: pathlib.Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(package.rglob("*.py")):
        name = module_name(path, package)
        for line, imported in imports_of(path, name):
            where = f"{path.relative_to(package.parent)}:{line}"
            for layer, forbidden, why, allowed in RULES:
                if not within(name, layer):
                    continue
                if allowed:
                    if within(imported, "kvstore") and not any(within(imported, a) for a in allowed):
                        found.append(f"{where}: {name} imports {imported}: {why}")
                elif any(within(imported, f) for f in forbidden):
                    found.append(f"{where}: {name} imports {imported}: {why}")
            if any(within(name, p) and imported.split(".")[0] in io for p, io in PURE.items()):
                found.append(f"{where}: {name} imports {imported}: a pure core touches no "
                             f"socket, file, clock or thread (the simulator drives it)")
    return found


def test_the_layers_keep_their_import_rules():
    assert violations() == []


def test_the_rules_see_a_violation(tmp_path):
    """The checker itself: a pure core that imports a clock, and a client that imports the
    node, are both reported (a checker that saw nothing would pass everything)."""
    pkg = tmp_path / "kvstore"
    (pkg / "paxos").mkdir(parents=True)
    (pkg / "client").mkdir()
    (pkg / "paxos" / "bad.py").write_text("import time\nfrom kvstore.node import Node\n")
    (pkg / "client" / "bad.py").write_text("def f():\n    from kvstore.machine import twopc\n")
    found = violations(pkg)
    assert any("paxos/bad.py:1" in v and "time" in v for v in found), found
    assert any("paxos/bad.py:2" in v and "kvstore.node" in v for v in found), found
    assert any("client/bad.py:2" in v and "kvstore.machine" in v for v in found), found


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_are_short_or_say_why(path):
    """No module over ~600 lines without its docstring giving the reason (a line that
    starts with "Long module:")."""
    lines = path.read_text().count("\n")
    if lines <= 650:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Long module:" in doc, (
        f"{path.relative_to(PACKAGE.parent)} has {lines} lines: split it along its seams, or "
        f"say in its docstring why it is one module (a line starting 'Long module:')")
