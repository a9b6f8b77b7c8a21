"""Builds the optional CPU kernels (mixtral/cpu_kernels.cpp); everything else is declared in pyproject.toml.

The kernels are a plain shared library with no Python or torch headers, loaded through ctypes. They need
gcc or clang and an x86-64 target; where the build fails (no compiler, another architecture) the install
goes on without them and bfloat16 matmuls use oneDNN through torch (see mixtral/cpu_kernels.py).
"""

import platform

from setuptools import Extension, setup

X86 = platform.machine().lower() in {"x86_64", "amd64"}
# -fno-wrapv undoes the -fwrapv of Python's own CFLAGS, which setuptools passes first: with it, the matmul
# at 10-16 rows per weight was 5-9% slower (measured on the 2-core machine, 48 distinct experts' weights).
FLAGS = ["-O3", "-fno-wrapv", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]

setup(ext_modules=[Extension("mixtral._cpu_kernels", ["mixtral/cpu_kernels.cpp"], extra_compile_args=FLAGS,
                             extra_link_args=["-fopenmp"], optional=True)] if X86 else [])
