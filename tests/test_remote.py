"""Stages on ``homespec worker`` processes (pipeline/daemon.py, pipeline/remote.py) over CurveZMQ on loopback: the
planner's placement across two workers gives the tokens of transformers (greedy) and of the single-process run
(seeded sampling) in every pipelined mode; an untrusted head is refused; a killed stage fails the request with a
clear error in bounded time; a head that dies frees the worker for the next one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from homespec.config import GenerationConfig, SamplingConfig
from homespec.errors import PeerLostError
from homespec.events import GenerationFinished
from tests.conftest import EQUIVALENCE_PROMPTS
from tests.workers import HOMESPEC, free_port_block, pair, public_key, stage_pids, start_worker, stop, trust

pytestmark = pytest.mark.slow

N = 32


@pytest.fixture(scope="module")
def lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two workers (each its own key folder, trusting the head) and the head's key folder, set for this process."""
    root = tmp_path_factory.mktemp("lan")
    head = root / "head"
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    before = os.environ.get("HOMESPEC_CONFIG")
    try:  # the workers started so far are stopped even when a later one fails to start
        for name in ("w1", "w2"):
            pair(root / name, head)
            port = free_port_block()
            procs.append(start_worker(root / name, port, name, log=root / f"{name}.log"))
            ports.append(port)
        os.environ["HOMESPEC_CONFIG"] = str(head)
        yield {"root": root, "head": head, "procs": procs, "workers": tuple(f"127.0.0.1:{p}" for p in ports)}
    finally:
        if before is None:
            os.environ.pop("HOMESPEC_CONFIG", None)
        else:
            os.environ["HOMESPEC_CONFIG"] = before
        stop(procs)


def remote_engine(lan: dict[str, Any], draft: str = "ngram+recycle", stages: int = 2) -> Any:
    from homespec.engine import Engine, EngineOptions

    return Engine(EngineOptions(draft=draft, mode="specpipe", stages=stages, workers=lan["workers"], weights="fp32"))


GREEDY = SamplingConfig()


def tokens(engine: Any, ids: list[int], sampling: SamplingConfig = GREEDY, mode: Any = None) -> tuple:
    for event in engine.generate(ids, GenerationConfig(max_tokens=N, sampling=sampling), mode=mode):
        if isinstance(event, GenerationFinished):
            return event.tokens
    raise AssertionError("no GenerationFinished")


def test_two_workers_give_the_targets_tokens_in_every_mode(
    lan: dict[str, Any], chat_ids: Any, reference_greedy: Any, engines: Any
) -> None:
    with remote_engine(lan) as engine:
        plan = engine.backend.plan
        assert [s.device.host for s in plan.stages] == ["w1", "w2"] or [s.device.host for s in plan.stages] == [
            "w2",
            "w1",
        ]
        assert plan.stages[0].layers[0] == 0 and plan.stages[-1].layers[1] == 30
        assert plan.stages[0].layers[1] == plan.stages[1].layers[0]
        info = engine.stage_info()
        assert len(info) == 2 and all("@ w" in s.device for s in info)
        for mode, prompt in (("specpipe", 0), ("pp", 1), ("tree", 2), ("specpipe", 1)):
            ids = chat_ids(EQUIVALENCE_PROMPTS[prompt])
            want = tuple(reference_greedy(ids, N))
            got = tokens(engine, ids, mode=mode)
            assert got == want[: len(got)] and len(got) in (N, want.index(2) + 1 if 2 in want else N), mode
        seeded = SamplingConfig(temperature=0.8, seed=5)
        ids = chat_ids(EQUIVALENCE_PROMPTS[3])
        assert tokens(engine, ids, seeded) == tokens(engines("none"), ids, seeded)
        assert engine.open_requests == 0


def test_an_untrusted_head_is_refused_with_its_key_in_the_hint(lan: dict[str, Any], tmp_path: Path) -> None:
    from homespec.engine import Engine, EngineOptions

    pinned = f"{lan['workers'][0]}@{public_key(lan['root'] / 'w1', 'worker')}"  # this head trusts w1; w1 not it
    os.environ["HOMESPEC_CONFIG"] = str(tmp_path / "stranger")
    try:
        with pytest.raises(PeerLostError, match="refused this head's key") as err:
            Engine(EngineOptions(mode="specpipe", workers=(pinned,)))
        assert err.value.hint and public_key(tmp_path / "stranger", "head") in err.value.hint
    finally:
        os.environ["HOMESPEC_CONFIG"] = str(lan["head"])


def test_a_killed_stage_fails_the_request_quickly_and_the_workers_serve_the_next_head(
    lan: dict[str, Any], chat_ids: Any, reference_greedy: Any
) -> None:
    engine = remote_engine(lan, draft="ngram")
    try:
        ids = chat_ids("Write a very long story about a dragon, with many chapters.")
        events = engine.generate(ids, GenerationConfig(max_tokens=2000, stop_on_eos=False))
        next(events)
        victim = stage_pids(lan["procs"][1])
        assert len(victim) == 1
        os.kill(victim[0], signal.SIGKILL)
        start = time.monotonic()
        # the cause: the worker saw its stage process die and said so (not the head's silence timeout, 10 s here)
        with pytest.raises(PeerLostError, match=r"on worker w2: the stage process on worker w2 exited with code -9"):
            for _ in events:
                pass
        print(f"remote SIGKILL of a stage: the request failed after {time.monotonic() - start:.1f} s")
    finally:
        engine.close()
    deadline = time.monotonic() + 10
    while any(stage_pids(p) for p in lan["procs"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(stage_pids(p) for p in lan["procs"]), "the released session left stage processes behind"
    with remote_engine(lan, draft="none") as again:
        prompt = chat_ids(EQUIVALENCE_PROMPTS[0])
        assert tokens(again, prompt) == tuple(reference_greedy(prompt, N))


def test_a_head_that_dies_frees_the_workers(lan: dict[str, Any]) -> None:
    """SIGKILL a head mid-generation: it sends no Release; each worker ends the session when the head has been
    silent for --head-timeout (3 s here) and stops its stage processes."""
    cmd = [HOMESPEC, "generate", "--workers", ",".join(lan["workers"]), "--stages", "2", "--draft", "none"]
    cmd += ["-n", "2000", "Write a very long story about a dragon, with many chapters."]
    head = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        assert head.stdout is not None and head.stdout.read(1), "generation never began"
        assert all(stage_pids(p) for p in lan["procs"])
        head.kill()
        head.wait(timeout=10)
        deadline = time.monotonic() + 15
        while any(stage_pids(p) for p in lan["procs"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(stage_pids(p) for p in lan["procs"]), "stages outlived their head's session"
        assert all(p.poll() is None for p in lan["procs"]), "a worker died with its head"
    finally:
        head.kill()


def test_a_worker_serves_one_head_at_a_time_and_pinned_keys_need_no_trust_list(
    lan: dict[str, Any], tmp_path: Path, chat_ids: Any, reference_greedy: Any, assert_lossless: Any
) -> None:
    """While one head holds both workers, a second head (another process with its own key, which the workers
    trust) is refused with the worker's own reason, and the first head's request goes on. That second head lists
    no trusted workers: it reaches them by ``HOST:PORT@KEY`` alone, and once the first head is gone its request
    runs there, lossless."""
    from homespec.config import GenerationConfig
    from homespec.events import GenerationFinished
    from homespec.transport.keys import trusted_workers

    second = tmp_path / "second"
    for name in ("w1", "w2"):
        trust(lan["root"] / name, public_key(second, "head"))  # the workers serve it; it trusts no worker by list
    assert trusted_workers(second) == {}
    keys = [public_key(lan["root"] / name, "worker") for name in ("w1", "w2")]
    pinned = ",".join(f"{w}@{k}" for w, k in zip(lan["workers"], keys, strict=True))
    prompt = EQUIVALENCE_PROMPTS[5]
    ids = chat_ids(prompt)

    def second_head() -> subprocess.CompletedProcess[str]:
        cmd = [HOMESPEC, "generate", prompt, "--workers", pinned, "--stages", "2", "--draft", "none", "-n", str(N),
               "--json", "--weights", "fp32"]  # fmt: skip
        env = {**os.environ, "HOMESPEC_CONFIG": str(second)}
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    with remote_engine(lan, draft="none") as first:
        events = first.generate(ids, GenerationConfig(max_tokens=N))
        next(events)
        refused = second_head()
        assert refused.returncode != 0
        assert re.search(r"worker w[12] is busy with another head's session", refused.stderr), refused.stderr[-2000:]
        done = [e for e in events if isinstance(e, GenerationFinished)]
        assert_lossless(ids, list(done[0].tokens), reference_greedy(ids, N))
    served = second_head()
    assert served.returncode == 0, served.stderr[-3000:]
    result = json.loads(served.stdout.strip().splitlines()[-1])
    assert result["stats"]["stages"] == 2
    assert_lossless(ids, result["tokens"], reference_greedy(ids, N))


def test_a_stage_whose_model_differs_from_the_heads_refuses_to_run(bundled: Any, truncated_copy: Path) -> None:
    """The digest covers the config, the tensor names and the size: two copies of a model agree, two models do not;
    a stage given the head's digest of another model says so and never serves."""
    from homespec.core.messages import Assign
    from homespec.model.loader import open_folder
    from homespec.pipeline.cluster import LocalCluster

    copy = Path(shutil.copytree(bundled.folder, truncated_copy.parent / "bundled-copy"))
    assert open_folder(copy, "copy").digest() == bundled.digest()
    assert open_folder(truncated_copy, "t").digest() != bundled.digest()
    wrong = open_folder(truncated_copy, "t").digest()
    assign = Assign(0, 1, str(bundled.folder), 0, 30, "fp32", "cpu", 256, 64, model_digest=wrong)
    with pytest.raises(PeerLostError, match=r"stage 0 failed to start: this copy of .* differs from the head.s"):
        LocalCluster([assign])


def test_an_unauthenticated_peer_is_refused_before_a_stage_parses_anything(
    lan: dict[str, Any], chat_ids: Any, reference_greedy: Any
) -> None:
    """Garbage into a remote stage's input from a plain socket and from an unknown Curve key never reaches the
    stage (its count of bad messages stays 0); the same garbage from the head, which the input admits, is counted."""
    import zmq

    from homespec.core.messages import Heartbeat
    from homespec.transport.channel import curve_client
    from homespec.transport.codec import decode, encode
    from homespec.transport.keys import KeyPair

    def counts(cluster: Any, seq: int) -> list[int]:
        cluster.control.send_multipart(encode(Heartbeat(-1, seq)))
        got: dict[int, int] = {}
        deadline = time.monotonic() + 10
        while len(got) < cluster.size and time.monotonic() < deadline:
            if cluster.report.poll(100):
                msg = decode(cluster.report.recv_multipart())
                if isinstance(msg, Heartbeat) and msg.seq == seq:
                    got[msg.sender] = msg.bad_messages
        return [got[i] for i in sorted(got)]

    def refused(sock: Any, monitor: Any) -> int:
        """Wait (watchdog 10 s) for the socket's monitor to report its handshake failed; return the event."""
        from zmq.utils.monitor import recv_monitor_message

        failed = {zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                  zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_DISCONNECTED}  # fmt: skip
        try:
            while monitor.poll(10_000):
                event = recv_monitor_message(monitor)["event"]
                assert event != zmq.EVENT_HANDSHAKE_SUCCEEDED, "a stranger's handshake succeeded"
                if event in failed:
                    return int(event)
            raise AssertionError("no handshake outcome within 10 s")
        finally:
            sock.disable_monitor()
            monitor.close(linger=0)

    with remote_engine(lan, draft="none") as engine:
        cluster = engine.backend.cluster
        ctx = zmq.Context.instance()
        stranger = KeyPair(*(k.decode() for k in zmq.curve_keypair()))
        for i in range(cluster.size):
            plain = ctx.socket(zmq.PUSH)
            other = curve_client(ctx.socket(zmq.PUSH), stranger, cluster.placements[i].link.key)
            watch = [(sock, sock.get_monitor_socket()) for sock in (plain, other)]
            for sock in (plain, other):
                sock.setsockopt(zmq.SNDTIMEO, 0)
                sock.connect(cluster._input(i))
            for sock in (plain, other):
                for _ in range(50):  # queued while connecting: delivered only if the handshake succeeds
                    with contextlib.suppress(zmq.Again):
                        sock.send_multipart([b"\x93garbage", b"x"])
            for sock, monitor in watch:
                refused(sock, monitor)
            plain.close(linger=0)
            other.close(linger=0)
        for _ in range(5):
            cluster.first.send_multipart([b"\x93garbage", b"x"])  # the head is admitted: the stage reads and counts
        deadline = time.monotonic() + 10  # watchdog
        while counts(cluster, 7002)[0] < 5 and time.monotonic() < deadline:
            time.sleep(0.2)
        # the head's 5 were counted on stage 0, none of the strangers' 100 per stage on any stage
        assert counts(cluster, 7003) == [5] + [0] * (cluster.size - 1)
        ids = chat_ids(EQUIVALENCE_PROMPTS[2])
        assert tokens(engine, ids) == tuple(reference_greedy(ids, N))


def test_the_server_serves_on_the_workers_left_and_readmits_one_that_comes_back(
    lan: dict[str, Any], chat_ids: Any, reference_greedy: Any, tokenizer: Any
) -> None:
    """``serve`` over w1 and w2 (``--stages 2``): w2 is SIGKILLed (its worker and stages). The request that finds it
    gone gets a 503 ``stage_lost`` within the peer timeout; the next one is served over w1 alone (2 stages no longer
    fit: the planner chooses); w2 is started again, and while idle the server rebuilds around it: the request after
    runs on 2 stages again. Every reply is the target's own greedy text."""
    import openai

    from tests.test_server import MODEL, Server

    prompt = "Name three rivers in Europe."
    want = tokenizer.decode(reference_greedy(chat_ids(prompt), 12), skip_special_tokens=True)

    def ask() -> Any:
        messages = [{"role": "user", "content": prompt}]
        return server.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)

    def stages(reply: Any) -> int:
        assert reply.choices[0].message.content == want
        return int(reply.model_extra["homespec"]["stages"])

    workers = ",".join(lan["workers"])
    server = Server(
        "--workers",
        workers,
        "--stages",
        "2",
        "--mode",
        "specpipe",
        "--draft",
        "none",
        "--peer-timeout",
        "3",
        "--weights",
        "fp32",
    )
    try:
        assert stages(ask()) == 2
        w2 = lan["procs"][1]
        os.killpg(w2.pid, signal.SIGKILL)
        w2.wait(timeout=10)
        with pytest.raises(openai.APIStatusError) as err:
            ask()
        assert err.value.status_code == 503 and err.value.body["code"] == "stage_lost"
        # the cause: a silence timeout of 3 s fired, for w2's stage or for w2 itself (w2 cannot say it died)
        silent = (r"stage \d \(layers [0-9-]+\) has not answered for \d+ s \(--peer-timeout 3\)"
                  r"|worker w2 at [0-9.]+ has been silent for \d+ s")  # fmt: skip
        assert re.search(silent, err.value.body["message"]), err.value.body["message"]
        assert stages(ask()) == 1
        port = int(lan["workers"][1].rsplit(":", 1)[1])
        lan["procs"][1] = start_worker(lan["root"] / "w2", port, "w2", log=lan["root"] / "w2-again.log")
        # idle, the server asks every few seconds whether a missing worker answers again, and rebuilds around it
        deadline = time.monotonic() + 60  # watchdog
        while server.metrics()["homespec_pipeline_stages"] != 2:
            assert time.monotonic() < deadline, "w2 came back but the idle server never re-admitted it"
            time.sleep(0.2)
        assert stages(ask()) == 2
    finally:
        server.close()


# -- trust and hostile peers (DESIGN §7) --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rogue(lan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A real ``homespec worker`` with a fresh key pair of its own, which trusts the head (so that it would take
    a Deploy) but which the head was never told to trust; it calls itself w1, the name of a real worker."""
    config = lan["root"] / "rogue"
    trust(config, public_key(lan["head"], "head"))
    port = free_port_block()
    proc = start_worker(config, port, "w1", log=lan["root"] / "rogue.log")
    try:
        yield {"port": port, "key": public_key(config, "worker"), "proc": proc}
    finally:
        stop([proc])


def _session(port: int) -> int:
    from homespec.pipeline.remote import fetch_info
    from homespec.transport.discovery import Peer

    return fetch_info(Peer("x", "127.0.0.1", port)).session


def test_a_worker_with_an_unknown_key_is_refused_and_sees_nothing(lan: dict[str, Any], rogue: dict[str, Any]) -> None:
    """Named with HOST:PORT, a worker whose key the head does not trust gets no Deploy (and so never sees a prompt):
    the error names its key and fingerprint and says how to trust it."""
    from homespec.engine import Engine, EngineOptions
    from homespec.errors import UntrustedPeerError
    from homespec.transport.keys import fingerprint

    with pytest.raises(UntrustedPeerError) as err:
        Engine(EngineOptions(mode="specpipe", workers=(f"127.0.0.1:{rogue['port']}", lan["workers"][1])))
    assert rogue["key"] in err.value.message and fingerprint(rogue["key"]) in err.value.message
    assert err.value.hint and f"homespec keys trust-worker -- {shlex.quote(rogue['key'])}" in err.value.hint
    assert _session(rogue["port"]) == 0, "the rogue worker was given a session"


def test_rogue_and_duplicate_peers_on_the_lan_are_skipped_never_abort_the_build(
    lan: dict[str, Any], rogue: dict[str, Any]
) -> None:
    """As ``--workers auto`` finds them: the rogue advertising w1's name with its own key, the rogue claiming w1's
    key (it cannot finish the handshake), and w1 advertised twice. The build connects to the real w1 and w2 only,
    with a warning for each of the others, and a generation over them is the target's."""
    import zmq

    from homespec.pipeline.remote import _connect_all
    from homespec.transport.discovery import Peer
    from homespec.transport.keys import load_or_create

    ports = [int(w.rsplit(":", 1)[1]) for w in lan["workers"]]
    keys = [public_key(lan["root"] / n, "worker") for n in ("w1", "w2")]
    peers = [
        Peer("w1", "127.0.0.1", rogue["port"], rogue["key"]),  # an advert of its own key, under w1's name
        Peer("w1", "127.0.0.1", ports[0], keys[0]),
        Peer("w1", "127.0.0.1", rogue["port"], keys[0]),  # an advert that claims w1's key
        Peer("w1-again", "127.0.0.1", ports[0], keys[0]),  # the same worker seen twice
        Peer("w2", "127.0.0.1", ports[1], keys[1]),
    ]
    said: list[str] = []
    links, missing = _connect_all(zmq.Context.instance(), load_or_create("head"), peers, False, True, said.append)
    try:
        assert [(link.info.name, link.key) for link in links] == [("w1", keys[0]), ("w2", keys[1])]
        assert [p.port for p in missing] == [rogue["port"]]  # the claim of w1's key: its handshake never completes
        warnings = [s for s in said if s.startswith("warning")]
        assert len(warnings) == 2 and rogue["key"] in warnings[0] and "same key or name" in warnings[1]
    finally:
        for link in links:
            link.sock.close(linger=0)
    assert _session(rogue["port"]) == 0


def test_a_flood_of_idle_connections_locks_no_trusted_head_out(lan: dict[str, Any], reference_greedy: Any) -> None:
    """2 000 connections that never speak, to a worker's plain info port and to its CurveZMQ control port (more
    than the default limit of 1 024 open files): the info port still answers, a trusted head still deploys and
    generates the target's tokens, and the worker is alive afterwards."""
    import resource
    import socket

    from homespec.engine import Engine, EngineOptions
    from homespec.pipeline.remote import fetch_info
    from homespec.transport.discovery import Peer

    config = lan["root"] / "w3"
    pair(config, lan["head"])
    port = free_port_block()
    proc = start_worker(config, port, "w3", log=lan["root"] / "w3.log")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    idle: list[socket.socket] = []
    try:
        for i in range(2000):  # from 127.0.0.2, so that no ephemeral port of theirs takes the stage's data port
            idle.append(socket.create_connection(("127.0.0.1", port + (i % 2)), 5, ("127.0.0.2", 0)))
        assert fetch_info(Peer("w3", "127.0.0.1", port)).name == "w3"
        ids = [1, 9707, 28, 2]  # any prompt: the point is that the head gets in
        options = EngineOptions(mode="specpipe", draft="none", workers=(f"127.0.0.1:{port}",), weights="fp32")
        with Engine(options) as engine:
            events = list(engine.generate(ids, GenerationConfig(8, SamplingConfig())))
        finished = events[-1]
        assert isinstance(finished, GenerationFinished) and len(finished.tokens) == 8
        assert list(finished.tokens) == reference_greedy(ids, 8)
        assert proc.poll() is None, "the worker died"
    finally:
        for s in idle:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        stop([proc])


def test_profile_lists_an_untrusted_worker_and_leaves_it_out(lan: dict[str, Any], rogue: dict[str, Any]) -> None:
    """``homespec profile --peer`` (not at a terminal, so nothing is asked): the trusted w2 is measured into the
    profile; the rogue is listed with its key and fingerprint as untrusted, and is not in the profile."""
    import json

    from homespec.transport.keys import fingerprint

    env = {**os.environ, "HOMESPEC_CONFIG": str(lan["head"])}
    cmd = [HOMESPEC, "profile", "--json", "--budget", "0.05", "--peer", f"127.0.0.1:{rogue['port']}",
           "--peer", lan["workers"][1]]  # fmt: skip
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    hosts = {h["name"]: h for h in json.loads(out.stdout)["hosts"] if h.get("address")}
    assert set(hosts) == {"w2"}
    assert f"untrusted, not used: worker w1 at 127.0.0.1:{rogue['port']}, key {rogue['key']}" in out.stderr
    assert fingerprint(rogue["key"]) in out.stderr
    assert _session(rogue["port"]) == 0
