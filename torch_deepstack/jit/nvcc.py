"""Find nvcc and the headers kernels include, run one compile to a cubin, and parse ptxas's resource report."""
from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from torch_deepstack.jit import config


class JitCompileError(RuntimeError):
    """nvcc failed, or the ptxas check rejected the result; the message carries nvcc's output."""


class NvccNotFoundError(JitCompileError):
    pass


def src_root() -> Path:
    """The directory holding the kernel sources: the repo's src/ (editable installs) or the installed copy."""
    pkg = Path(__file__).resolve().parents[1]
    for cand in (pkg.parent / "src", pkg / "_src"):
        if (cand / "common").is_dir():
            return cand
    raise FileNotFoundError(f"torch_deepstack kernel sources not found next to {pkg}")


@functools.lru_cache(maxsize=None)
def find_nvcc() -> str | None:
    cands = [os.environ.get("DEEPSTACK_NVCC")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            cands.append(os.path.join(os.environ[var], "bin", "nvcc"))
    cands += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def require_nvcc() -> str:
    nvcc = find_nvcc()
    if nvcc is None:
        raise NvccNotFoundError("nvcc was not found: set DEEPSTACK_NVCC or CUDA_HOME, or put nvcc on PATH "
                                "(CUDA 12.4+ with sm_90a support is needed to build deepstack kernels)")
    return nvcc


@functools.lru_cache(maxsize=None)
def nvcc_version() -> str:
    """The full `nvcc --version` release line, e.g. 'Cuda compilation tools, release 13.0, V13.0.88'."""
    out = subprocess.run([require_nvcc(), "--version"], capture_output=True, text=True, check=True).stdout
    lines = [l for l in out.splitlines() if "release" in l]
    return lines[-1].strip() if lines else out.strip()


@functools.lru_cache(maxsize=None)
def cutlass_include_dir() -> Path | None:
    """CuTe/CUTLASS headers from the `nvidia-cutlass` wheel (cutlass_library/source/include), if installed."""
    env = os.environ.get("DEEPSTACK_CUTLASS_INCLUDE")
    if env:
        return Path(env)
    try:
        import importlib.util
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = Path(list(spec.submodule_search_locations)[0]) / "source" / "include"
    return inc if (inc / "cute").is_dir() else None


def cutlass_version() -> str:
    try:
        from importlib.metadata import version
        return version("nvidia-cutlass")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        return "none"


def base_flags(arch: str) -> list[str]:
    if not arch.startswith("sm_"):
        raise ValueError(f"DEEPSTACK_JIT_ARCH must look like sm_90a, got {arch!r}")
    cc = arch[3:]
    flags = ["-std=c++17", "-O3", f"-gencode=arch=compute_{cc},code={arch}", "-cubin", "-Xptxas", "-v",
             "--expt-relaxed-constexpr", "-DNDEBUG", f"-I{src_root()}"]
    cut = cutlass_include_dir()
    if cut is not None:
        flags.append(f"-I{cut}")
    return flags


@dataclass
class PtxasReport:
    """ptxas -v resource usage of one entry function."""
    entry: str
    registers: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared_bytes: int = 0
    text: list[str] = field(default_factory=list)
    serialisation_notes: list[str] = field(default_factory=list)   # see wgmma_serialisation_notes

    @property
    def has_spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0 or self.stack_frame > 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_WGMMA_NOTE = re.compile(r"\(C75\d\d\)")
_NOTE_FUNCTION = re.compile(r"function '([^']+)'")


def wgmma_serialisation_notes(output: str) -> list[str]:
    """ptxas's C75xx performance notes in `output`: wgmma instructions serialised (C7511 / C7512: too few registers
    for the wgmma pipeline; C7514 / C7520: an accumulator ptxas cannot follow across a branch or loop edge; C7519:
    an injected warpgroup.arrive, seen with a branch between wgmmas). The kernel still runs, up to ~1.6x slower (an
    MLA experiment, docs/mla.md), and only this note says so."""
    return [line.strip() for line in output.splitlines() if _WGMMA_NOTE.search(line)]


def parse_ptxas(output: str) -> list[PtxasReport]:
    reports: list[PtxasReport] = []
    cur: PtxasReport | None = None
    for line in output.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = PtxasReport(entry=m.group(1))
            reports.append(cur)
            continue
        if cur is None:
            continue
        if "ptxas" in line or "bytes stack frame" in line:
            cur.text.append(line.strip())
        if (m := _FRAME.search(line)):
            cur.stack_frame, cur.spill_stores, cur.spill_loads = map(int, m.groups())
        if (m := _REGS.search(line)):
            cur.registers = int(m.group(1))
        if (m := _SMEM.search(line)):
            cur.shared_bytes = int(m.group(1))
    # the notes come before their function's "Compiling entry function" line and name it
    for note in wgmma_serialisation_notes(output):
        named = _NOTE_FUNCTION.search(note)
        for r in reports:
            if (named and named.group(1) == r.entry) or (not named and len(reports) == 1):
                r.serialisation_notes.append(note)
    return reports


def compile_cubin(source: str, out_cubin: Path, arch: str, extra_flags: list[str]) -> tuple[list[str], str]:
    """Compile `source` (CUDA C++ text) to `out_cubin`. Returns (command, combined compiler output)."""
    out_cubin.parent.mkdir(parents=True, exist_ok=True)
    cu = out_cubin.with_suffix(".cu")
    cu.write_text(source)
    cmd = [require_nvcc(), *base_flags(arch), *extra_flags, str(cu), "-o", str(out_cubin)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    output = (proc.stdout + proc.stderr).strip()
    if proc.returncode != 0:
        raise JitCompileError(f"nvcc failed (exit {proc.returncode}) compiling {cu}:\n{output}\n"
                              f"command: {' '.join(cmd)}")
    return cmd, output
