"""Keys and CurveZMQ (transport/keys.py, transport/channel.py): key files, the trusted list, and a gate that admits
only the keys its domain allows — an untrusted or plain peer is refused in the handshake, before any message of it
reaches the server."""

from __future__ import annotations

import contextlib
import stat
from pathlib import Path

import pytest
import zmq

from homespec.errors import ConfigError
from homespec.transport.channel import Gatekeeper, HandshakeWatch, curve_client, curve_server
from homespec.transport.keys import (
    TRUSTED_WORKERS,
    KeyPair,
    check_key,
    fingerprint,
    load_or_create,
    trust,
    trusted_heads,
    trusted_workers,
    untrust,
)


def pair() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public.decode(), secret.decode())


def test_key_pairs_are_made_once_in_private_files(tmp_path: Path) -> None:
    folder = tmp_path / "made"  # a folder HomeSpec creates is private
    head = load_or_create("head", folder)
    assert load_or_create("head", folder) == head
    assert load_or_create("worker", folder) != head
    for name in ("head.key", "worker.key"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert zmq.curve_public(head.secret.encode()).decode() == head.public


def test_an_existing_folder_keeps_its_mode(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)  # e.g. $HOMESPEC_CONFIG pointed at a folder of the user's
    load_or_create("head", tmp_path)
    trust(pair().public, "h", tmp_path)
    assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o755


def test_key_files_and_trust_lists_others_can_write_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    load_or_create("head", tmp_path)
    key_file = tmp_path / "head.key"
    key_file.chmod(0o644)  # readable by others: used, with a warning
    with caplog.at_level("WARNING"):
        load_or_create("head", tmp_path)
    assert "can be read by other users" in caplog.text
    key_file.chmod(0o666)
    with pytest.raises(ConfigError, match="can be written by other users") as err:
        load_or_create("head", tmp_path)
    assert err.value.hint == f"chmod 600 {key_file}"
    other = pair().public
    trust(other, "h", tmp_path)
    (tmp_path / "trusted_heads").chmod(0o622)
    with pytest.raises(ConfigError, match="can be written by other users"):
        trusted_heads(tmp_path)
    assert not trusted_workers(tmp_path)  # a list that does not exist trusts nobody, and is no error


def test_a_gate_whose_trust_list_others_can_write_admits_nobody(tmp_path: Path) -> None:
    from homespec.transport.channel import KeyGate

    k = pair().public
    trust(k, "h", tmp_path)
    gate = KeyGate()
    gate.domains["head"] = lambda: trusted_heads(tmp_path)
    assert gate.callback("head", k.encode())
    (tmp_path / "trusted_heads").chmod(0o666)
    assert not gate.callback("head", k.encode())


def test_worker_trust_is_a_list_of_its_own_with_fingerprints(tmp_path: Path) -> None:
    k = pair().public
    assert trust(k, "gaming pc", tmp_path, list_name=TRUSTED_WORKERS)
    assert trusted_workers(tmp_path) == {k: "gaming pc"} and k not in trusted_heads(tmp_path)
    assert stat.S_IMODE((tmp_path / TRUSTED_WORKERS).stat().st_mode) == 0o600
    fp = fingerprint(k)
    assert len(fp) == 19 and fp.count("-") == 3 and fp != fingerprint(pair().public)
    assert untrust(k, tmp_path, list_name=TRUSTED_WORKERS) and not trusted_workers(tmp_path)


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


BAD_KEYS = ["", "short", "~" * 40, "x" * 20 + " " + "x" * 19, "é" * 40, pair().public + "0"]


@pytest.mark.parametrize(
    "bad", BAD_KEYS, ids=["empty", "short", "not-z85", "a-space", "not-ascii", "41-chars"]
)  # fixed ids: the last key is random, and parallel workers must collect the same tests
def test_a_malformed_key_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a CurveZMQ public key"):
        check_key(bad)


class Server:
    """A Curve ROUTER of domain "head" on a free loopback port, admitting what ``allowed`` holds."""

    def __init__(self, allowed: set[str]) -> None:
        self.keys = pair()
        self.ctx = zmq.Context()
        self.keeper = Gatekeeper(self.ctx)
        self.keeper.allow("head", lambda: allowed)
        self.sock = curve_server(self.ctx.socket(zmq.ROUTER), self.keys, "head")
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")

    def send_from(self, keys: KeyPair | None, server_key: str, payload: bytes, wait_s: float = 5.0) -> tuple:
        """Connect a DEALER (Curve client with ``keys``, plain without), send ``payload``: (handshake state, the
        frames the server read, or None)."""
        sock = self.ctx.socket(zmq.DEALER)
        if keys is not None:
            curve_client(sock, keys, server_key)
        watch = HandshakeWatch(sock)
        sock.connect(f"tcp://127.0.0.1:{self.port}")
        state = watch.wait(wait_s)
        with contextlib.suppress(zmq.Again):  # a refused handshake may leave no pipe to queue on: never block
            sock.send(payload, zmq.NOBLOCK)
        frames = self.sock.recv_multipart(copy=False) if self.sock.poll(400) else None
        watch.close()
        sock.close(linger=0)
        return state, frames

    def close(self) -> None:
        self.sock.close(linger=0)
        self.keeper.stop()
        self.ctx.term()


def test_the_gate_admits_the_allowed_key_and_refuses_others_before_reading_them() -> None:
    good, bad = pair(), pair()
    allowed = {good.public}
    server = Server(allowed)
    try:
        state, frames = server.send_from(good, server.keys.public, b"good")
        assert state == "connected" and frames is not None and frames[1].bytes == b"good"
        assert frames[1].get("User-Id") == good.public  # the server knows who sent it
        assert server.send_from(bad, server.keys.public, b"bad") == ("refused", None)
        assert server.send_from(None, server.keys.public, b"plain") == ("refused", None)
        assert server.keeper.gate.refused == {"head": 1} and server.keeper.gate.admitted == {"head": 1}
        allowed.add(bad.public)  # the list is asked at every handshake: trusting needs no restart
        assert server.send_from(bad, server.keys.public, b"now")[0] == "connected"
    finally:
        server.close()


def test_a_client_with_the_wrong_server_key_never_connects() -> None:
    client = pair()
    server = Server({client.public})
    try:
        state, frames = server.send_from(client, pair().public, b"secret", wait_s=1.0)  # an impostor's server key
        assert state != "connected" and frames is None
    finally:
        server.close()


def test_two_gatekeepers_share_their_context_s_zap_handler_and_keep_their_own_domains() -> None:
    """libzmq allows one ZAP handler per context: two clusters of one process (two engines) share it, each domain
    admits only its own keys, one stopping leaves the other's gate working, and a taken domain is refused."""
    server = Server(set())
    a, b = pair(), pair()
    try:
        other = Gatekeeper(server.ctx)  # a second handle: before the shared handler, this raised on binding it
        other.allow("second", lambda: {b.public})
        with pytest.raises(ValueError, match="another gatekeeper's"):
            other.allow("head", lambda: {b.public})
        sock = curve_server(server.ctx.socket(zmq.ROUTER), server.keys, "second")
        port = sock.bind_to_random_port("tcp://127.0.0.1")

        def knock(keys: KeyPair, to: int) -> str:
            client = curve_client(server.ctx.socket(zmq.DEALER), keys, server.keys.public)
            watch = HandshakeWatch(client)
            client.connect(f"tcp://127.0.0.1:{to}")
            state = watch.wait(5.0)
            watch.close()
            client.close(linger=0)
            return state

        assert knock(b, port) == "connected" and knock(a, port) == "refused"
        assert knock(b, server.port) == "refused"  # "head" admits nothing: the domains are apart
        other.stop()
        other.stop()  # twice is harmless
        assert server.send_from(a, server.keys.public, b"x")[0] == "refused"  # the first handle's gate still runs
        sock.close(linger=0)
    finally:
        server.close()
