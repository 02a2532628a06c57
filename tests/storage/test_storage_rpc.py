"""RPC authentication: a wrong secret, a tampered frame and a replayed frame are all refused."""
from __future__ import annotations

import socket
import struct

import pytest

from torch_deepstack.storage.errors import AuthError, InvalidArgument, NotFound
from torch_deepstack.storage.rpc import NONCE_BYTES, RpcClient, RpcServer, _Channel


@pytest.fixture
def server():
    calls = []

    def echo(args, payload):
        calls.append(args)
        return {"echo": args.get("x"), "len": len(payload)}, bytes(payload)[::-1]

    def missing(args, payload):
        raise NotFound("nothing here")
    s = RpcServer({"echo": echo, "missing": missing}, b"right", name="test").start()
    s.calls = calls
    yield s
    s.stop()


def test_roundtrip_and_remote_errors(server):
    c = RpcClient(server.host, server.port, b"right", timeout=5)
    r, payload = c.call("echo", {"x": 5}, b"abc")
    assert r == {"echo": 5, "len": 3} and bytes(payload) == b"cba"
    buf = bytearray(4)
    r, payload = c.call("echo", {}, b"wxyz", sinks=lambda h: [memoryview(buf)])
    assert buf == b"zyxw"  # received straight into the caller's buffer
    with pytest.raises(NotFound, match="nothing here"):
        c.call("missing")
    with pytest.raises(InvalidArgument, match="unknown method"):
        c.call("nope")
    c.close()


def test_wrong_secret_is_refused(server):
    c = RpcClient(server.host, server.port, b"wrong", timeout=5)
    with pytest.raises(AuthError):
        c.call("echo", {"x": 1})
    assert server.calls == []  # the handler never ran
    c.close()


def test_server_refuses_empty_secret():
    with pytest.raises(AuthError):
        RpcServer({}, b"")


def _raw_channel(server):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    nonce = b""
    while len(nonce) < NONCE_BYTES:
        nonce += sock.recv(NONCE_BYTES - len(nonce))
    return sock, _Channel(sock, b"right", nonce, is_server=False)


def test_tampered_and_replayed_frames_are_refused(server):
    sock, ch = _raw_channel(server)
    ch.send({"m": "echo", "a": {"x": 1}}, b"p")
    header, _ = ch.recv()
    assert header["ok"]
    # Replay: resend a frame with an old sequence number.
    ch.send_seq -= 1
    ch.send({"m": "echo", "a": {"x": 2}}, b"p")
    with pytest.raises(AuthError, match="refused"):
        ch.recv()
    sock.close()
    assert [c["x"] for c in server.calls] == [1]

    # Tamper: flip a byte of the header after the MAC was computed.
    sock, ch = _raw_channel(server)
    sent = []
    real = sock.sendmsg

    class Tamper:
        def sendmsg(self, parts):
            data = bytearray(b"".join(bytes(p) for p in parts))
            data[-5] ^= 1
            sent.append(1)
            return real([bytes(data)]) and len(data)
    ch.sock = Tamper()
    ch.send({"m": "echo", "a": {"x": 3}}, b"payload")
    ch.sock = sock
    with pytest.raises(AuthError):
        ch.recv()
    sock.close()
    assert [c["x"] for c in server.calls] == [1]


def test_garbage_is_refused(server):
    sock = socket.create_connection((server.host, server.port), timeout=5)
    sock.recv(NONCE_BYTES)
    sock.sendall(struct.pack("<I", 1 << 31) + b"\0" * 100)
    data = sock.recv(4096)
    assert b"auth" in data  # one refusal frame, then the server closes
    sock.close()
    assert server.calls == []
