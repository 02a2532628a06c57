"""`deepstack pack`: pack many small samples into large shard files plus an index on deepstack storage.

    deepstack pack ./images /datasets/images --fs /data/fs          # a directory: one sample per file
    deepstack pack features.npy /datasets/feats --fs /data/fs       # an array: one sample per row
    deepstack pack --info /datasets/images --fs /data/fs            # describe a packed dataset

The file system comes from --fs (a directory, file:///dir or deepstack://host:port) or $DEEPSTACK_FS; a
cluster's secret from --secret-file, $DEEPSTACK_FS_SECRET or $DEEPSTACK_FS_SECRET_FILE.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

from torch_deepstack.cli_args import int_at_least

_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _size(text: str) -> int:
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        return int(float(t[:-1]) * _UNITS[t[-1]]) if t and t[-1] in _UNITS else int(t)
    except (ValueError, IndexError):
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 4096, 64M, 1G)") from None


def _align(text: str) -> int | str:
    # What PackWriter accepts: "auto" or a positive byte count; checked here so the error names --align.
    if text.strip().lower() == "auto":
        return "auto"
    return int_at_least(1, " bytes, or 'auto'")(text)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pack", help="pack small samples into shard files + index on deepstack storage",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", nargs="?", help="a local directory (one sample per file), a .npy file or a .pt "
                                              "tensor file (one sample per row)")
    p.add_argument("dest", nargs="?", help="the packed dataset's directory on storage, e.g. /datasets/train")
    p.add_argument("--fs", default=None, help="file system: a directory, file:///dir or deepstack://host:port "
                                              "(default $DEEPSTACK_FS)")
    p.add_argument("--secret-file", default=None, help="file holding the cluster's shared secret")
    p.add_argument("--shard-bytes", type=_size, default="256M", help="start a new shard past this size (256M)")
    p.add_argument("--align", type=_align, default="auto",
                   help="'auto' (page-align samples >= 4 KiB), 1 (tight) or bytes")
    p.add_argument("--pattern", default=None, help="only files whose relative path matches this glob")
    p.add_argument("--overwrite", action="store_true", help="replace an existing pack at dest (atomically)")
    p.add_argument("--info", metavar="DEST", default=None, help="describe the packed dataset at DEST and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _connect(args):
    from torch_deepstack import storage

    uri = args.fs or os.environ.get(storage.ENV_URI)
    if not uri:
        raise ValueError("no file system: pass --fs DIR|deepstack://host:port or set $DEEPSTACK_FS")
    secret = None
    if args.secret_file:
        with open(args.secret_file, "rb") as f:
            secret = f.read().strip()
    return storage.connect(uri, secret=secret, create=not uri.startswith("deepstack://"))


def _load_source(src: str):
    if os.path.isdir(src):
        return src
    if not os.path.exists(src):
        raise FileNotFoundError(f"source {src!r} does not exist")
    if src.endswith(".npy"):
        import numpy as np

        return np.load(src, mmap_mode="r")
    if src.endswith((".pt", ".pth")):
        import torch

        try:
            obj = torch.load(src, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            # torch.load's own messages run to a paragraph (or are empty, for EOFError): give one line.
            if isinstance(e, EOFError):
                why = "the file is empty or truncated"
            elif isinstance(e, pickle.UnpicklingError):
                why = "not a tensor file that torch.load(weights_only=True) can read"
            else:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise ValueError(f"cannot load {src!r}: {why}") from None
        if not isinstance(obj, torch.Tensor):
            raise ValueError(f"{src} holds a {type(obj).__name__}, expected one tensor")
        return obj
    raise ValueError(f"source {src!r} must be a directory, a .npy file or a .pt tensor file")


def run(args) -> int:
    from torch_deepstack.data import load_index, pack

    fs = None
    try:
        fs = _connect(args)
        if args.info:
            ix = load_index(fs, args.info)
            m = ix.meta
            print(json.dumps({"path": args.info, "samples": len(ix), "bytes": ix.total_bytes,
                              "sample_type": m["sample_type"], "dtype": m.get("dtype"), "shape": m.get("shape"),
                              "shards": len(m["shards"]), "version": m["version"], "pack_id": m["pack_id"],
                              "created": m.get("created")}, indent=2))
            return 0
        if not args.source or not args.dest:
            print("deepstack pack: give SOURCE and DEST (or --info DEST)", file=sys.stderr)
            return 2
        t0 = time.perf_counter()
        ix = pack(fs, args.dest, _load_source(args.source), progress=not args.quiet, pattern=args.pattern,
                  shard_bytes=args.shard_bytes, align=args.align, overwrite=args.overwrite)
        dt = time.perf_counter() - t0
        print(f"packed {len(ix)} samples ({ix.total_bytes / 1e6:.1f} MB) into {len(ix.shard_names)} shard(s) at "
              f"{args.dest} on {fs.uri} in {dt:.1f} s ({ix.total_bytes / 1e6 / max(dt, 1e-9):.0f} MB/s)")
        return 0
    except (FileExistsError, FileNotFoundError, ValueError, TypeError, OSError) as e:
        print(f"deepstack pack: {e}", file=sys.stderr)
        return 1
    finally:
        if fs is not None:
            fs.close()
