"""Build the Cython kernels in ``_ext/`` as modules of ``kvstore._native``.

Each ``_ext/NAME.pyx`` becomes ``kvstore._native._NAME``; the pure-Python twin
``kvstore/_native/NAME_py.py`` is used when the build is missing.
"""

import glob
import os

from setuptools import Extension, setup

try:
    from Cython.Build import cythonize
except ImportError as e:  # pragma: no cover - build-system requires Cython
    raise SystemExit("building kvstore needs Cython>=3 (pip install cython)") from e

extensions = [
    Extension(
        "kvstore._native._" + os.path.splitext(os.path.basename(path))[0],
        [path],
        extra_compile_args=["-O3"],
    )
    for path in sorted(glob.glob(os.path.join("_ext", "*.pyx")))
]

setup(
    ext_modules=cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
