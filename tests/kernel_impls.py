"""The two kernel implementations side by side, for the parity tests.

The compiled modules are imported directly (not through the selection in
``kvstore._native``) so the parity tests run, and compare both, even when the
suite runs with ``KVSTORE_PURE=1``. A missing build fails loudly: CI builds
the extension, and a parity test that silently compared the pure twin with
itself would prove nothing.
"""

from __future__ import annotations

import importlib

from kvstore._native import pure

try:
    # By module path: with KVSTORE_PURE=1 the package's own names point at the twins.
    _hashing, _logcodec, _quorum, _wakeup = (importlib.import_module(f"kvstore._native._{name}")
                                             for name in ("hashing", "logcodec", "quorum",
                                                          "wakeup"))
except ImportError as e:  # pragma: no cover - the build is part of installing
    raise ImportError(
        f"the compiled kernels are not built ({e}); run `pip install -e .` "
        f"(or `python setup.py build_ext --inplace`) first") from e

IMPLEMENTATIONS = {
    "native": (_hashing, _logcodec, _quorum, _wakeup),
    "pure": (pure.hashing, pure.logcodec, pure.quorum, pure.wakeup),
}
HASHING = {name: mods[0] for name, mods in IMPLEMENTATIONS.items()}
LOGCODEC = {name: mods[1] for name, mods in IMPLEMENTATIONS.items()}
QUORUM = {name: mods[2] for name, mods in IMPLEMENTATIONS.items()}
WAKEUP = {name: mods[3] for name, mods in IMPLEMENTATIONS.items()}
