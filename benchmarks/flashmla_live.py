"""FlashMLA itself as a live contender for bench_mla.py (its dense SM90 decode, timed like ours on the same data).

The build used is SGLang's: the `flashmla_ops` extension inside the `sgl-kernel` wheel. The whole wheel cannot be
installed beside torch 2.11 (535 MB, pinned to torch 2.9.1), so the one extension file is named by a path
(`--flashmla-so` or DEEPSTACK_FLASHMLA_SO) and imported from there. It links libcudart.so.12 (from the
`nvidia-cuda-runtime-cu12` wheel) and names libnvrtc.so.12 without using it (an empty library of that soname will
do); keep both beside it. It was built against torch 2.9.1 and CUDA 12, so `preload_shim` restarts the process with
flashmla_shim.cpp preloaded (what that mends: see the file). Getting the files:

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 sgl-kernel==0.3.21
    unzip -j sgl_kernel-0.3.21-*.whl sgl_kernel/flashmla_ops.abi3.so -d flashmla
    pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 nvidia-cuda-runtime-cu12==12.8.90
    unzip -j nvidia_cuda_runtime_cu12-*.whl nvidia/cuda_runtime/lib/libcudart.so.12 -d flashmla
    echo > e.c && gcc -shared -fPIC -Wl,-soname,libnvrtc.so.12 -o flashmla/libnvrtc.so.12 e.c

Its host code was compiled against torch 2.9.1's headers and can fail now and then here (flashmla_shim.cpp), so
bench_mla.py times a captured CUDA graph of it (no host code in a replay) once its replayed output has matched ours.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from torch_deepstack.testing.bench import capture_graph

ENV = "DEEPSTACK_FLASHMLA_SO"


class FlashMLA:
    """FlashMLA's dense decode (its own metadata, its own scheduler) through the extension's ops."""

    def __init__(self, ops):
        self.ops = ops

    def metadata(self, cache_seqlens: torch.Tensor, q_rows_per_head_k: int, num_heads_k: int):
        return self.ops.get_mla_decoding_metadata.default(cache_seqlens, q_rows_per_head_k, num_heads_k, None,
                                                          False, None)

    def decode(self, q, k_cache, block_table, cache_seqlens, head_dim_v, sched, splits, causal):
        return self.ops.fwd_kvcache_mla.default(q, k_cache, head_dim_v, cache_seqlens, block_table,
                                                q.shape[-1] ** -0.5, causal, sched, splits, False, None)

    def checked_graph(self, q, k_cache, block_table, cache_seqlens, head_dim_v, causal, ours, attempts: int = 8):
        """(replay, note): a CUDA graph of this decode (metadata outside it, as for ours) whose replayed output
        matches `ours` ((out, lse) of our decode on the same inputs), or (None, why not). The extension's host code
        can fail now and then under this torch (see flashmla_shim.cpp); a replay runs none of it, so the graph is
        what gets timed, and a failed attempt is retried."""
        why = "no attempt"
        for _ in range(attempts):
            try:
                sched, splits = self.metadata(cache_seqlens, q.shape[1] * q.shape[2] // k_cache.shape[2],
                                              k_cache.shape[2])
                replay, outs = capture_graph(lambda: self.decode(q, k_cache, block_table, cache_seqlens, head_dim_v,
                                                                 sched, splits, causal), warmup=1)
                replay()
                torch.cuda.synchronize()
                ok, why = agrees(ours, outs)
                if ok:
                    return replay, why
            except RuntimeError as e:
                why = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
        return None, why


def preload_shim(path: str | None = None) -> None:
    """Restart this Python process with flashmla_shim.cpp preloaded and the extension's folder on the library
    path, unless that is done already or no extension is asked for. Call it before anything uses CUDA."""
    path = path or os.environ.get(ENV)
    if not path:
        return
    shim = str(_build("flashmla_shim.cpp", ["-ldl"]))
    env = dict(os.environ)
    if shim in env.get("LD_PRELOAD", "").split(":"):
        return
    env["LD_PRELOAD"] = ":".join(filter(None, [shim, env.get("LD_PRELOAD")]))
    env["LD_LIBRARY_PATH"] = ":".join(filter(None, [str(Path(path).resolve().parent), env.get("LD_LIBRARY_PATH")]))
    env[ENV] = str(Path(path).resolve())
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def load(path: str | None = None) -> FlashMLA | None:
    """FlashMLA from the extension file at `path` (default: $DEEPSTACK_FLASHMLA_SO), or None: no path given, or the
    file does not load (the reason is printed; the benchmark then runs without it). Needs preload_shim() first."""
    path = path or os.environ.get(ENV)
    if not path:
        return None
    try:
        if "flashmla_shim" not in os.environ.get("LD_PRELOAD", ""):
            raise RuntimeError("flashmla_live.preload_shim() was not called")
        loader = importlib.machinery.ExtensionFileLoader("flashmla_ops", path)
        loader.exec_module(importlib.util.module_from_spec(
            importlib.util.spec_from_file_location("flashmla_ops", path, loader=loader)))
        ops = torch.ops.sgl_kernel
        ops.fwd_kvcache_mla, ops.get_mla_decoding_metadata  # noqa: B018 - resolve both now, not mid-run
    except Exception as e:  # noqa: BLE001 - an optional contender must not stop the run
        print(f"live FlashMLA: cannot load {path}: {type(e).__name__}: {str(e)[:300]}")
        return None
    return FlashMLA(ops)


def _build(source: str, args: list[str]) -> Path:
    """benchmarks/<source> built into a shared library once per source and torch version, in
    $DEEPSTACK_FLASHMLA_BUILD_DIR or the temp folder. Compiler: $CXX, else /usr/bin/g++ (the GPU image's default
    g++ builds torch extensions that crash: ../shared/specs/gpu-notes.md), else c++."""
    src = Path(__file__).with_name(source)
    tag = hashlib.sha1(src.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    out = Path(os.environ.get("DEEPSTACK_FLASHMLA_BUILD_DIR", tempfile.gettempdir())) / f"deepstack_{src.stem}_{tag}.so"
    if not out.exists():
        cxx = os.environ.get("CXX") or ("/usr/bin/g++" if Path("/usr/bin/g++").exists() else "c++")
        tmp = out.with_suffix(f".{os.getpid()}.so")
        done = subprocess.run([cxx, "-std=c++17", "-shared", "-fPIC", "-O2", str(src), "-o", str(tmp), *args],
                              capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"building {source} failed: {done.stderr[-2000:]}")
        tmp.replace(out)
    return out


def agrees(ours: tuple, theirs: tuple) -> tuple[bool, str]:
    """Whether FlashMLA's (out, lse) match ours on the same call closely enough to time it (cosine diff of out
    < 1e-5, lse within 1e-3 where finite, the same rows empty), with the numbers."""
    (o1, l1), (o2, l2) = ours, theirs
    a, b = o1.double().flatten(), o2.double().flatten()
    cos = 1 - 2 * (a * b).sum() / ((a * a).sum() + (b * b).sum()).clamp_min(1e-30)
    fin = torch.isfinite(l1)
    same_empty = bool((fin == torch.isfinite(l2)).all())
    lse_err = float((l1[fin] - l2[fin]).abs().max()) if bool(fin.any()) else 0.0
    ok = float(cos) < 1e-5 and lse_err < 1e-3 and same_empty
    return ok, f"cos diff {float(cos):.2e}, lse max err {lse_err:.2e}, empty rows alike {same_empty}"
