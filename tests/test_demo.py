"""The end-to-end demo (the README's main job) runs and reports every stage."""
import subprocess
import sys

import pytest


@pytest.mark.timeout(600)
def test_demo_runs_end_to_end(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch_deepstack.cli", "demo", "--steps", "12", "--samples", "512",
                           "--workers", "2", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    for stage in ("packed corpus", "training loss", "checkpoint", "MLA decode vs full forward",
                  "greedy decoding accuracy", "KV-cache offload"):
        assert stage in out, f"demo output lacks {stage!r}:\n{out}"
    assert "bit-identical" in out
