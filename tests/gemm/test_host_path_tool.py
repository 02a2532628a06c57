"""benchmarks/host_path.py runs the FP8 ops' CUDA faces on CPU tensors with the GPU parts stubbed: it must keep
working as the faces change (a face that grows a new GPU call would reach the stubs' gaps and fail here)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_host_path_tool_times_every_face():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "host_path.py")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = dict(re.findall(r"^\| (.+?) \| ([0-9.]+) \|$", out.stdout, re.M))
    for face in ("per_token_group_quant_fp8_dual", "per_block_quant_fp8_dual", "fp8_gemm_nt",
                 "fp8_wgrad_gemm_nt (bf16 out)", "m_grouped_fp8_gemm_nt_contiguous", "m_grouped_fp8_gemm_nt_masked",
                 "FP8Linear training step"):
        assert float(rows[face]) > 0, out.stdout
