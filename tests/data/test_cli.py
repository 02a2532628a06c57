"""`deepstack pack`: a directory and a .npy file packed from the command line read back exactly."""
import numpy as np
import torch

from torch_deepstack.cli import main
from torch_deepstack.data import DeepstackDataset


def test_pack_directory_and_npy(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    files = {"a": b"1" * 5000, "d/b": b"", "c": bytes(range(256)) * 40}
    for k, v in files.items():
        (src / k).write_bytes(v)
    fsdir = str(tmp_path / "fs")
    assert main(["pack", str(src), "/ds/files", "--fs", fsdir, "--quiet", "--shard-bytes", "8K"]) == 0
    assert main(["pack", str(src), "/ds/files", "--fs", fsdir, "--quiet"]) == 1  # exists, no --overwrite
    assert "overwrite" in capsys.readouterr().err
    arr = np.random.default_rng(0).standard_normal((50, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", arr)
    assert main(["pack", str(tmp_path / "a.npy"), "/ds/arr", "--fs", fsdir, "--quiet"]) == 0
    assert main(["pack", "--info", "/ds/files", "--fs", fsdir]) == 0
    assert '"samples": 3' in capsys.readouterr().out
    ds = DeepstackDataset(fsdir, "/ds/files")
    assert [ds.name(i) for i in range(3)] == sorted(files)
    assert [bytes(ds[i].numpy()) for i in range(3)] == [files[k] for k in sorted(files)]
    assert torch.equal(DeepstackDataset(fsdir, "/ds/arr", batched=True).read_batch(range(50)),
                       torch.from_numpy(arr))
    assert main(["pack", str(tmp_path / "missing"), "/ds/x", "--fs", fsdir]) == 1
    assert "does not exist" in capsys.readouterr().err
