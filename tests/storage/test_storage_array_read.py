"""The array read path (FileSystem.read_array, and batch_read routed through it): one native call plans, reads
and CRC-checks a whole batch. Every result is compared with the bytes written and with the general path."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

import torch_deepstack.storage as st
from tests.storage.torn_reads import torn_chunk_reads
from torch_deepstack.storage import ChunkCorrupt, InvalidArgument, ReadRequest, array_read, fastio, pyrows

CS = 64 << 10


@pytest.fixture(params=["io_uring", "native-aio", "pure-python"])
def mode(request, monkeypatch):
    if request.param == "pure-python":
        monkeypatch.setattr(fastio, "_lib", None)
        monkeypatch.setattr(fastio, "_tried", True)
        return request.param
    if fastio.load() is None:
        pytest.skip(f"C helper unavailable: {fastio.reason}")
    if request.param == "native-aio":
        monkeypatch.setattr(fastio, "_uring_ok", False)
        monkeypatch.setattr(fastio, "_tls", threading.local())
    elif not fastio.uring():
        pytest.skip("io_uring unavailable here")
    return request.param


@pytest.fixture
def fs(tmp_path, mode):
    f = st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False)
    yield f
    f.close()


def _random_file(fs, path, rng, size, hole_at=None):
    data = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    with fs.open(path, "wb") as f:
        if hole_at is None:
            f.write(data)
        else:  # leave chunk `hole_at` unwritten: it reads back as zeros
            a, b = hole_at * CS, (hole_at + 1) * CS
            f.write(data[:a])
            f.seek(b)
            f.write(data[b:])
            data[a:b] = bytes(b - a)
    return bytes(data)


def _random_requests(rng, size, n):
    offs, lens = [], []
    for _ in range(n):
        kind = rng.integers(0, 6)
        if kind == 0:  # page-aligned page
            o, ln = int(rng.integers(0, size // 4096)) * 4096, 4096
        elif kind == 1:  # unaligned inside a chunk
            o = int(rng.integers(0, size))
            ln = int(rng.integers(1, 9000))
        elif kind == 2:  # across a chunk boundary
            c = int(rng.integers(1, size // CS))
            o, ln = c * CS - int(rng.integers(1, 5000)), int(rng.integers(5000, 2 * CS))
        elif kind == 3:  # past the end of the file
            o, ln = size - int(rng.integers(0, 3000)), int(rng.integers(1, 6000))
        elif kind == 4:  # zero length, or wholly past the end
            o, ln = (int(rng.integers(0, size)), 0) if rng.integers(0, 2) else (size + 100, 50)
        else:  # a whole chunk
            o, ln = int(rng.integers(0, size // CS)) * CS, CS
        offs.append(o)
        lens.append(ln)
    return np.array(offs, np.int64), np.array(lens, np.int64)


def _expected(data, o, ln):
    return data[o:o + ln]


def test_read_array_matches_written_bytes(fs):
    rng = np.random.default_rng()
    size = 9 * CS + 1234
    data = _random_file(fs, "/a", rng, size, hole_at=3)
    offs, lens = _random_requests(rng, size, 300)
    # destinations: some page-aligned (direct landing), some not
    pads = rng.integers(0, 2, len(offs)) * int(rng.integers(1, 4095))
    slots = np.cumsum(-(-lens // 4096) * 4096 + 8192) - (-(-lens // 4096) * 4096 + 8192)
    out_offsets = slots + pads
    raw = np.zeros(int(out_offsets[-1] + lens[-1]) + 8192, np.uint8)
    out = raw[(-raw.ctypes.data) % 4096:]
    for rep in range(2):  # the second pass runs on the cached chunk table
        out[:] = 0xAB
        with fs.open("/a") as f:
            res = fs.read_array(f, offs, lens, out, out_offsets)
        assert res.ok, res.errors
        for k, (o, ln, d) in enumerate(zip(offs.tolist(), lens.tolist(), out_offsets.tolist())):
            want = _expected(data, o, ln)
            assert res.nbytes[k] == len(want), (k, o, ln)
            assert bytes(out[d:d + len(want)]) == want, (k, o, ln)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("defer", ["1", "0"])
def test_read_array_every_wait_mode(tmp_path, monkeypatch, defer):
    """Batches that poll for completions (spin_us > 0: the thread's plain io_uring) and batches that sleep for
    them (spin_us = 0: its DEFER_TASKRUN companion ring, or the plain ring where DEEPSTACK_URING_DEFER=0 or the
    kernel refuses the flags), of 1, 16 and 300 reads (more than one ring's worth), land the written bytes."""
    if fastio.load() is None or not fastio.uring():
        pytest.skip("needs the C helper and io_uring")
    monkeypatch.setenv("DEEPSTACK_URING_DEFER", defer)  # read when a thread makes its rings
    rng = np.random.default_rng()
    errors = []

    def run(spin_us):
        try:
            with st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False, spin_us=spin_us) as fs:
                data = _random_file(fs, f"/w{spin_us}", rng, 6 * CS + 777, hole_at=1)
                for n in (1, 16, 300):
                    offs, lens = _random_requests(rng, len(data), n)
                    out = np.full(int(lens.sum()) + 1, 0xAB, np.uint8)
                    with fs.open(f"/w{spin_us}") as f:
                        res = fs.read_array(f, offs, lens, out)
                    assert res.ok, res.errors
                    pos = 0
                    for k, (o, ln) in enumerate(zip(offs.tolist(), lens.tolist())):
                        want = _expected(data, o, ln)  # short past the end of the file
                        assert res.nbytes[k] == len(want) and bytes(out[pos:pos + len(want)]) == want, \
                            (spin_us, n, o, ln)
                        pos += ln
        except BaseException as e:  # noqa: BLE001 - reported by the test thread
            errors.append(e)

    for spin_us in (100, 0):
        t = threading.Thread(target=run, args=(spin_us,))  # a new thread makes its rings under this env
        t.start()
        t.join(100)
        assert not t.is_alive(), "read hung"
    if errors:
        raise errors[0]


def test_batch_read_native_equals_general_path(fs, monkeypatch):
    """batch_read with File requests goes through the array path; the general path must give the same."""
    rng = np.random.default_rng()
    size = 6 * CS + 77
    data = _random_file(fs, "/b", rng, size)
    offs, lens = _random_requests(rng, size, 120)
    f = fs.open("/b")

    def run():
        bufs = [np.full(int(ln) + 7, 0xCD, np.uint8)[: int(ln)] if k % 3 else None for k, ln in enumerate(lens)]
        reqs = [ReadRequest(f, int(o), int(ln), b, k) for k, (o, ln, b) in enumerate(zip(offs, lens, bufs))]
        reqs.append(ReadRequest(f, -5, 10, None, "neg"))  # a bad request: reported, the others still served
        res = fs.batch_read(reqs)
        return [(r.userdata, r.nbytes, None if r.data is None else bytes(r.data), type(r.error)) for r in res]

    native = run()
    monkeypatch.setattr(fs.backend, "array_reads", lambda: False)
    general = run()
    assert native == general
    for k, (o, ln) in enumerate(zip(offs.tolist(), lens.tolist())):
        assert native[k][2] == _expected(data, o, ln)
    assert native[-1][3] is InvalidArgument


def test_batch_read_in_waves_equals_general_path(fs, monkeypatch):
    """A batch of 16+ requests on open Files is read in waves (io_uring: the first rows go to the device while
    Python builds the rest); tuples and ReadRequests, two files, chunks loaded for the first time in both waves,
    chunk-crossing, unaligned and past-EOF requests: results equal the general path's and the bytes written.
    A request the native path refuses after the first wave was submitted sends the whole batch to the general
    path (the wave in flight finishes first)."""
    rng = np.random.default_rng()
    a = _random_file(fs, "/wa", rng, 7 * CS + 123, hole_at=2)
    b = _random_file(fs, "/wb", rng, 3 * CS)
    fa, fb = fs.open("/wa"), fs.open("/wb")
    offs_a, lens_a = _random_requests(rng, len(a), 90)
    offs_b, lens_b = _random_requests(rng, len(b), 30)
    plan = [(fa, a, int(o), int(ln)) for o, ln in zip(offs_a, lens_a)] + \
           [(fb, b, int(o), int(ln)) for o, ln in zip(offs_b, lens_b)]
    order = rng.permutation(len(plan))
    plan = [plan[k] for k in order]

    def run(bad_at=None):
        reqs = []
        for k, (f, _, o, ln) in enumerate(plan):
            buf = np.full(ln + 5, 0xCD, np.uint8)[:ln] if k % 4 else None
            reqs.append((f, o, ln, buf, k) if k % 2 else ReadRequest(f, o, ln, buf, k))
        if bad_at is not None:
            reqs.insert(bad_at, (fa, -1, 10, None, "bad"))
        res = fs.batch_read(reqs)
        return [(r.userdata, r.nbytes, None if r.data is None else bytes(r.data), type(r.error)) for r in res]

    native = run()
    again = run()  # tables now loaded
    late_bad = run(bad_at=fs.WAVE_FIRST + 3)
    monkeypatch.setattr(fs.backend, "array_reads", lambda: False)
    general = run()
    assert native == general and again == general
    for k, (_, data, o, ln) in enumerate(plan):
        assert native[k][:3] == (k, len(_expected(data, o, ln)), _expected(data, o, ln)), k
    bad = late_bad.pop(fs.WAVE_FIRST + 3)
    assert bad[0] == "bad" and bad[3] is InvalidArgument
    assert late_bad == general


def test_batch_read_native_buffer_kinds_equal_general_path(fs, monkeypatch):
    """batch_read's native path takes each destination's address by type (numpy arrays of any dtype and shape,
    CPU tensors, bytearrays, memoryviews, no buffer at all); every kind lands the written bytes, `data` (made on
    first access) views exactly them inside the caller's buffer, and results equal the general path's. Buffers
    the native path cannot use (read-only, non-contiguous, too small, a non-CPU tensor) are reported per
    request as the general path reports them."""
    rng = np.random.default_rng()
    size = 5 * CS + 321
    data = _random_file(fs, "/k", rng, size)
    f = fs.open("/k")
    kinds = ["u8", "f32_2d", "tensor", "tensor_i16_2d", "bytearray", "memoryview", "none"]

    def make(kind, ln):
        if kind == "u8":
            return np.full(ln + 3, 0xCD, np.uint8)[:ln]
        if kind == "f32_2d":
            return np.zeros((-(-ln // 8), 2), np.float32)  # >= ln bytes
        if kind == "tensor":
            return torch.full((ln,), 7, dtype=torch.uint8)
        if kind == "tensor_i16_2d":
            return torch.zeros(-(-ln // 4), 2, dtype=torch.int16)
        if kind == "bytearray":
            return bytearray(ln + 11)
        if kind == "memoryview":
            return memoryview(bytearray(ln + 2))
        return None

    def run():
        reqs, outs = [], []
        for k in range(70):
            kind = kinds[k % len(kinds)]
            o = int(rng.integers(0, size)) if k % 5 else int(rng.integers(0, size // CS)) * CS
            ln = int(rng.integers(0, 3 * CS)) if k % 9 else 0  # some cross chunks, some run past the end
            out = make(kind, max(ln, 1))
            outs.append(out)
            reqs.append((f, o, ln, out, k) if k % 2 else ReadRequest(f, o, ln, out, k))
        bad = [(f, 0, 64, np.zeros(64, np.uint8), "ok"),
               (f, 0, 64, np.frombuffer(bytes(64), np.uint8), "readonly"),
               (f, 0, 64, np.zeros(128, np.uint8)[::2], "strided"),
               (f, 0, 64, torch.zeros(8, 16, dtype=torch.uint8).t(), "tensor-strided"),
               (f, 0, 64, bytearray(10), "small"),
               (f, 0, 64, torch.zeros(64, dtype=torch.uint8, device="meta"), "meta")]
        got = []  # the good requests in one batch (the native path), the bad ones in another (a refused
        for r, q in zip(fs.batch_read(reqs) + fs.batch_read(bad), reqs + bad):  # buffer sends its whole batch on)
            out = q[3] if isinstance(q, tuple) else q.out
            d = None if r.data is None else bytes(r.data)
            if r.error is None and out is not None:  # data views the bytes inside the caller's buffer
                flat = out.reshape(-1).view(torch.uint8).numpy() if isinstance(out, torch.Tensor) else \
                    np.frombuffer(memoryview(out).cast("B"), np.uint8)
                assert bytes(flat[:r.nbytes]) == d
            got.append((r.userdata, r.nbytes, d, type(r.error)))
        return got, [(q[1], q[2]) if isinstance(q, tuple) else (q.offset, q.length) for q in reqs]

    rng_state = rng.bit_generator.state
    native, spans = run()
    rng.bit_generator.state = rng_state
    monkeypatch.setattr(fs.backend, "array_reads", lambda: False)
    general, spans2 = run()
    assert spans == spans2 and native == general
    for k, (o, ln) in enumerate(spans):
        assert native[k][:3] == (k, len(_expected(data, o, ln)), _expected(data, o, ln)), k
    errors = {u: e for u, _, _, e in native[len(spans):]}
    assert errors["ok"] is type(None)
    for name in ("readonly", "strided", "tensor-strided", "small", "meta"):
        assert errors[name] is InvalidArgument, name


def test_batch_read_native_buffer_kinds_alone_take_the_native_path(fs, monkeypatch):
    """The buffer kinds above are served by the native path itself (not handed to the general path)."""
    if not fs.backend.array_reads():
        pytest.skip("no native path in this mode")
    rng = np.random.default_rng()
    data = _random_file(fs, "/n", rng, 3 * CS)
    f = fs.open("/n")
    monkeypatch.setattr(type(fs), "_batch_read_general",
                        lambda self, reqs, timeout: pytest.fail("general path used"))
    outs = [np.zeros(4096, np.uint8), np.zeros((512, 2), np.float32), torch.zeros(4096, dtype=torch.uint8),
            bytearray(4096), memoryview(bytearray(4096)), None]
    res = fs.batch_read([(f, 4096 * k + 5, 4096, out) for k, out in enumerate(outs)] + [(f, 7, 0)])
    for k, r in enumerate(res[:-1]):
        assert r.ok and r.nbytes == 4096 and bytes(r.data) == data[4096 * k + 5:4096 * (k + 1) + 5]
    assert res[-1].ok and res[-1].nbytes == 0 and bytes(res[-1].data) == b""


def test_batch_read_c_parser_equals_python_loop_and_general_path(fs, monkeypatch):
    """Batches of 4+ requests are parsed in C (pyrows.cpp) where it builds: tuples and ReadRequests, three
    files (two met first mid-batch, so parsing resumes after each is registered), numpy / bytearray /
    memoryview / CPU tensors / no buffer; results equal the Python loop's and the general path's and the bytes
    written. A request the parser refuses (a tensor subclass, a chunk-crossing range) hands the batch to the
    Python loop.
    The buffer exports taken for the reads are released afterwards (a bytearray can grow again)."""
    from torch_deepstack.storage import pyrows

    if not fs.backend.array_reads() or pyrows.load() is None:
        pytest.skip(f"no native path or no C parser ({pyrows.reason})")
    rng = np.random.default_rng()
    files = {p: _random_file(fs, p, rng, n) for p, n in (("/p0", 3 * CS), ("/p1", 2 * CS + 99), ("/p2", CS))}
    handles = {p: fs.open(p) for p in files}
    parsed = []  # per call: whether the C-parsed path served the batch
    real = type(fs)._batch_read_parsed

    def spy(self, lib, reqs, timeout):
        res = real(self, lib, reqs, timeout)
        parsed.append(res is not None)
        return res
    monkeypatch.setattr(type(fs), "_batch_read_parsed", spy)
    arrays = []

    def batch(extra=None):
        reqs = []
        for k in range(40):
            p = ("/p0", "/p1", "/p2")[0 if k < 10 else k % 3]
            size = len(files[p])
            ln = int(rng.integers(1, 9000))
            o = int(rng.integers(0, size))
            o = min(o, (o // CS + 1) * CS - ln) if o % CS + ln > CS else o  # inside one chunk
            o = max(o, 0)
            kind = k % 6
            out = (np.zeros(ln + 3, np.uint8), bytearray(ln), memoryview(bytearray(ln + 1)), None,
                   torch.zeros(ln, dtype=torch.uint8), torch.zeros(-(-ln // 4), 2, dtype=torch.int16))[kind]
            arrays.append(out)
            reqs.append((handles[p], o, ln, out, k) if k % 2 else ReadRequest(handles[p], o, ln, out, k))
        if extra is not None:
            reqs.insert(7, extra)
        return reqs

    def run(reqs):
        res = fs.batch_read(reqs)
        return [(r.userdata, r.nbytes, None if r.data is None else bytes(r.data), type(r.error)) for r in res]

    reqs = batch()
    native = run(reqs)
    assert parsed == [True]  # parsed in C
    for (u, n, d, e), q in zip(native, reqs):
        f, o, ln = (q[0], q[1], q[2]) if isinstance(q, tuple) else (q.file, q.offset, q.length)
        want = files[f.path][o:o + ln]
        assert (n, d, e) == (len(want), want, type(None)), u
    monkeypatch.setattr(pyrows, "_lib", None)
    monkeypatch.setattr(pyrows, "_tried", True)
    assert run(reqs) == native  # the Python loop
    monkeypatch.setattr(fs.backend, "array_reads", lambda: False)
    assert run(reqs) == native  # the general path
    monkeypatch.undo()
    monkeypatch.setattr(type(fs), "_batch_read_parsed", spy)
    for extra in ((handles["/p0"], 5, 64, torch.nn.Parameter(torch.zeros(64, dtype=torch.uint8), requires_grad=False),
                   "a tensor subclass"),
                  (handles["/p0"], CS - 10, 100, None, "crossing")):
        reqs = batch(extra)
        got = run(reqs)
        assert parsed[-1] is False  # refused: the Python loop served it
        for (u, n, d, e), q in zip(got, reqs):
            f, o, ln = (q[0], q[1], q[2]) if isinstance(q, tuple) else (q.file, q.offset, q.length)
            assert (n, d, e) == (len(files[f.path][o:o + ln]), files[f.path][o:o + ln], type(None)), u
    for a in arrays:
        if isinstance(a, bytearray):
            a.extend(b"x")  # BufferError if an export had been left behind



def test_batch_read_results_made_in_c_match_python_ones(fs):
    """The parsed path's results come from pyrows.cpp (ds_rows_results fills ReadResult's slots without calling
    __init__): every field equals a ReadResult made in Python, they are garbage-collected objects like those, and
    no reference to the requests or buffers is gained or lost over many calls."""
    import gc
    import sys

    from torch_deepstack.storage import pyrows
    from torch_deepstack.storage.client import ReadResult

    if not fs.backend.array_reads() or pyrows.load() is None:
        pytest.skip(f"no native path or no C parser ({pyrows.reason})")
    rng = np.random.default_rng()
    data = _random_file(fs, "/r", rng, 2 * CS)
    f = fs.open("/r")
    bufs = [np.zeros(777, np.uint8) for _ in range(9)]
    reqs = [(f, int(rng.integers(0, 2 * CS - 777)) // 777 * 777 % (CS - 777), 700 + k, b, f"u{k}")
            for k, b in enumerate(bufs)]
    res = fs.batch_read(reqs)
    for q, r in zip(reqs, res):
        py = ReadResult(q, q[2], None, None, q[3])
        assert type(r) is ReadResult and gc.is_tracked(r)
        assert (r.nbytes, r.error, r.ok, r.userdata, bytes(r.data)) == \
            (py.nbytes, py.error, py.ok, py.userdata, bytes(py.data)) == (q[2], None, True, q[4], data[q[1]:q[1] + q[2]])
        assert r.request.offset == q[1] and r.request.out is q[3]
    del res, r, py
    gc.collect()
    before = [sys.getrefcount(x) for x in (*reqs, *bufs)]
    for _ in range(200):
        fs.batch_read(reqs)
    gc.collect()
    assert [sys.getrefcount(x) for x in (*reqs, *bufs)] == before


@pytest.mark.parametrize("head", ["0", "1"])
def test_reads_equal_with_and_without_a_submitted_head(fs, monkeypatch, head):
    """Batches of 3 or more reads send their first count / 4 (1-8) to io_uring ahead of the rest
    (src/storage/fastio.cpp, submit_head; DEEPSTACK_URING_HEAD=0 turns it off): either way every byte lands where
    it belongs, through read_array, batch_read and the general path's sessions."""
    monkeypatch.setenv("DEEPSTACK_URING_HEAD", head)
    rng = np.random.default_rng()
    data = _random_file(fs, "/h", rng, 3 * CS + 12345)
    f = fs.open("/h")
    for n in (3, 4, 9, 33, 64):
        offs = rng.integers(0, len(data) - 5000, n)
        lens = rng.integers(1, 5000, n)
        out = np.zeros(int(lens.sum()), np.uint8)
        res = fs.read_array(f, offs, lens, out)
        res.raise_first()
        assert bytes(out) == b"".join(data[o:o + ln] for o, ln in zip(offs.tolist(), lens.tolist()))
        got = fs.batch_read([(f, int(o), int(ln)) for o, ln in zip(offs, lens)])
        assert [bytes(r.data) for r in got] == [data[o:o + ln] for o, ln in zip(offs.tolist(), lens.tolist())]

def test_read_array_several_files_tensor_out_and_paths(fs):
    rng = np.random.default_rng()
    fs.mkdir("/m")
    a = _random_file(fs, "/m/a", rng, 3 * CS + 5)
    b = _random_file(fs, "/m/b", rng, 2 * CS)
    offs = np.array([0, 100, CS - 10, 4096, 3 * CS], np.int64)
    lens = np.array([4096, 5000, 20, 8192, 100], np.int64)
    which = np.array([0, 1, 0, 1, 0], np.int64)
    out = torch.zeros(int(lens.sum()), dtype=torch.uint8)
    res = fs.read_array(["/m/a", fs.open("/m/b")], offs, lens, out, which=which)
    assert res.ok
    pos = 0
    for k, (o, ln, w) in enumerate(zip(offs.tolist(), lens.tolist(), which.tolist())):
        want = (a, b)[w][o:o + ln]
        assert int(res.nbytes[k]) == len(want)
        assert bytes(out[pos:pos + len(want)].numpy()) == want
        pos += ln


def test_read_array_sees_writes_made_after_its_table(fs):
    rng = np.random.default_rng()
    _random_file(fs, "/w", rng, 4 * CS)
    f = fs.open("/w")
    out = np.zeros(CS, np.uint8)
    fs.read_array(f, [CS], [CS], out).raise_first()  # builds and caches the chunk table
    new = rng.integers(0, 256, CS, dtype=np.uint8).tobytes()
    with fs.open("/w", "r+b") as g:
        g.pwrite(new, CS)
    res = fs.read_array(f, [CS], [CS], out)
    assert res.ok and bytes(out) == new
    got = fs.batch_read([(f, CS + 10, 100, None)])[0]
    assert bytes(got.data) == new[10:110]


def test_read_array_detects_corruption(fs, mode, monkeypatch):
    rng = np.random.default_rng()
    _random_file(fs, "/c", rng, 2 * CS)
    f = fs.open("/c")
    out = np.zeros(2 * CS, np.uint8)
    assert fs.read_array(f, [0, CS], [CS, CS], out).ok  # cached table with the good CRCs
    eng = fs.backend.engine
    cid = f"{f.inode:016x}-{1:08x}"
    path = eng._data_path(cid, eng.meta(cid).committed.ver)
    with open(path, "r+b") as raw:
        raw.seek(5000)
        b = raw.read(1)
        raw.seek(5000)
        raw.write(bytes([b[0] ^ 0xFF]))
    res = fs.read_array(f, [0, CS + 4096, CS + 100], [CS, 4096, 50], out, [0, CS, 0])
    assert res.nbytes[0] == CS and 0 not in res.errors
    assert isinstance(res.errors.get(1), ChunkCorrupt)
    assert 2 not in res.errors  # the CRC block it lies in is intact
    with pytest.raises(ChunkCorrupt):
        res.raise_first()
    assert isinstance(fs.batch_read([(f, CS + 4096, 10, None)])[0].error, ChunkCorrupt)
    # A batch long enough for the C parser (its results made in C unless a request is left to the general path, as
    # the corrupt one is here): the request on the corrupt block fails alone, a read past the end is short, the rest
    # are whole.
    tail = _random_file(fs, "/c2", rng, CS + 1000)
    f2 = fs.open("/c2")
    bufs = [np.zeros(4096, np.uint8) for _ in range(6)]
    reqs = [(f, 0, 4096, bufs[0]), (f, CS + 4096, 4096, bufs[1]), (f, CS + 100, 50, bufs[2]), (f2, CS, 4096, bufs[3]),
            (f, 2 * CS, 10, bufs[4]), (f2, 4096, 4096, bufs[5])]
    parsed = fs._batch_read_parsed(pyrows.load(), reqs, None) if pyrows.load() is not None else None
    res = fs.batch_read(reqs)
    for got in (parsed, res) if parsed is not None and mode != "pure-python" else (res,):
        assert [r.nbytes for r in got if r.ok] == [4096, 50, 1000, 0, 4096]
        assert isinstance(got[1].error, ChunkCorrupt) and not got[1].ok
        assert bytes(got[3].data) == tail[CS:] and bytes(got[5].data) == tail[4096:8192]


def test_read_array_rejects_bad_arguments(fs):
    fs.write_bytes("/x", b"z" * 10000)
    f = fs.open("/x")
    out = np.zeros(100, np.uint8)
    with pytest.raises(InvalidArgument, match="out"):
        fs.read_array(f, [0], [200], out)
    with pytest.raises(InvalidArgument, match=">= 0"):
        fs.read_array(f, [-1], [10], out)
    with pytest.raises(InvalidArgument, match="integers"):
        fs.read_array(f, [0.5], [10], out)
    with pytest.raises(InvalidArgument, match="1-D"):
        fs.read_array(f, [0, 1], [10], out)
    with pytest.raises(InvalidArgument, match="file index"):
        fs.read_array(f, [0], [10], out, which=[1])
    with pytest.raises(InvalidArgument, match="read-only"):
        fs.read_array(f, [0], [10], b"immutable" * 20)
    with pytest.raises(st.IsADirectory):
        fs.mkdir("/d")
        fs.read_array("/d", [0], [1], out)
    assert fs.read_array(f, [], [], out).nbytes.shape == (0,)


def test_concurrent_writers_and_array_readers_never_see_torn_chunks(fs):
    n_chunks = 4

    def read_chunks(f):
        out = np.zeros(n_chunks * CS, np.uint8)
        res = fs.read_array(f, np.arange(n_chunks) * CS, np.full(n_chunks, CS), out)
        if not res.ok:
            return list(res.errors.values())
        return [bytes(out[c * CS:(c + 1) * CS]) for c in range(n_chunks)]

    problems = torn_chunk_reads(fs, "/shared", CS, n_chunks, n_writers=3, rounds=30, n_readers=2,
                                read_chunks=read_chunks, join_s=100)
    assert not problems, problems[:3]


def test_chunk_tables_give_fds_back(tmp_path, mode, monkeypatch):
    """Tables hold fds only while current: a full cache is dropped, and close() releases everything."""
    if mode == "pure-python":
        pytest.skip("no tables without the C helper")
    from torch_deepstack.storage import array_read

    monkeypatch.setattr(array_read, "MAX_OPEN", 3)
    fs = st.connect(str(tmp_path / "fs"), chunk_size=CS, sync=False)
    rng = np.random.default_rng()
    files = {p: _random_file(fs, p, rng, 3 * CS) for p in ("/f0", "/f1", "/f2")}
    out = np.zeros(CS, np.uint8)
    for _ in range(3):
        for p, data in files.items():
            for c in range(3):
                assert fs.read_array(p, [c * CS], [CS], out).ok and bytes(out) == data[c * CS:(c + 1) * CS]
    reader = fs.backend._arrays
    assert reader.open_fds <= 3 + 3  # one table of 3 chunks past the cap at most
    assert reader.open_fds == sum(len(t.handles) for t in reader.tables.values())
    fs.close()
    assert reader.open_fds == 0 and not reader.tables


def test_crc_many_matches_crc32c(mode):
    if mode == "pure-python":
        assert fastio.crc_many(0, [0], [1]) is None
        return
    from torch_deepstack.storage.crc import crc32c

    rng = np.random.default_rng()
    buf = rng.integers(0, 256, 100_000, dtype=np.uint8)
    starts = rng.integers(0, 50_000, 40)
    lens = rng.integers(0, 50_000, 40)
    got = fastio.crc_many(buf.ctypes.data, starts, lens)
    assert got.tolist() == [crc32c(buf[s:s + n].tobytes()) for s, n in zip(starts.tolist(), lens.tolist())]


CRC_CHECK = """
import sys, numpy as np
from torch_deepstack.storage import fastio
from torch_deepstack.storage.crc import crc32c
lib = fastio.load()
buf = np.random.default_rng(7).integers(0, 256, (1 << 20) + 64, dtype=np.uint8)
for k, n in enumerate(list(range(0, 1100)) + list(range(1100, 4200, 7)) + [65536 + 13, 1 << 20]):
    off, init = k % 17, (0, 0xFFFFFFFF, 0x1234567)[k % 3]
    assert lib.ds_crc32c(buf.ctypes.data + off, n, init) == crc32c(buf[off:off + n].tobytes(), init), (n, off)
print("ok")
"""


@pytest.mark.parametrize("wide", ["1", "0"])
def test_native_crc32c_every_kernel_matches(wide):
    """Both folding kernels (AVX-512 VPCLMULQDQ, 256 bytes a step, where the CPU has it; 128-bit PCLMULQDQ,
    64 bytes a step, with DEEPSTACK_CRC_AVX512=0) against the reference, in a fresh process each (the choice
    is made once per process): every length through several steps of both, unaligned starts, running values."""
    if fastio.load() is None:
        pytest.skip("no C helper")
    import subprocess
    import sys

    env = dict(os.environ, DEEPSTACK_CRC_AVX512=wide)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run([sys.executable, "-c", CRC_CHECK], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_native_crc32c_matches_crc32c_at_every_length_and_alignment():
    """The helper's CRC32C folds buffers of 256 bytes and more with carry-less multiplies (and runs the crc32
    instruction on the rest): every length around the fold's steps, unaligned starts, and a running value."""
    lib = fastio.load()
    if lib is None:
        pytest.skip("no C helper")
    from torch_deepstack.storage.crc import crc32c

    rng = np.random.default_rng(7)
    buf = rng.integers(0, 256, (1 << 20) + 64, dtype=np.uint8)
    lengths = list(range(0, 700)) + [1023, 1024, 1025, 2047, 2048, 2049, 4095, 4096, 4097, 65536, 65536 + 13,
                                     1 << 20]
    for k, n in enumerate(lengths):
        off, init = k % 17, (0, 0xFFFFFFFF, 0x1234567)[k % 3]
        got = lib.ds_crc32c(buf.ctypes.data + off, n, init)
        assert got == crc32c(buf[off:off + n].tobytes(), init), (n, off, init)
    out = np.empty(256, np.uint32)
    lib.ds_block_crcs(buf.ctypes.data, 1 << 20, 4096, out.ctypes.data)
    assert out.tolist() == [crc32c(buf[i:i + 4096].tobytes()) for i in range(0, 1 << 20, 4096)]


def test_read_array_checksums_come_from_the_block_checks(fs):
    """checksums=True: page-aligned whole-block requests (and ones ending at a chunk's end) get the CRC32C of
    their bytes combined from the blocks' CRCs; the others -1 (the caller checksums them)."""
    from torch_deepstack.storage.crc import crc32c

    data = np.random.default_rng(3).integers(0, 256, 3 * CS + 12345, dtype=np.uint8).tobytes()
    fs.write_bytes("/c", data)
    f = fs.open("/c")
    offs = np.array([0, 4096, 8192, 100, CS - 4096, 3 * CS, 2 * CS + 4096 * 5, len(data) - 100, 5000, CS])
    lens = np.array([4096, 8 * 4096, CS - 8192 - 10, 4096, 8192, 12345, 4096 * 7, 100, 0, CS])
    free = [True, True, False, False, False, True, True, False, False, True]
    out = bytearray(int(lens.sum()))
    res = fs.read_array(f, offs, lens, out, checksums=True)
    res.raise_first()
    if not array_read.supported():
        assert (res.crc32c == -1).all()
        return
    pos = 0
    for o, ln, n, c, want_free in zip(offs, lens, res.nbytes, res.crc32c, free):
        assert bytes(out[pos:pos + n]) == data[o:o + ln]
        assert (c >= 0) == want_free, (o, ln)
        if c >= 0:
            assert c == crc32c(data[o:o + ln])
        pos += ln
    assert fs.read_array(f, offs, lens, out).crc32c is None
    lib = fastio.load()
    a, b = data[:5000], data[5000:9096]
    assert lib.ds_crc32c_combine(crc32c(a), crc32c(b), len(b)) == crc32c(a + b)
    assert lib.ds_crc32c_combine(crc32c(b), crc32c(a), len(a)) == crc32c(b + a)


def test_whole_chunks_into_an_aligned_buffer(fs):
    """Page-aligned whole-chunk reads into a page-aligned buffer (the in-place case), the last chunk short."""
    rng = np.random.default_rng()
    size = 7 * CS + 3000
    data = _random_file(fs, "/big", rng, size)
    raw = np.zeros(8 * CS + 4096, np.uint8)
    out = raw[(-raw.ctypes.data) % 4096:][: 8 * CS]
    with fs.open("/big") as f:
        res = fs.read_array(f, np.arange(8) * CS, np.full(8, CS), out)
    assert res.ok and res.nbytes.tolist() == [CS] * 7 + [3000]
    assert bytes(out[:size]) == data


def test_file_too_large_for_a_table_uses_the_general_path(fs, mode, monkeypatch):
    from torch_deepstack.storage import array_read

    monkeypatch.setattr(array_read, "MAX_TABLE_BYTES", 100)
    rng = np.random.default_rng()
    data = _random_file(fs, "/huge", rng, 5 * CS + 10)
    offs, lens = _random_requests(rng, len(data), 60)
    out = np.zeros(int(lens.sum()), np.uint8)
    with fs.open("/huge") as f:
        res = fs.read_array(f, offs, lens, out)
    assert res.ok
    pos = 0
    for k, (o, ln) in enumerate(zip(offs.tolist(), lens.tolist())):
        want = data[o:o + ln]
        assert int(res.nbytes[k]) == len(want) and bytes(out[pos:pos + len(want)]) == want
        pos += ln
    if mode != "pure-python":
        assert all(t.nchunks == 0 for t in fs.backend._arrays.tables.values())


def test_removed_files_do_not_stay_open(fs, mode):
    """A chunk table holds fds; removing (or overwriting) the file must give them back at once, so the disk
    space is freed even if the reader never reads again."""
    rng = np.random.default_rng()
    _random_file(fs, "/gone", rng, 3 * CS)
    f = fs.open("/gone")
    assert fs.read_array(f, np.arange(3) * CS, np.full(3, CS), np.zeros(3 * CS, np.uint8)).ok
    root = fs.backend.engine.root

    def open_chunk_files():
        out = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(root) and ".v" in os.path.basename(target):
                out.append(target)
        return out

    fs.remove("/gone")
    assert open_chunk_files() == []


def test_parse_scratch_reused_per_thread_never_shared():
    """batch_read's parsed path reuses one set of small arrays per thread: a nested use on the same thread, another
    thread and batches past the reusable size get arrays of their own; a released set is reused."""
    from torch_deepstack.storage.client import _SCRATCH_ROWS, _parse_scratch, _release_scratch

    a = _parse_scratch(4)
    b = _parse_scratch(4)  # `a` still in use
    assert a[3] != b[3] and a[0].shape == b[0].shape == (4, 5)
    other = []
    t = threading.Thread(target=lambda: other.append(_parse_scratch(3)))
    t.start()
    t.join()
    assert other[0][3] not in (a[3], b[3])
    big = _parse_scratch(_SCRATCH_ROWS + 1)
    assert big[0].shape == (_SCRATCH_ROWS + 1, 5) and big[3] != a[3]
    for s in (big, b, a):
        _release_scratch(s)
    again = _parse_scratch(7)
    assert again[3] == a[3] and again[0].shape == (7, 5)
    _release_scratch(again)


@pytest.mark.timeout(120)
def test_small_batches_from_many_threads(fs, mode):
    """Threads each issuing many small batch_read calls (the reused parse arrays are per thread) read the bytes
    written."""
    rng = np.random.default_rng()
    data = _random_file(fs, "/t", rng, 5 * CS + 123)
    f = fs.open("/t")
    errors = []

    def reader(seed):
        r = np.random.default_rng(seed)
        try:
            for _ in range(150):
                n = int(r.integers(1, 9))
                offs = r.integers(0, len(data) - 4096, n).tolist()
                lens = r.integers(1, 4097, n).tolist()
                bufs = [bytearray(4096) for _ in range(n)]
                res = fs.batch_read([(f, o, k, b) for o, k, b in zip(offs, lens, bufs)])
                for o, k, b, x in zip(offs, lens, bufs, res):
                    assert x.error is None and x.nbytes == k and bytes(b[:k]) == data[o:o + k]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:2]
