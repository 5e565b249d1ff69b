"""Build script. Every switch is an environment variable:

EEKERNELS_SKIP_CUDA_BUILD=1   build no CUDA extension (pure torch + Triton package)
EEKERNELS_CUDA_ARCHS="80;90a" GPU archs for eekernels._C (PTX is added for the newest)
EEKERNELS_LOCAL_VERSION=cu130 local version tag (default: from the detected nvcc when _C is built)
MAX_JOBS=N                    parallel nvcc jobs (ninja)
CUDA_HOME                     CUDA toolkit root (default: the nvcc on PATH)
"""
from setuptools import setup

setup(version="0.1.0")
