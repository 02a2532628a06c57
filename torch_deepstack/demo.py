"""`deepstack demo`: the whole stack end to end on the embedded defaults.

1. storage: an embedded deepstack file system in a local directory (chunk engine, direct I/O, CRC32C);
2. data: a synthetic token corpus packed into it, read back through DataLoader workers with batched reads;
3. training: a tiny DeepSeek-V3-style model (MLA attention, a top-k MoE whose experts run as grouped FP8 GEMMs
   in FP8Experts, reached through ep.Buffer dispatch/combine over a torch.distributed group);
4. checkpoint: torch.distributed.checkpoint save and load through the deepstack storage backend;
5. serving: greedy decoding with MLA decode over a paged KV cache, checked against the full forward pass,
   and the prompt's KV blocks offloaded to storage and restored.

Runs on CPU (every op falls back to its reference kernel) or on an sm_90 GPU (CUDA kernels).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

from torch_deepstack.cli_args import int_at_least

VOCAB = 128
BATCH = 16  # sequences per training step; the loader drops a short last batch


def _device(text: str) -> str:
    # Only what the demo can run on; other torch device strings fail deep inside (no NCCL/gloo backend, etc.).
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto, got {text!r}")
    return text


def add_parser(sub):
    p = sub.add_parser("demo", help="end-to-end demo: storage -> data -> FP8/MoE/MLA training -> checkpoint -> decode")
    p.add_argument("--root", help="directory for the embedded file system (default: a temporary directory)")
    p.add_argument("--steps", type=int_at_least(1), default=40, help="training steps (default 40)")
    p.add_argument("--samples", type=int_at_least(BATCH, " (one training batch)"), default=2048,
                   help="sequences in the packed corpus")
    p.add_argument("--workers", type=int_at_least(0), default=2, help="DataLoader workers")
    p.add_argument("--device", type=_device, default="auto",
                   help="cpu, cuda or auto (cuda when an sm_90 GPU is present)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def next_token(x):
    """The synthetic language: each token determines the next (a permutation of the vocabulary)."""
    return (5 * x + 3) % VOCAB


def make_corpus(n: int, length: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    seqs = torch.empty(n, length, dtype=torch.int64)
    seqs[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, length):
        seqs[:, t] = next_token(seqs[:, t - 1])
    return seqs


def _pick_device(name: str):
    import torch
    if name == "auto":
        ok = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
        return torch.device("cuda" if ok else "cpu")
    return torch.device(name)


def _usage_error(msg: str) -> int:
    print(f"deepstack demo: error: {msg}", file=sys.stderr)
    return 2


def loss_trend(losses: list[float]) -> tuple[float, float] | None:
    """Mean loss over the first and the last up-to-5 steps, in windows that never overlap (so a short run is
    not compared with itself); None for a single step, which has no trend."""
    w = min(5, len(losses) // 2)
    if w == 0:
        return None
    return sum(losses[:w]) / w, sum(losses[-w:]) / w


def _init_group(root: Path, device):
    import torch.distributed as dist
    if not dist.is_initialized():
        store = dist.FileStore(str(root / "pg-store"), 1)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    return dist.group.WORLD


def run(args) -> int:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from tqdm.auto import tqdm

    import torch_deepstack  # noqa: F401
    from torch_deepstack import storage
    from torch_deepstack.data import DeepstackDataset, DeepstackStorageReader, DeepstackStorageWriter, pack
    from torch_deepstack.ep import Buffer
    from torch_deepstack.models import TinyDeepSeek, TinyDeepSeekConfig

    torch.manual_seed(args.seed)
    device = _pick_device(args.device)
    if device.type == "cuda" and not (torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()):
        return _usage_error(f"argument --device: {args.device} is not available here "
                            f"({torch.cuda.device_count()} CUDA device(s)); use --device cpu or auto")
    if args.root and os.path.exists(args.root) and not os.path.isdir(args.root):
        return _usage_error(f"argument --root: {args.root!r} exists and is not a directory")
    tmp = None if args.root else tempfile.TemporaryDirectory(prefix="deepstack-demo-")
    root = Path(args.root or tmp.name)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return _usage_error(f"argument --root: cannot create {str(root)!r}: {e.strerror or e}")
    report: list[tuple[str, str]] = []
    t_start = time.perf_counter()
    print(f"deepstack demo on {device}, embedded file system at {root / 'fs'}")

    # 1-2. storage + data ---------------------------------------------------------------------------------------
    fs = storage.connect(str(root / "fs"))
    seq_len = 33
    corpus = make_corpus(args.samples, seq_len, args.seed)
    t0 = time.perf_counter()
    index = pack(fs, "/demo/tokens", corpus, progress=True, overwrite=True)
    report.append(("packed corpus", f"{len(index)} sequences x {seq_len} tokens in {time.perf_counter() - t0:.2f}s"))
    ds = DeepstackDataset(str(root / "fs"), "/demo/tokens", batched=True)
    loader = torch.utils.data.DataLoader(ds, batch_size=BATCH, shuffle=True, num_workers=args.workers,
                                         collate_fn=ds.collate_fn, drop_last=True,
                                         persistent_workers=args.workers > 0)

    # 3. training ------------------------------------------------------------------------------------------------
    group = _init_group(root, device)
    buffer = Buffer(group, num_nvl_bytes=64 << 20)
    cfg = TinyDeepSeekConfig(vocab=VOCAB)
    model = TinyDeepSeek(cfg, buffer).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    batches = iter(loader)
    with tqdm(total=args.steps, desc="training", unit="step") as bar:
        for step in range(args.steps):
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            batch = batch.to(device)
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).float(), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    trend = loss_trend(losses)
    if trend is None:
        report.append(("training loss", f"{losses[0]:.3f} after 1 step (uniform = 4.852; no trend to check)"))
    else:
        report.append(("training loss", f"{trend[0]:.3f} -> {trend[1]:.3f} over {args.steps} steps "
                                        "(uniform = 4.852)"))

    # 4. checkpoint ----------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    dcp.save({"model": model.state_dict()}, storage_writer=DeepstackStorageWriter(fs, "/demo/ckpt"))
    restored = TinyDeepSeek(cfg, buffer).to(device)
    state = {"model": restored.state_dict()}
    dcp.load(state, storage_reader=DeepstackStorageReader(fs, "/demo/ckpt"))
    restored.load_state_dict(state["model"])
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), restored.state_dict().values()))
    if not same:
        raise RuntimeError("demo: the restored checkpoint differs from the saved model")
    report.append(("checkpoint", f"saved and restored through deepstack storage in {time.perf_counter() - t0:.2f}s, "
                                 "bit-identical"))

    # 5. decoding over the paged MLA cache ---------------------------------------------------------------------
    restored.eval()
    prompts = make_corpus(4, 64, args.seed + 1).to(device)       # one full 64-token page per request
    gen_len = 16
    caches = restored.new_caches(prompts.shape[0], device)
    with torch.no_grad():
        logits = restored.prefill(prompts, caches)
        tokens = [logits.argmax(-1)]
        first_step = restored.decode_step(tokens[0], caches, prompts.shape[1])
        full = restored(torch.cat([prompts, tokens[0][:, None]], 1))[:, -1].float()
        consistency = (first_step.float() - full).abs().max().item()
        tokens.append(first_step.argmax(-1))
        for p in range(prompts.shape[1] + 1, prompts.shape[1] + gen_len - 1):
            tokens.append(restored.decode_step(tokens[-1], caches, p).argmax(-1))
    generated = torch.stack(tokens, 1)
    expected = torch.empty_like(generated)
    prev = prompts[:, -1]
    for t in range(gen_len):
        prev = next_token(prev)
        expected[:, t] = prev
    acc = (generated == expected).float().mean().item()
    report.append(("MLA decode vs full forward", f"max |logit diff| {consistency:.3g} (bf16 paged cache)"))
    report.append(("greedy decoding accuracy", f"{100 * acc:.0f}% of {generated.numel()} tokens follow the rule"))
    report.append(("KV-cache offload", _kv_offload(fs, restored, caches, prompts, device)))

    dist.destroy_process_group()
    fs.close()
    report.append(("total time", f"{time.perf_counter() - t_start:.1f}s"))
    width = max(len(k) for k, _ in report)
    print("\n" + "\n".join(f"{k:<{width}}  {v}" for k, v in report))
    if tmp is not None:
        tmp.cleanup()
    if trend is not None and trend[1] >= trend[0]:
        print("warning: the training loss did not go down", flush=True)
        return 1
    return 0


def _kv_offload(fs, model, caches, prompts, device) -> str:
    """Offload request 0's full prompt pages of every layer by prefix key, restore them into fresh caches, and
    check the restored blocks and the next decode step against the originals."""
    import torch

    from torch_deepstack.data.kvcache import KVCacheStore

    store = KVCacheStore(fs, "/demo/kv")
    tokens = prompts[0].tolist()
    t0 = time.perf_counter()
    saved = sum(store.offload(c, 0, tokens, namespace=f"layer{i}") for i, c in enumerate(caches))
    fresh = model.new_caches(1, device)
    held = [store.restore(c, 0, tokens, namespace=f"layer{i}") for i, c in enumerate(fresh)]
    seconds = time.perf_counter() - t0
    for old, new in zip(caches, fresh):
        n = len(new.blocks_of(0))
        a = old.k_cache[torch.tensor(old.blocks_of(0)[:n], device=old.k_cache.device)]
        b = new.k_cache[torch.tensor(new.blocks_of(0), device=new.k_cache.device)]
        if not torch.equal(a, b):
            raise RuntimeError("demo: KV blocks restored from storage differ from the originals")
    if min(held) != prompts.shape[1]:
        raise RuntimeError(f"demo: restored {held} tokens per layer, expected {prompts.shape[1]}")
    return f"{saved} pages saved by prefix key, restored bit-identical into a fresh cache in {seconds:.3f}s"
