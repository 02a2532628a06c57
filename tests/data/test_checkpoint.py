"""The DCP backend: model+optimizer state round trips (single process and gloo multi-rank in spawned
processes), and a save killed mid-way leaves the previous checkpoint loadable."""
import logging
import multiprocessing as mp
import os
import time
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import torch_deepstack.storage as st
from torch_deepstack.data import DeepstackStorageReader, DeepstackStorageWriter

import datahelpers
from datahelpers import full_state, make_model_and_optim

warnings.filterwarnings("ignore", message=".*assuming the intent is to")


def _join_all(procs, timeout: float):
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join(5)
    assert not alive, f"{len(alive)} process(es) did not finish within {timeout} s"


def test_single_process_round_trip_and_versions(fs):
    model, optim = make_model_and_optim()
    state = full_state(model, optim, 0, 1.0)
    for _ in range(3):
        dcp.save(state, storage_writer=DeepstackStorageWriter(fs, "/ckpt/one", keep_last=2))
    assert sorted(fs.listdir("/ckpt/one")) == ["LATEST", "v00000002", "v00000003"]
    other, other_opt = make_model_and_optim(seed=9)
    got = full_state(other, other_opt, 0, 0.0)
    reader = DeepstackStorageReader(fs, "/ckpt/one")
    dcp.load(got, storage_reader=reader)
    reader.close()
    for k, v in datahelpers._flatten(state).items():
        assert torch.equal(v, datahelpers._flatten(got)[k]) if isinstance(v, torch.Tensor) else True
    old = {"rank0": torch.zeros(1000)}
    dcp.load(old, storage_reader=DeepstackStorageReader(fs, "/ckpt/one", version="v00000002"))
    assert torch.equal(old["rank0"], state["rank0"])


def test_missing_checkpoint_is_a_clear_error(fs, caplog):
    with pytest.raises(FileNotFoundError, match="no committed checkpoint"):
        DeepstackStorageReader(fs, "/ckpt/none").read_metadata()
    with caplog.at_level(logging.ERROR, logger="torch_deepstack.data.checkpoint"):
        with pytest.raises(CheckpointException) as err:          # DCP names the failing rank
            dcp.load({"x": torch.zeros(2)}, storage_reader=DeepstackStorageReader(fs, "/ckpt/none"))
    if "metadata is None" in str(err.value):     # torch 2.10's DCP drops the reader's error: it must be in the log
        assert "no committed checkpoint at /ckpt/none" in caplog.text
    else:
        assert "no committed checkpoint at /ckpt/none" in str(err.value)


@pytest.mark.timeout(240)
def test_gloo_multi_rank_save_and_load(fs_dir, fs, tmp_path):
    uri = fs.uri
    ctx = mp.get_context("spawn")
    world = 2
    procs = [ctx.Process(target=datahelpers.dcp_rank_worker, args=(r, world, str(tmp_path / "store"), uri,
                                                                   str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    _join_all(procs, 200)
    assert [p.exitcode for p in procs] == [0] * world
    assert all((tmp_path / f"ok{r}").exists() for r in range(world))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", ["after_data", "after_metadata"])
def test_killed_save_leaves_previous_checkpoint(fs_dir, tmp_path, stage):
    st.connect(fs_dir).close()  # create the file system; the saver process connects to it by URI
    uri = "file://" + fs_dir
    marker = str(tmp_path / "parked")
    proc = mp.get_context("spawn").Process(target=datahelpers.dcp_crashing_saver, args=(uri, marker, stage))
    proc.start()
    deadline = time.monotonic() + 180
    while not os.path.exists(marker):
        assert proc.is_alive(), f"saver died early with exit code {proc.exitcode}"
        assert time.monotonic() < deadline, "saver never reached the point to kill it at"
        time.sleep(0.05)
    proc.kill()
    proc.join(10)
    with st.connect(fs_dir) as fs:
        assert fs.read_bytes("/ckpt/crash/LATEST") == b"v00000001"
        assert fs.exists("/ckpt/crash/v00000002")  # the killed save really had written its data
        got = {"w": torch.zeros(1 << 20), "b": torch.zeros(17)}
        reader = DeepstackStorageReader(fs, "/ckpt/crash")
        dcp.load(got, storage_reader=reader)
        reader.close()
        assert torch.equal(got["w"], torch.ones(1 << 20)) and torch.equal(got["b"], torch.ones(17))
        # The next save reuses the abandoned version number and commits normally.
        dcp.save({"w": torch.full((1 << 20,), 3.0), "b": torch.full((17,), 3.0)},
                 storage_writer=DeepstackStorageWriter(fs, "/ckpt/crash"))
        assert fs.read_bytes("/ckpt/crash/LATEST") == b"v00000002"
        dcp.load(got, storage_reader=DeepstackStorageReader(fs, "/ckpt/crash"))
        assert torch.equal(got["b"], torch.full((17,), 3.0))


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
def test_loads_without_close_do_not_leak_the_private_client(fs):
    """dcp.load never calls reader.close(): the private client a load opens must still be closed."""
    state = {"w": torch.arange(1000, dtype=torch.float32)}
    dcp.save(state, storage_writer=DeepstackStorageWriter(fs, "/ckpt/leak"))
    got = {"w": torch.zeros(1000)}
    dcp.load(got, storage_reader=DeepstackStorageReader(fs, "/ckpt/leak"))  # warm up (lazy imports, pools)
    before = _open_fds()
    readers = [DeepstackStorageReader(fs, "/ckpt/leak") for _ in range(5)]  # kept alive: no GC rescue
    for reader in readers:
        got = {"w": torch.zeros(1000)}
        dcp.load(got, storage_reader=reader)
        assert torch.equal(got["w"], state["w"])
    assert _open_fds() <= before
    readers[0].close()  # an explicit close after the load stays harmless
    reader = DeepstackStorageReader(fs, "/ckpt/leak")  # one reader, loaded twice: each load connects anew
    for _ in range(2):
        got = {"w": torch.zeros(1000)}
        dcp.load(got, storage_reader=reader)
        assert torch.equal(got["w"], state["w"])
    assert _open_fds() <= before


def test_explicit_close_after_read_metadata_closes_the_private_client(fs):
    dcp.save({"w": torch.ones(10)}, storage_writer=DeepstackStorageWriter(fs, "/ckpt/meta"))
    reader = DeepstackStorageReader(fs, "/ckpt/meta")
    reader.read_metadata()
    private = reader._private
    assert private is not None and not private._closed
    reader.close()
    assert private._closed and reader._private is None
    reader.close()
