"""Bad `deepstack` arguments end in one clear line naming the argument and a non-zero exit, never a traceback.

Parser-level checks run in-process (fast); only the short demo run uses a subprocess.
"""
import os
import subprocess
import sys

import pytest
import torch

from torch_deepstack.cli import build_parser, main


def _parse_error(capsys, *argv) -> str:
    """argv must be refused by argparse (exit 2); returns its one-line error."""
    with pytest.raises(SystemExit) as exc:
        build_parser([argv[0]]).parse_args(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _run(capsys, *argv) -> tuple[int, str]:
    rc = main(list(argv))
    return rc, capsys.readouterr().err


@pytest.fixture
def fs_dir(tmp_path):
    """An embedded file system holding /dir/h.txt."""
    from torch_deepstack import storage

    root = tmp_path / "fs"
    with storage.connect(str(root)) as fs:
        fs.mkdir("/dir")
        with fs.open("/dir/h.txt", "wb") as f:
            f.write(b"hello")
    return str(root)


# --- fs bench --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("opt,value", [("--block-size", "0"), ("--size", "-4K"), ("--iodepth", "-1"),
                                       ("--iodepth", "0")])
def test_fs_bench_rejects_non_positive(capsys, opt, value):
    # OPT=VALUE: argparse would take a lone "-4K" for an unknown option, not a value
    err = _parse_error(capsys, "fs", "bench", "--fs", "/nonexistent", f"{opt}={value}")
    assert f"argument {opt}" in err


def test_fs_bench_block_larger_than_size(capsys, fs_dir):
    rc, err = _run(capsys, "fs", "bench", "--fs", fs_dir, "--path", "/b", "--size", "4K", "--block-size", "8K",
                   "--seconds", "0.1")
    assert rc == 2 and "--block-size" in err and "--size" in err


# --- fs serve: ports --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,opt", [(["--port", "99999"], "--port"), (["--port", "-1"], "--port"),
                                      (["--manager", "localhost:70000"], "--manager")])
def test_fs_serve_port_range(capsys, argv, opt):
    err = _parse_error(capsys, "fs", "serve", "storage", *argv)
    assert f"argument {opt}" in err and "65535" in err


# --- fs get -----------------------------------------------------------------------------------------------------
def test_fs_get_into_existing_directory(capsys, fs_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    rc, err = _run(capsys, "fs", "get", "/dir/h.txt", str(out), "--fs", fs_dir)
    assert rc == 0, err
    assert (out / "h.txt").read_bytes() == b"hello"
    assert not (tmp_path / "out.part").exists()


def test_fs_get_failure_leaves_no_part_file(capsys, fs_dir, tmp_path):
    out = tmp_path / "out"
    (out / "h.txt").mkdir(parents=True)  # the target name is taken by a directory: the final rename fails
    rc, err = _run(capsys, "fs", "get", "/dir/h.txt", str(out), "--fs", fs_dir)
    assert rc == 1 and err.startswith("error:")
    leftovers = list(tmp_path.rglob("*.part"))
    assert not leftovers, leftovers


# --- jit prebuild (every case exits before anything is compiled) -------------------------------------------------
@pytest.mark.parametrize("jobs", ["-1", "0", "x"])
def test_jit_jobs_must_be_positive(capsys, jobs):
    err = _parse_error(capsys, "jit", "prebuild", "-j", jobs, "--area", "quant")
    assert "argument -j/--jobs" in err


def test_jit_unknown_area(capsys):
    rc, err = _run(capsys, "jit", "prebuild", "--area", "nosuch")
    assert rc == 2
    assert "--area" in err and "nosuch" in err and "known areas" in err
    assert len(err.strip().splitlines()) == 1


# --- pack -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"not a pickle\n", b"", b"PK\x03\x04" + b"\0" * 64],
                         ids=["garbage", "empty", "bad-zip"])
def test_pack_corrupt_pt(capsys, tmp_path, content):
    src = tmp_path / "bad.pt"
    src.write_bytes(content)
    rc, err = _run(capsys, "pack", str(src), "/g", "--fs", str(tmp_path / "fs"), "--quiet")
    assert rc == 1
    assert str(src) in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("value", ["abc", "0", "-8"])
def test_pack_align_named(capsys, value):
    err = _parse_error(capsys, "pack", "src", "/dest", "--align", value)
    assert "argument --align" in err


def test_pack_align_accepts_auto_and_int():
    p = build_parser(["pack"])
    assert p.parse_args(["pack", "--align", "auto"]).align == "auto"
    assert p.parse_args(["pack", "--align", "4096"]).align == 4096


# --- demo -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,opt", [(["--device", "bogus"], "--device"), (["--steps", "0"], "--steps"),
                                      (["--samples", "8"], "--samples"), (["--workers", "-1"], "--workers")])
def test_demo_bad_arguments(capsys, argv, opt):
    err = _parse_error(capsys, "demo", *argv)
    assert f"argument {opt}" in err


def test_demo_root_is_a_file(capsys, tmp_path):
    root = tmp_path / "rootfile"
    root.touch()
    rc, err = _run(capsys, "demo", "--root", str(root), "--steps", "1", "--samples", "16", "--workers", "0",
                   "--device", "cpu")
    assert rc == 2 and "--root" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_demo_cuda_without_gpu(capsys, tmp_path):
    rc, err = _run(capsys, "demo", "--device", "cuda", "--root", str(tmp_path), "--steps", "1", "--samples", "16",
                   "--workers", "0")
    assert rc == 2 and "--device" in err


def test_demo_loss_trend_windows_do_not_overlap():
    from torch_deepstack.demo import loss_trend

    assert loss_trend([4.0]) is None                          # one step: no trend to check
    assert loss_trend([4.0, 3.0]) == (4.0, 3.0)
    assert loss_trend([5.0, 4.0, 3.0]) == (5.0, 3.0)          # the middle step is in neither window
    assert loss_trend([float(10 - i) for i in range(10)]) == (8.0, 3.0)
    assert loss_trend([float(40 - i) for i in range(40)]) == (38.0, 3.0)   # default run: 5-step windows


@pytest.mark.timeout(300)
def test_demo_short_run_succeeds(tmp_path):
    # Two steps on one repeated batch: the loss goes down, and the check must see it (it used to compare the
    # same steps with themselves and always fail).
    proc = subprocess.run([sys.executable, "-m", "torch_deepstack.cli", "demo", "--steps", "2", "--samples", "16",
                           "--workers", "0", "--device", "cpu", "--root", str(tmp_path)],
                          capture_output=True, text=True, timeout=280, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "did not go down" not in proc.stdout
