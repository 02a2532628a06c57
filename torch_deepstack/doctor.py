"""`deepstack doctor`: what this machine has, and which deepstack areas can run here."""
from __future__ import annotations

import os
import platform
import shutil
import sys


def add_parser(sub):
    p = sub.add_parser("doctor", help="report torch, CUDA, GPU, nvcc, CUTLASS headers, cache dir and what runs here")
    p.set_defaults(func=run)
    return p


def _probe(fn):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - doctor reports every failure instead of raising
        return f"unavailable ({type(e).__name__}: {e})"


def gather() -> dict:
    import torch

    from torch_deepstack.jit import config, nvcc

    info: dict = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch CUDA build": torch.version.cuda or "no (CPU build)",
    }
    gpu = torch.cuda.is_available()
    if gpu:
        p = torch.cuda.get_device_properties(0)
        cc = torch.cuda.get_device_capability(0)
        info["GPU"] = f"{p.name}, sm_{cc[0]}{cc[1]}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB " \
                      f"({torch.cuda.device_count()} visible)"
    else:
        info["GPU"] = "none visible to torch"
    nv = nvcc.find_nvcc()
    info["nvcc"] = f"{nv} ({_probe(nvcc.nvcc_version)})" if nv else "not found (set DEEPSTACK_NVCC or CUDA_HOME)"
    cut = nvcc.cutlass_include_dir()
    info["CUTLASS/CuTe headers"] = f"{cut} (nvidia-cutlass {nvcc.cutlass_version()})" if cut else \
        "not installed (pip install nvidia-cutlass)"
    info["JIT cache dir"] = f"{config.cache_dir()} ({'exists' if config.cache_dir().is_dir() else 'not created yet'})"
    info["JIT arch"] = config.arch()
    sm90 = gpu and torch.cuda.get_device_capability(0)[0] == 9
    kernels_ok = bool(sm90 and nv)
    etcd = shutil.which("etcd")
    areas = {
        "quant (FP8 quantisation)": "CUDA kernels" if kernels_ok else "CPU reference kernels",
        "gemm (FP8 GEMM)": "CUDA kernels" if kernels_ok else "CPU reference kernels",
        "mla (MLA decode)": "CUDA kernels" if kernels_ok else "CPU reference kernels",
        "ep (expert parallelism)": ("NVLink peer path + NCCL" if gpu and torch.cuda.device_count() > 1 else
                                    "NCCL/gloo all-to-all" if gpu else "gloo all-to-all (CPU)"),
        "storage": "embedded + cluster" + (", etcd metadata" if etcd else " (etcd metadata engine: etcd not found)"),
        "data": "yes",
    }
    info["areas"] = areas
    if gpu and not sm90:
        info["note"] = "deepstack's CUDA kernels target sm_90a (Hopper); this GPU runs the reference kernels only"
    if gpu and not nv:
        info["note"] = "a GPU is present but nvcc is missing: CUDA kernels cannot be JIT-compiled"
    info["env"] = {k: v for k, v in os.environ.items() if k.startswith("DEEPSTACK_")} or "no DEEPSTACK_* variables"
    return info


def run(args) -> int:
    import torch_deepstack  # noqa: F401 - importing registers every op; failures surface here
    info = gather()
    width = max(len(k) for k in info)
    for k, v in info.items():
        if isinstance(v, dict):
            print(f"{k}:")
            for kk, vv in v.items():
                print(f"  {kk:<28} {vv}")
        else:
            print(f"{k:<{width}}  {v}")
    import torch
    n_ops = sum(1 for n in torch._C._dispatch_get_all_op_names() if n.startswith("deepstack::"))
    print(f"{'ops':<{width}}  {n_ops} registered under torch.ops.deepstack")
    return 0
