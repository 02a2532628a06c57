"""Cluster manager (3FS's mgmtd) with the metadata service built in.

* Membership by heartbeat leases: a storage service that has not heartbeated for `lease` seconds is dead, and
  its targets leave their chains' serving set.
* Chain tables and public target states (serving / syncing / waiting / lastsrv / offline), persisted in the
  same KV engine as the metadata, so a restarted manager recovers them (leases restart with a grace period).
* The metadata service: stateless `MetaStore` operations over the KV engine, exposed as `meta.*` RPCs.

State transitions, applied per chain after every heartbeat and lease expiry (each change bumps the chain
version, and the chain is re-ordered serving -> syncing -> waiting -> lastsrv/offline, head first):

    offline/waiting + heartbeat          -> waiting
    waiting, chain has a serving target  -> syncing      (predecessor copies the chunks it lacks)
    waiting, chain never served          -> serving      (a fresh, empty chain)
    syncing + local "uptodate"           -> serving      (sync done)
    serving + service restarted          -> syncing if another target serves, else stays serving
    lastsrv + heartbeat                  -> serving      (it holds the newest data)
    serving + lease expired              -> lastsrv if it was the chain's last serving target, else offline
    syncing/waiting + lease expired      -> offline
"""
from __future__ import annotations

import json
import logging
import threading
import time

from torch_deepstack.storage.errors import InvalidArgument, NotFound
from torch_deepstack.storage.kv import KVEngine, open_kv
from torch_deepstack.storage.meta import DEFAULT_CHUNK_SIZE, MetaStore
from torch_deepstack.storage.rpc import RpcServer

log = logging.getLogger("torch_deepstack.storage.manager")

STATES = ("serving", "syncing", "waiting", "lastsrv", "offline")
_ORDER = {"serving": 0, "syncing": 1, "waiting": 2, "lastsrv": 3, "offline": 3}
CFG_KEY = b"Ccfg"
CHAIN_PREFIX = b"Cchain/"


def make_chain_table(services: list[str], targets_per_service: int, replicas: int) -> dict[str, list[str]]:
    """Chains of `replicas` targets on distinct services, heads rotated so write load spreads."""
    if replicas < 1 or replicas > len(services):
        raise InvalidArgument(f"replicas must be in [1, {len(services)}] (number of services), got {replicas}")
    if len(set(services)) != len(services):
        raise InvalidArgument(f"service ids must be unique: {services}")
    ordered = [f"{s}-t{j}" for j in range(targets_per_service) for s in services]
    if len(ordered) % replicas:
        raise InvalidArgument(f"{len(ordered)} targets cannot be split into chains of {replicas}")
    chains = {}
    for k in range(len(ordered) // replicas):
        group = ordered[k * replicas:(k + 1) * replicas]
        if len({t.rsplit("-t", 1)[0] for t in group}) != replicas:
            raise InvalidArgument(f"chain {k} would hold two replicas on one service: {group}; use a service "
                                  f"count that is a multiple of the replica count")
        rot = k % replicas
        chains[f"c{k}"] = group[rot:] + group[:rot]
    return chains


def mkfs_cluster(kv: KVEngine, services: list[str], *, targets_per_service: int = 1, replicas: int = 3,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, stripe: int = 4) -> dict:
    chains = make_chain_table(services, targets_per_service, replicas)

    def fn(t):
        if t.get(CFG_KEY) is not None:
            raise InvalidArgument("this metadata store already holds a cluster (refusing to re-format)")
        cfg = {"format": 1, "replicas": replicas, "services": services, "chains": sorted(chains),
               "created": time.time()}
        t.put(CFG_KEY, json.dumps(cfg).encode())
        for cid, targets in chains.items():
            t.put(CHAIN_PREFIX + cid.encode(), json.dumps({
                "id": cid, "version": 1, "fresh": True,
                "targets": [{"id": tid, "state": "offline"} for tid in targets]}).encode())
        return cfg
    cfg = kv.transaction(fn)
    MetaStore(kv).init(chunk_size=chunk_size, stripe=stripe)
    return cfg


class Manager:
    META_METHODS = ("stat", "inode", "listdir", "mkdir", "create", "set_length", "rename", "remove",
                    "all_file_inodes", "purge_trash")

    def __init__(self, kv: KVEngine | str, secret: bytes, host: str = "127.0.0.1", port: int = 0,
                 lease: float = 3.0):
        self.kv = open_kv(kv) if isinstance(kv, str) else kv
        raw = self.kv.get(CFG_KEY)
        if raw is None:
            raise NotFound("no cluster in this metadata store: run `deepstack fs mkfs --kv ... --services ...`")
        self.cfg = json.loads(raw)
        self.lease = lease
        self.meta = MetaStore(self.kv, chain_table=lambda: list(self.cfg["chains"]))
        self._lock = threading.Lock()
        self._chains: dict[str, dict] = {}
        self._services: dict[str, dict] = {}  # sid -> {"address", "last_seen"} (memory only: leases)
        self._local: dict[str, str] = {}  # target -> last reported local state
        self._restarted: set[str] = set()  # targets whose service (re)started since the last evaluation
        self._load_chains()
        self._stop = threading.Event()
        handlers = {"heartbeat": self._rpc_heartbeat, "routing": lambda a, p: (self.routing(), None)}
        for m in self.META_METHODS:
            handlers["meta." + m] = self._meta_handler(m)
        self.server = RpcServer(handlers, secret, host, port, name="manager")

    # ------------------------------------------------------------------ persistence
    def _load_chains(self) -> None:
        for _, v in self.kv.scan(CHAIN_PREFIX):
            c = json.loads(v)
            self._chains[c["id"]] = c
        # After a restart every service gets one fresh lease before it can be declared dead.
        now = time.monotonic()
        for c in self._chains.values():
            for t in c["targets"]:
                sid = t["id"].rsplit("-t", 1)[0]
                self._services.setdefault(sid, {"address": None, "last_seen": now})

    def _save(self, changed: list[dict]) -> None:
        def fn(t):
            for c in changed:
                t.put(CHAIN_PREFIX + c["id"].encode(), json.dumps(c).encode())
        self.kv.transaction(fn)

    # ------------------------------------------------------------------ state machine
    def _alive(self, sid: str, now: float) -> bool:
        s = self._services.get(sid)
        return s is not None and s["address"] is not None and now - s["last_seen"] <= self.lease

    def _evaluate(self, chain: dict, now: float) -> bool:
        old = json.dumps(chain["targets"])
        ts = chain["targets"]
        for t in ts:
            sid = t["id"].rsplit("-t", 1)[0]
            if self._alive(sid, now):
                continue
            if t["state"] == "serving":
                others = [o for o in ts if o is not t and o["state"] == "serving"]
                t["state"] = "offline" if others else "lastsrv"
            elif t["state"] in ("syncing", "waiting"):
                t["state"] = "offline"
        for t in ts:
            sid = t["id"].rsplit("-t", 1)[0]
            if not self._alive(sid, now):
                continue
            local = self._local.get(t["id"], "online")
            if t["state"] == "offline":
                t["state"] = "waiting"
            elif t["state"] == "lastsrv":
                t["state"] = "serving"
            elif t["state"] == "syncing" and local == "uptodate":
                t["state"] = "serving"
            elif t["state"] == "serving" and local == "online" and t["id"] in self._restarted:
                # Its service restarted while the chain still listed it: it may have missed writes.
                if any(o is not t and o["state"] == "serving" for o in ts):
                    t["state"] = "syncing"
        serving = any(t["state"] == "serving" for t in ts)
        lastsrv = any(t["state"] == "lastsrv" for t in ts)
        for t in ts:
            if t["state"] == "waiting":
                if serving:
                    t["state"] = "syncing"
                elif chain.get("fresh") and not lastsrv:
                    t["state"] = "serving"
                    serving = True
        if serving:
            chain["fresh"] = False
        ts.sort(key=lambda t: _ORDER[t["state"]])  # stable: keeps the order within a state
        if json.dumps(ts) != old:
            chain["version"] += 1
            log.info("chain %s v%d: %s", chain["id"], chain["version"],
                     ", ".join(f"{t['id']}={t['state']}" for t in ts))
            return True
        return False

    def _evaluate_all(self) -> None:
        now = time.monotonic()
        changed = [c for c in self._chains.values() if self._evaluate(c, now)]
        self._restarted.clear()
        if changed:
            self._save(changed)

    def heartbeat(self, service_id: str, address: str, targets: dict[str, str], boot: str = "") -> dict:
        if not isinstance(service_id, str) or not isinstance(address, str) or not isinstance(targets, dict):
            raise InvalidArgument("heartbeat needs service_id (str), address (str), targets (dict)")
        known = {t["id"] for c in self._chains.values() for t in c["targets"]}
        for tid, state in targets.items():
            if tid not in known:
                raise InvalidArgument(f"target {tid!r} is not in any chain of this cluster")
            if not tid.startswith(service_id + "-t"):
                raise InvalidArgument(f"target {tid!r} does not belong to service {service_id!r}")
            if state not in ("online", "uptodate"):
                raise InvalidArgument(f"bad local state {state!r} for {tid}")
        with self._lock:
            prev = self._services.get(service_id)
            if prev is None or prev.get("boot") != boot:
                self._restarted.update(targets)  # a new incarnation of the service
            self._services[service_id] = {"address": address, "last_seen": time.monotonic(), "boot": boot}
            self._local.update(targets)
            self._evaluate_all()
            return self.routing_locked()

    def check_leases(self) -> None:
        with self._lock:
            self._evaluate_all()

    def routing_locked(self) -> dict:
        addr = {}
        for c in self._chains.values():
            for t in c["targets"]:
                sid = t["id"].rsplit("-t", 1)[0]
                s = self._services.get(sid)
                addr[t["id"]] = s["address"] if s else None
        return {"chains": {cid: {"version": c["version"], "targets": [dict(t) for t in c["targets"]]}
                           for cid, c in self._chains.items()},
                "addresses": addr, "lease": self.lease}

    def routing(self) -> dict:
        with self._lock:
            return self.routing_locked()

    # ------------------------------------------------------------------ RPC glue
    def _rpc_heartbeat(self, args, payload):
        boot = args.get("boot", "")
        if not isinstance(boot, str):
            raise InvalidArgument("boot must be a str")
        return self.heartbeat(args.get("service_id"), args.get("address"), args.get("targets"), boot), None

    def _meta_handler(self, name):
        fn = getattr(self.meta, name)

        def handler(args, payload):
            a, kw = args.get("args", []), args.get("kwargs", {})
            if not isinstance(a, list) or not isinstance(kw, dict) or len(a) > 4:
                raise InvalidArgument(f"meta.{name}: args must be a short list and kwargs a dict")
            return fn(*a, **kw), None
        return handler

    def _lease_loop(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.check_leases()
            except Exception:  # noqa: BLE001 - keep the manager alive; the next round retries
                log.exception("lease check failed")

    def start(self) -> "Manager":
        self.server.start()
        threading.Thread(target=self._lease_loop, name="manager-lease", daemon=True).start()
        log.info("manager listening on %s", self.server.address)
        return self

    @property
    def address(self) -> str:
        return self.server.address

    def stop(self) -> None:
        self._stop.set()
        self.server.stop()
        self.kv.close()
