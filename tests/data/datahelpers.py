"""Helpers shared by the data tests (imported by name: tests/ has no packages)."""
import numpy as np


def random_bytes_samples(n: int, max_len: int = 9000, seed: int = 0) -> list[bytes]:
    """Samples of random sizes (0 .. max_len), so offsets fall anywhere relative to 4 KiB pages and chunks."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(0, max_len)), dtype=np.uint8).tobytes() for _ in range(n)]


def as_list(batch):
    """collate_fn keeping the list of samples (importable by spawned workers, unlike a lambda)."""
    return batch


def sample_bytes(s) -> bytes:
    return bytes(s.numpy())


# ---------------------------------------------------------------- checkpoint test workers (run in spawned processes)
def make_model_and_optim(seed: int = 0):
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(2):
        model(torch.randn(8, 16)).square().mean().backward()
        optim.step()
        optim.zero_grad()
    return model, optim


def full_state(model, optim, rank: int, scale: float):
    import torch

    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, f"rank{rank}": torch.full((1000 + rank,), scale * (rank + 1))}


def dcp_rank_worker(rank: int, world: int, store_path: str, uri: str, out_dir: str):
    """Save twice from every rank (gloo), then load into fresh objects and compare with the second save."""
    import os

    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from torch_deepstack.data import DeepstackStorageReader, DeepstackStorageWriter

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        model, optim = make_model_and_optim()
        dcp.save(full_state(model, optim, rank, 1.0), storage_writer=DeepstackStorageWriter(uri, "/ckpt/run"))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        want = full_state(model, optim, rank, 2.0)
        dcp.save(want, storage_writer=DeepstackStorageWriter(uri, "/ckpt/run"))
        fresh_model, fresh_optim = make_model_and_optim(seed=123)
        got = full_state(fresh_model, fresh_optim, rank, 0.0)
        reader = DeepstackStorageReader(uri, "/ckpt/run")
        dcp.load(got, storage_reader=reader)
        reader.close()
        flat_want, flat_got = _flatten(want), _flatten(got)
        assert flat_want.keys() == flat_got.keys()
        for k, v in flat_want.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, flat_got[k]), k
            else:
                assert v == flat_got[k], k
        dist.barrier()
        open(os.path.join(out_dir, f"ok{rank}"), "w").close()
    finally:
        dist.destroy_process_group()


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dcp_crashing_saver(uri: str, marker: str, stage: str):
    """Commit one save (ones), then start a second (twos) and park at `stage` until killed."""
    import time

    import torch
    import torch.distributed.checkpoint as dcp

    from torch_deepstack.data import DeepstackStorageWriter

    class Parking(DeepstackStorageWriter):
        def write_data(self, plan, planner):
            fut = super().write_data(plan, planner)
            if stage == "after_data":
                fut.wait()
                _park(marker)
            return fut

        def finish(self, metadata, results):
            if stage == "after_metadata":  # DCP's .metadata is in place; only the LATEST commit is missing
                super(DeepstackStorageWriter, self).finish(metadata, results)
                _park(marker)
            super().finish(metadata, results)

    big = {"w": torch.ones(1 << 20), "b": torch.ones(17)}
    dcp.save(big, storage_writer=DeepstackStorageWriter(uri, "/ckpt/crash"))
    dcp.save({k: v * 2 for k, v in big.items()}, storage_writer=Parking(uri, "/ckpt/crash"))
    time.sleep(0.1)


def _park(marker: str):
    import time

    open(marker, "w").close()
    time.sleep(120)
