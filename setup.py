"""Packaging glue that pyproject.toml cannot express.

* `meta_impls/` (the fake implementations) lives at the top of the repo, as the design card fixes, but is
  installed as `torch_deepstack.meta_impls` so it does not pollute site-packages with a `meta_impls` package.
* CUDA sources under `src/` are shipped as package data: kernels are compiled at run time by
  `torch_deepstack.jit` (one specialisation per shape), so nothing is built for CUDA at install time.
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _src_files():
    out = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "src")):
        for f in files:
            if f.endswith((".cuh", ".cu", ".h", ".hpp", ".cpp")):
                out.append(os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, "src")))
    return sorted(out)


packages = find_packages(include=["torch_deepstack", "torch_deepstack.*"])
packages += ["torch_deepstack.meta_impls", "torch_deepstack._src"]

setup(
    packages=packages,
    package_dir={"torch_deepstack.meta_impls": "meta_impls", "torch_deepstack._src": "src"},
    package_data={"torch_deepstack._src": _src_files()},
)
