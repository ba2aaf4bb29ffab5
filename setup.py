"""Build gradflow's optional C extension; the metadata is in pyproject.toml.

The extension is optional: without a C compiler the build prints a warning
and gradflow runs in pure Python.
"""

import numpy
from setuptools import Extension, setup

SOURCES = [
    "module.c", "tensor.c", "tape.c", "ops.c", "records.c", "engine.c",
    "kernels.c", "arenas.c",
]

extension = Extension(
    "gradflow._C",
    sources=[f"csrc/{name}" for name in SOURCES],
    depends=["csrc/gradflow.h"],
    include_dirs=[numpy.get_include()],
    # No fused multiply-add and no fast-math: the loops must round as
    # NumPy's operators do, so that results are bitwise equal.
    extra_compile_args=["-O3", "-std=gnu11", "-ffp-contract=off", "-fno-fast-math"],
    optional=True,
)

setup(ext_modules=[extension])
