"""fsck: verify every chunk's CRC32C on every target, repair corrupt replicas from healthy ones, and
(optionally) drop orphan chunks whose file no longer exists."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch_deepstack.storage.client import FileSystem


@dataclass
class FsckReport:
    chunks: int = 0
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (target, chunk): bad CRC, missing or stale
    repaired: list[tuple[str, str]] = field(default_factory=list)
    unrepairable: list[tuple[str, str]] = field(default_factory=list)
    orphans_removed: int = 0

    @property
    def clean(self) -> bool:
        return not self.unrepairable and len(self.repaired) == len(self.corrupt)

    def summary(self) -> str:
        return (f"{self.chunks} chunks checked, {len(self.corrupt)} corrupt, {len(self.repaired)} repaired, "
                f"{len(self.unrepairable)} unrepairable, {self.orphans_removed} orphan chunks removed")


def _live_chunk_prefixes(fs: FileSystem) -> set[str]:
    fs.meta.purge_trash()  # finish directory removals a crash interrupted; their chunks become orphans
    return {f"{ino:016x}" for ino in (int(k) for k in fs.meta.all_file_inodes())}


def fsck(fs: FileSystem, *, repair: bool = True, gc: bool = False) -> FsckReport:
    from torch_deepstack.storage.local import LocalBackend

    rep = FsckReport()
    if isinstance(fs.backend, LocalBackend):
        eng = fs.backend.engine
        live = _live_chunk_prefixes(fs) if gc else None
        for cid, m in eng.list_chunks().items():
            if m.committed is None:
                continue
            if live is not None and cid.split("-")[0] not in live:
                eng.remove(cid)
                rep.orphans_removed += 1
                continue
            rep.chunks += 1
            if not eng.verify(cid):
                rep.corrupt.append((eng.target_id, cid))
                rep.unrepairable.append((eng.target_id, cid))  # one replica: nothing to repair from
        return rep

    backend = fs.backend
    routing = backend.refresh()
    for chain_id, chain in routing["chains"].items():
        serving = [t["id"] for t in chain["targets"] if t["state"] == "serving"]
        bad_by_target = {}
        for tid in serving:
            res, _ = backend.service_call(tid, "verify", {"target": tid})
            rep.chunks += res["chunks"]
            bad_by_target[tid] = {b["chunk"] for b in res["corrupt"]}
            rep.corrupt += [(tid, b["chunk"]) for b in res["corrupt"]]
        # Replicas must agree: a chunk missing from a serving replica, or older there, is damage too.
        dumps = {tid: backend.service_call(tid, "dump_meta", {"target": tid})[0] for tid in serving}
        newest: dict[str, int] = {}
        for d in dumps.values():
            for cid, m in d.items():
                newest[cid] = max(newest.get(cid, 0), m["committed"])
        for tid, d in dumps.items():
            for cid, ver in newest.items():
                if cid not in bad_by_target[tid] and (cid not in d or d[cid]["committed"] < ver):
                    bad_by_target[tid].add(cid)
                    rep.corrupt.append((tid, cid))
        for tid, bad in bad_by_target.items():
            for cid in sorted(bad):
                sources = [s for s in serving if s != tid and cid not in bad_by_target[s]
                           and dumps[s].get(cid, {}).get("committed") == newest.get(cid)]
                done = False
                for src in sources if repair else []:
                    try:
                        backend.service_call(src, "repair", {"source": src, "dest": tid, "chunk": cid})
                        rep.repaired.append((tid, cid))
                        done = True
                        break
                    except Exception:  # noqa: BLE001 - try the next healthy replica
                        continue
                if not done:
                    rep.unrepairable.append((tid, cid))
    if gc:
        live = _live_chunk_prefixes(fs)
        for chain_id, chain in routing["chains"].items():
            head = chain["targets"][0]["id"]
            res, _ = backend.service_call(head, "dump_meta", {"target": head})
            orphans = [c for c in res if c.split("-")[0] not in live]
            if orphans:
                backend.remove_chunks([(chain_id, c) for c in orphans])
                rep.orphans_removed += len(orphans)
    return rep
