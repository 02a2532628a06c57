"""Compile one kernel specialisation to a cubin, with an on-disk cache safe for concurrent processes.

A specialisation is a `KernelSpec`: a header under src/ plus a template kernel and its template arguments. We
generate a two-line translation unit that includes the header and takes the address of that instantiation (which
makes nvcc emit exactly one entry function), compile it with nvcc, and read the entry's mangled name back from the
ptxas report.

Cache key: sha256 over the generated source, every file under src/ (so any included header counts), the CuTe/
CUTLASS headers' version, the flags, the nvcc version and the arch. Each entry is a directory
`<cache>/<arch>/<name>-<key16>/` with `kernel.cubin` and `meta.json`. It is built in a private temp directory
and published with one atomic `rename`; a per-key `flock` keeps concurrent processes from compiling it twice.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from torch_deepstack.jit import config, nvcc
from torch_deepstack.jit.nvcc import JitCompileError


@dataclass(frozen=True)
class KernelSpec:
    """One specialisation: `kernel<template_args...>` from `header` (a path relative to src/)."""
    header: str
    kernel: str
    template_args: tuple = ()
    defines: tuple = ()          # (("NAME", value), ...) passed as -DNAME=value
    extra_flags: tuple = ()

    @property
    def name(self) -> str:
        return self.kernel.rsplit("::", 1)[-1]

    def instantiation(self) -> str:
        args = ", ".join(_render(a) for a in self.template_args)
        return f"{self.kernel}<{args}>" if self.template_args else self.kernel

    def source(self) -> str:
        return (f'#include "{self.header}"\n'
                f"// deepstack JIT: force exactly one instantiation so nvcc emits one entry function.\n"
                f"static __attribute__((used)) void* deepstack_jit_entry = "
                f"reinterpret_cast<void*>(&{self.instantiation()});\n")

    def flags(self) -> list[str]:
        return [f"-D{k}={_render(v)}" for k, v in self.defines] + list(self.extra_flags)


def _render(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


@dataclass
class CompiledKernel:
    path: Path            # kernel.cubin
    entry: str            # mangled entry function name
    meta: dict

    @property
    def cubin(self) -> bytes:
        return self.path.read_bytes()


@functools.lru_cache(maxsize=1)
def _src_tree_digest() -> str:
    """Digest of every kernel source under src/ (computed once per process)."""
    h = hashlib.sha256()
    root = nvcc.src_root()
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix in (".cuh", ".cu", ".h", ".hpp"):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def cache_key(spec: KernelSpec, arch: str) -> str:
    h = hashlib.sha256()
    for part in (spec.source(), _src_tree_digest(), nvcc.cutlass_version(), " ".join(spec.flags()),
                 nvcc.nvcc_version(), arch):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def entry_dir(spec: KernelSpec, arch: str | None = None) -> Path:
    arch = arch or config.arch()
    return config.cache_dir() / arch / f"{spec.name}-{cache_key(spec, arch)[:16]}"


def _load_entry(d: Path) -> CompiledKernel | None:
    meta_p, cubin_p = d / "meta.json", d / "kernel.cubin"
    if not (meta_p.is_file() and cubin_p.is_file()):
        return None
    try:
        meta = json.loads(meta_p.read_text())
        return CompiledKernel(cubin_p, meta["entry"], meta)
    except (ValueError, KeyError, TypeError):    # a truncated or foreign meta.json: damaged, rebuilt by build()
        return None


def build(spec: KernelSpec, arch: str | None = None) -> CompiledKernel:
    """Return the cached cubin for `spec`, compiling it first if needed."""
    arch = arch or config.arch()
    final = entry_dir(spec, arch)
    hit = _load_entry(final)
    if hit is not None:
        return hit
    final.parent.mkdir(parents=True, exist_ok=True)
    lock_path = final.parent / f".{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # another process may be compiling the same key
        try:
            hit = _load_entry(final)
            if hit is not None:
                return hit
            return _compile_and_publish(spec, arch, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _compile_and_publish(spec: KernelSpec, arch: str, final: Path) -> CompiledKernel:
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    try:
        t0 = time.perf_counter()
        cmd, output = nvcc.compile_cubin(spec.source(), tmp / "kernel.cubin", arch, spec.flags())
        seconds = time.perf_counter() - t0
        reports = nvcc.parse_ptxas(output)
        if len(reports) != 1:
            raise JitCompileError(f"expected one entry function for {spec.instantiation()}, ptxas reported "
                                  f"{[r.entry for r in reports]}:\n{output}")
        rep = reports[0]
        if config.verbose():
            print(f"[deepstack.jit] {' '.join(cmd)}\n[deepstack.jit] {spec.instantiation()}: {seconds:.2f}s, "
                  f"{rep.registers} regs, {rep.spill_stores}/{rep.spill_loads} B spill st/ld, "
                  f"{rep.stack_frame} B stack\n{output}", flush=True)
        if config.ptxas_check() and (rep.has_spills or rep.serialisation_notes):
            raise JitCompileError(f"ptxas check failed for {spec.instantiation()}: {rep.stack_frame} B stack frame, "
                                  f"{rep.spill_stores} B spill stores, {rep.spill_loads} B spill loads, "
                                  f"{len(rep.serialisation_notes)} wgmma serialisation notes\n{output}")
        meta = {"entry": rep.entry, "instantiation": spec.instantiation(), "header": spec.header,
                "arch": arch, "nvcc": nvcc.nvcc_version(), "flags": spec.flags(), "compile_seconds": seconds,
                "registers": rep.registers, "stack_frame": rep.stack_frame, "spill_stores": rep.spill_stores,
                "spill_loads": rep.spill_loads, "ptxas": output, "created": time.time()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        with open(tmp / "kernel.cubin", "rb") as f:
            os.fsync(f.fileno())
        try:
            os.rename(tmp, final)              # atomic publish; fails if the entry's directory exists
        except OSError:
            if _load_entry(final) is None:     # a damaged entry, not one published meanwhile: replace it
                _replace_damaged_entry(final, tmp)
        return _load_entry(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_damaged_entry(final: Path, tmp: Path) -> None:
    """Swap in a fresh build for an entry directory that lacks its cubin or meta.json (a copy of the cache that
    dropped files, a crash of an older version mid-publish). Called under the entry's lock; the damaged directory
    is renamed aside first, so a reader sees either it (and takes the lock) or the new entry, never a half-deleted
    one."""
    stale = Path(tempfile.mkdtemp(prefix=f".stale-{final.name}-", dir=final.parent))
    try:
        os.rename(final, stale / "entry")
        os.rename(tmp, final)
    finally:
        shutil.rmtree(stale, ignore_errors=True)


def list_entries(arch: str | None = None) -> list[dict]:
    root = config.cache_dir()
    arches = [arch] if arch else [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    out = []
    for a in arches:
        for d in sorted((root / a).glob("*-*")):
            e = _load_entry(d)
            if e is not None:
                out.append({"dir": str(d), "size": e.path.stat().st_size, **{k: e.meta[k] for k in (
                    "instantiation", "arch", "registers", "spill_stores", "stack_frame", "compile_seconds")}})
    return out


def clear() -> int:
    """Delete the whole cache; returns the number of entries removed."""
    n = len(list_entries())
    shutil.rmtree(config.cache_dir(), ignore_errors=True)
    return n
