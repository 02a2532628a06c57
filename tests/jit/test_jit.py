"""JIT pipeline: spec rendering, parameter packing, ptxas parsing, nvcc compile + cache (where nvcc exists)."""
import multiprocessing as mp
import os
import struct
from pathlib import Path

import pytest

from torch_deepstack import jit
from torch_deepstack.jit import KernelSpec, cache, nvcc
from torch_deepstack.jit.launch import param_struct

DATA = Path(__file__).parent / "data"
needs_nvcc = pytest.mark.skipif(nvcc.find_nvcc() is None, reason="nvcc not installed")


def test_spec_source_forces_one_instantiation():
    spec = KernelSpec("quant/per_token_group_quant_fp8.cuh", "deepstack::per_token_group_quant_fp8_kernel",
                      ("__nv_bfloat16", 128, False))
    src = spec.source()
    assert '#include "quant/per_token_group_quant_fp8.cuh"' in src
    assert "deepstack::per_token_group_quant_fp8_kernel<__nv_bfloat16, 128, false>" in src
    assert spec.name == "per_token_group_quant_fp8_kernel"


def test_param_struct_follows_cuda_alignment():
    s = param_struct("pif")
    assert s.size == 16 and struct.calcsize(s.format) == 16
    s = param_struct("ip")                     # int then pointer: 4 bytes of padding
    assert s.size == 16
    s = param_struct("it")                     # tensor map is 64-byte aligned
    assert s.size == 64 + 128
    with pytest.raises(ValueError, match="unknown kernel signature code"):
        param_struct("px")


def test_parse_ptxas_report():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size"""
    (rep,) = nvcc.parse_ptxas(text)
    assert rep.entry == "_Z3fooPf" and rep.registers == 255
    assert (rep.stack_frame, rep.spill_stores, rep.spill_loads) == (16, 8, 12) and rep.has_spills


def test_parse_ptxas_wgmma_serialisation_notes():
    # ptxas prints the note before the entry line and names the function in it
    text = """ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
insufficient register resources for the function '_Z3barPf'
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
ptxas info    : Used 168 registers, used 1 barriers"""
    foo, bar = nvcc.parse_ptxas(text)
    assert not foo.serialisation_notes and not foo.has_spills
    assert len(bar.serialisation_notes) == 1 and "C7512" in bar.serialisation_notes[0]
    assert nvcc.wgmma_serialisation_notes(text) == bar.serialisation_notes
    assert nvcc.wgmma_serialisation_notes("ptxas info    : Used 40 registers") == []


def test_cache_key_changes_with_inputs():
    a = KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (1,))
    b = KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (2,))
    c = KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (1,), extra_flags=("-lineinfo",))
    if nvcc.find_nvcc() is None:
        pytest.skip("cache keys include nvcc's version")
    keys = {cache.cache_key(s, "sm_90a") for s in (a, b, c)}
    assert len(keys) == 3
    assert cache.cache_key(a, "sm_90a") != cache.cache_key(a, "sm_100a")


@needs_nvcc
def test_compile_then_cache_hit(monkeypatch):
    spec = KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (7,))
    first = jit.build(spec)
    assert first.path.is_file() and first.entry.startswith("_ZN9deepstack11noop_kernelILi7E")
    assert first.meta["registers"] > 0 and first.meta["spill_stores"] == 0

    def no_compile(*a, **k):
        raise AssertionError("cache miss: nvcc ran again")
    monkeypatch.setattr(nvcc, "compile_cubin", no_compile)
    again = jit.build(spec)
    assert again.path == first.path and again.entry == first.entry
    assert any(e["instantiation"] == spec.instantiation() for e in jit.list_entries())


@needs_nvcc
@pytest.mark.parametrize("damage", ["lose meta.json", "lose kernel.cubin", "truncate meta.json"])
def test_damaged_entry_is_rebuilt(damage):
    # A copy of the cache that dropped files (seen on the GPU machine: entries kept with only kernel.cubin) made
    # every build of those keys fail on the publish rename (ENOTEMPTY); it must rebuild the entry instead.
    spec = KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (13,))
    first = jit.build(spec)
    what, name = damage.split(" ")
    if what == "lose":
        (first.path.parent / name).unlink()
    else:
        (first.path.parent / name).write_text('{"entry": "_Z')
    again = jit.build(spec)
    assert again.path == first.path and again.path.is_file() and (again.path.parent / "meta.json").is_file()
    assert again.entry == first.entry
    assert not [d for d in first.path.parent.parent.iterdir() if d.name.startswith((".tmp-", ".stale-"))]


@needs_nvcc
def test_compile_error_carries_nvcc_message():
    spec = KernelSpec(str(DATA / "broken.cuh"), "broken_kernel", (1,))
    with pytest.raises(jit.JitCompileError, match="this_identifier_does_not_exist"):
        jit.build(spec)


@needs_nvcc
def test_ptxas_check_rejects_spills(monkeypatch):
    spec = KernelSpec(str(DATA / "spills.cuh"), "spilling_kernel", (64,))
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    with pytest.raises(jit.JitCompileError, match="ptxas check failed"):
        jit.build(spec)
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "0")
    assert jit.build(spec).meta["stack_frame"] > 0


def _build_in_child(cache_dir, q):
    os.environ["DEEPSTACK_JIT_CACHE_DIR"] = cache_dir
    from torch_deepstack import jit as j
    r = j.build(KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (11,)))
    q.put(str(r.path))


@needs_nvcc
@pytest.mark.timeout(120)
def test_concurrent_processes_share_one_entry(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), q)) for _ in range(3)]
    for p in procs:
        p.start()
    paths = {q.get(timeout=110) for _ in procs}
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(paths) == 1
    entries = [d for d in (tmp_path / "sm_90a").iterdir() if not d.name.startswith(".")]
    assert len(entries) == 1                     # no stray temp directories left behind
    assert not list((tmp_path / "sm_90a").glob(".tmp-*"))


@needs_nvcc
@pytest.mark.timeout(900)
def test_every_kernel_family_compiles_without_spills(monkeypatch):
    """Compile every prebuild specialisation of every area for sm_90a; fail on spills or local memory."""
    from concurrent.futures import ThreadPoolExecutor
    monkeypatch.setenv("DEEPSTACK_JIT_PTXAS_CHECK", "1")
    specs = jit.prebuild_specs()
    assert specs, "no kernel family registered a prebuild list"
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(jit.build, specs))
    for spec, r in zip(specs, results):
        assert r.meta["stack_frame"] == 0 and r.meta["spill_stores"] == 0, spec.instantiation()


def test_wrong_gpu_arch_gives_clear_error(monkeypatch):
    import torch

    from torch_deepstack._library import DeviceNotSupportedError
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(DeviceNotSupportedError, match="built for sm_90a; NVIDIA A100 is sm_80"):
        jit.check_device_arch()
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    jit.check_device_arch()


@pytest.mark.cuda
def test_kernel_loads_and_launches_in_a_thread_that_never_used_cuda():
    """The autograd engine runs CUDA backward passes in a thread of its own, where torch may not have made a context
    current: a kernel first loaded there (a backward GEMM of a new shape) must load, lay out its parameters and
    launch. Here: a fresh Python thread loads and launches a kernel no other thread has loaded."""
    import threading

    import torch
    from torch_deepstack.jit.launch import Kernel
    compiled = jit.build(KernelSpec("common/noop.cuh", "deepstack::noop_kernel", (13,)))
    errors = []

    def load_and_launch():
        try:
            k = Kernel(compiled.cubin, compiled.entry, "pif")
            assert k._struct.size >= 16   # a pointer, an int and a float: the cubin's layout was read
            k.launch(1, 32, None, 1, 2.0)
        except BaseException as e:   # (re-raised in the test's thread)
            errors.append(e)

    t = threading.Thread(target=load_and_launch)
    t.start()
    t.join()
    assert not errors, errors
    torch.cuda.synchronize()
