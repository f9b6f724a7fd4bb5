"""Keys and CurveZMQ (transport/keys.py, transport/channel.py): key files, the trusted list, and a gate that admits
only the keys its domain allows — an untrusted or plain peer is refused in the handshake, before any message of it
reaches the server."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from homespec.errors import ConfigError
from homespec.transport.channel import Gatekeeper, HandshakeWatch, curve_client, curve_server
from homespec.transport.keys import KeyPair, check_key, load_or_create, trust, trusted_heads, untrust


def pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def test_key_pairs_are_made_once_in_private_files(tmp_path: Path) -> None:
    head = load_or_create("head", tmp_path)
    assert load_or_create("head", tmp_path) == head
    assert load_or_create("worker", tmp_path) != head
    for name in ("head.key", "worker.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
    assert zmq.curve_public(head.secret.encode()).decode() == head.public


def test_the_trusted_list_takes_keys_with_any_z85_character(tmp_path: Path) -> None:
    keys = [pair().public for _ in range(40)]
    hashed = next(k for k in keys if "#" in k)  # z85 has '#': it must not read as a comment
    for i, k in enumerate(keys):
        assert trust(k, f"head {i}", tmp_path)
    assert not trust(hashed, "again", tmp_path)
    known = trusted_heads(tmp_path)
    assert list(known) == keys and known[keys[3]] == "head 3"
    assert untrust(hashed, tmp_path) and hashed not in trusted_heads(tmp_path)
    assert not untrust(hashed, tmp_path)
    assert stat.S_IMODE((tmp_path / "trusted_heads").stat().st_mode) == 0o600


@pytest.mark.parametrize("bad", ["", "short", "~" * 40, "x" * 20 + " " + "x" * 19, "é" * 40, pair().public + "0"])
def test_a_malformed_key_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a CurveZMQ public key"):
        check_key(bad)


def test_the_gate_admits_the_allowed_key_and_refuses_others_before_reading_them() -> None:
    server, good, bad = pair(), pair(), pair()
    ctx = zmq.Context()
    allowed = {good.public}
    keeper = Gatekeeper(ctx)
    keeper.allow("head", lambda: allowed)
    srv = curve_server(ctx.socket(zmq.ROUTER), server, "head")
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    try:
        outcomes = {}
        for name, keys in (("good", good), ("bad", bad), ("plain", None)):
            sock = ctx.socket(zmq.DEALER)
            if keys is not None:
                curve_client(sock, keys, server.public)
            watch = HandshakeWatch(sock)
            sock.connect(f"tcp://127.0.0.1:{port}")
            state = watch.wait(5.0)
            sock.send(name.encode())
            received = srv.poll(500)
            outcomes[name] = (state, received and srv.recv_multipart(copy=False))
            watch.close()
            sock.close(linger=0)
        state, frames = outcomes["good"]
        assert state == "connected" and frames[1].bytes == b"good"
        assert frames[1].get("User-Id") == good.public  # the server knows who sent it
        assert outcomes["bad"] == ("refused", False) and outcomes["plain"] == ("refused", False)
        assert keeper.gate.refused == {"head": 1} and keeper.gate.admitted == {"head": 1}
        allowed.add(bad.public)  # the list is asked at every handshake: trusting needs no restart
        sock = curve_client(ctx.socket(zmq.DEALER), bad, server.public)
        watch = HandshakeWatch(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        assert watch.wait(5.0) == "connected"
        watch.close()
        sock.close(linger=0)
    finally:
        srv.close(linger=0)
        keeper.stop()
        ctx.term()


def test_a_client_with_the_wrong_server_key_never_connects() -> None:
    server, client = pair(), pair()
    ctx = zmq.Context()
    keeper = Gatekeeper(ctx)
    keeper.allow("head", lambda: {client.public})
    srv = curve_server(ctx.socket(zmq.ROUTER), server, "head")
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    try:
        sock = curve_client(ctx.socket(zmq.DEALER), client, pair().public)  # an impostor's key for the server
        watch = HandshakeWatch(sock)
        sock.connect(f"tcp://127.0.0.1:{port}")
        assert watch.wait(1.0) != "connected"
        sock.send(b"secret")
        assert not srv.poll(300)
        watch.close()
        sock.close(linger=0)
    finally:
        srv.close(linger=0)
        keeper.stop()
        ctx.term()
