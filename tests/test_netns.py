"""Several hosts on this one machine: network namespaces joined by a bridge (veth pairs made here; needs root, as CI
has), a ``homespec worker`` in two of them and the head in a third. The head finds the workers by zeroconf inside that
private network, measures them and the links to them (``homespec profile --lan``), and runs ``generate --mode
specpipe`` across them with output identical to transformers'; a head with an untrusted key is refused; a link
slowed with ``tc`` shows in the measured link profile."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EQUIVALENCE_PROMPTS
from tests.workers import HOMESPEC, pair, public_key, start_worker, stop

pytestmark = pytest.mark.slow

TAG = f"{os.getpid() % 10000}"
PORT = 7650


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make network namespaces"
    if shutil.which("ip") is None or shutil.which("tc") is None:
        return "needs iproute2 (ip, tc)"
    probe = f"hs{TAG}probe"
    made = sh("ip", "netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot make network namespaces here: {made.stderr.strip()}"
    sh("ip", "netns", "del", probe, check=False)
    return None


REASON = _why_not()
# In CI, on a machine where this process is root and has iproute2, namespaces are expected to work: a failure to
# make one fails these tests instead of skipping them.
if REASON and os.environ.get("CI") and os.geteuid() == 0 and shutil.which("ip") and shutil.which("tc"):
    pytest.fail(f"CI: this machine should make network namespaces, but {REASON}", pytrace=False)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A bridge and three namespaces (head, w1, w2) on 10.77.N.0/24, multicast routed on each veth."""
    if REASON:
        pytest.skip(f"namespace tests skipped: {REASON}")
    net = f"10.{77 + int(TAG) % 100}.{int(TAG) % 250}"
    bridge = f"hsbr{TAG}"
    hosts = {"head": 1, "w1": 2, "w2": 3}
    ns = {name: f"hs{TAG}{name}" for name in hosts}
    veth = {name: f"v{TAG}{name}" for name in hosts}
    try:
        sh("ip", "link", "add", bridge, "type", "bridge")
        sh("ip", "addr", "add", f"{net}.254/24", "dev", bridge)  # this namespace reaches them too (an in-process head)
        sh("ip", "link", "set", bridge, "up")
        for name, host in hosts.items():
            sh("ip", "netns", "add", ns[name])
            sh("ip", "link", "add", veth[name], "type", "veth", "peer", "name", f"{veth[name]}p")
            sh("ip", "link", "set", veth[name], "netns", ns[name])
            sh("ip", "link", "set", f"{veth[name]}p", "master", bridge, "up")
            inside = ("ip", "netns", "exec", ns[name])
            sh(*inside, "ip", "addr", "add", f"{net}.{host}/24", "dev", veth[name])
            sh(*inside, "ip", "link", "set", veth[name], "up")
            sh(*inside, "ip", "link", "set", "lo", "up")
            sh(*inside, "ip", "route", "add", "224.0.0.0/4", "dev", veth[name])
        root = tmp_path_factory.mktemp("netns")
        procs = []
        for name in ("w1", "w2"):
            pair(root / name, root / "head")
            log = root / f"{name}.log"
            procs.append(start_worker(root / name, PORT, name, host="0.0.0.0", netns=ns[name], advertise=True, log=log))
        yield {"root": root, "ns": ns, "veth": veth, "net": net, "procs": procs}
        stop(procs)  # the list the tests update when they restart a worker
    finally:
        for name in ns.values():
            sh("ip", "netns", "del", name, check=False)
        sh("ip", "link", "del", bridge, check=False)


def head_run(lab: dict[str, Any], *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HOMESPEC_CONFIG": str(config or lab["root"] / "head")}
    cmd = ["ip", "netns", "exec", lab["ns"]["head"], HOMESPEC, *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=lab["root"], timeout=300)


def test_zeroconf_finds_the_workers_and_specpipe_across_them_is_lossless(
    lab: dict[str, Any], chat_ids: Any, reference_greedy: Any, assert_lossless: Any
) -> None:
    out = head_run(lab, "profile", "--lan", "--budget", "0.05", "--browse", "3", "--out", "cluster.json", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    profile = json.loads(out.stdout)
    workers = {h["name"]: h for h in profile["hosts"] if h["address"]}
    assert set(workers) == {"w1", "w2"}, "zeroconf did not find both workers"
    assert {h["address"] for h in workers.values()} == {f"{lab['net']}.2", f"{lab['net']}.3"}
    assert all(len(h["key"]) == 40 and h["devices"][0]["tflops"] for h in workers.values())
    links = {x["b"]: x for x in profile["links"]["measured"]}
    assert set(links) == {"w1", "w2"} and all(x["latency_ms"] > 0 and x["mb_per_s"] > 0 for x in links.values())
    prompt = EQUIVALENCE_PROMPTS[4]
    gen = head_run(lab, "generate", prompt, "--cluster", "cluster.json", "--mode", "specpipe", "--stages", "2",
                   "--draft", "ngram+recycle", "-n", "32", "--json", "--weights", "fp32")  # fmt: skip
    assert gen.returncode == 0, gen.stderr[-3000:]
    result = json.loads(gen.stdout.strip().splitlines()[-1])
    assert_lossless(chat_ids(prompt), result["tokens"], reference_greedy(chat_ids(prompt), 32))
    assert result["stats"]["mode"] == "specpipe" and result["stats"]["stages"] == 2
    # --workers auto: the head browses the LAN itself, and deploys to the trusted workers it finds
    auto = head_run(lab, "generate", prompt, "--workers", "auto", "--mode", "specpipe", "--stages", "2",
                    "--draft", "none", "-n", "16", "--json", "--weights", "fp32")  # fmt: skip
    assert auto.returncode == 0, auto.stderr[-3000:]
    result = json.loads(auto.stdout.strip().splitlines()[-1])
    assert result["stats"]["stages"] == 2
    assert_lossless(chat_ids(prompt), result["tokens"], reference_greedy(chat_ids(prompt), 16))


def test_a_head_with_an_untrusted_key_is_refused(lab: dict[str, Any]) -> None:
    pinned = f"{lab['net']}.2:{PORT}@{public_key(lab['root'] / 'w1', 'worker')}"  # it trusts w1; w1 does not trust it
    out = head_run(lab, "generate", "hi", "--workers", pinned, "-n", "4", config=lab["root"] / "stranger")
    assert out.returncode != 0
    assert "refused this head's key" in out.stderr
    assert public_key(lab["root"] / "stranger", "head") in out.stderr  # the hint names the key to trust


def test_a_slowed_link_shows_in_the_measured_profile(lab: dict[str, Any]) -> None:
    """netem delay where the kernel has it; otherwise (this VM's kernel lacks sch_netem) a tbf rate limit."""
    inside = ("ip", "netns", "exec", lab["ns"]["w2"], "tc", "qdisc", "add", "dev", lab["veth"]["w2"], "root")
    delayed = sh(*inside, "netem", "delay", "20ms", check=False).returncode == 0
    if not delayed:
        sh(*inside, "tbf", "rate", "16mbit", "burst", "64kbit", "latency", "400ms")
    try:
        peers = [f"--peer={lab['net']}.{i}:{PORT}" for i in (2, 3)]
        out = head_run(lab, "profile", *peers, "--budget", "0.05", "--json")
        assert out.returncode == 0, out.stderr[-3000:]
        links = {x["b"]: x for x in json.loads(out.stdout)["links"]["measured"]}
        fast, slow = links["w1"], links["w2"]
        if delayed:
            assert slow["latency_ms"] >= 15 > 5 > fast["latency_ms"]
        else:
            # 16 Mbit/s is 2 MB/s on the way back only; a round trip of n bytes each way measures at most 4 MB/s
            assert slow["mb_per_s"] < 4.5 and slow["mb_per_s"] < fast["mb_per_s"] / 5
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "netns", "exec", lab["ns"]["w2"], "tc", "qdisc", "del", "dev", lab["veth"]["w2"], "root")


@pytest.fixture
def as_head(lab: dict[str, Any]) -> Iterator[None]:
    """This process as the trusted head (in the root namespace, on the bridge)."""
    before = os.environ.get("HOMESPEC_CONFIG")
    os.environ["HOMESPEC_CONFIG"] = str(lab["root"] / "head")
    yield
    if before is None:
        os.environ.pop("HOMESPEC_CONFIG", None)
    else:
        os.environ["HOMESPEC_CONFIG"] = before


def _break(lab: dict[str, Any], fault: str) -> None:
    """Break worker w2: SIGKILL the daemon (its stages follow), SIGSTOP all of it, or cut its link."""
    proc = lab["procs"][1]
    if fault == "kill":
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    elif fault == "stop":  # the whole worker, as when its machine sleeps: the daemon and its stage processes
        os.killpg(proc.pid, signal.SIGSTOP)
    else:
        sh("ip", "netns", "exec", lab["ns"]["w2"], "ip", "link", "set", lab["veth"]["w2"], "down")


def _mend(lab: dict[str, Any]) -> None:
    """Whatever was broken, w2 is back: restarted if dead, continued if stopped, its link up (idempotent)."""
    proc = lab["procs"][1]
    sh("ip", "netns", "exec", lab["ns"]["w2"], "ip", "link", "set", lab["veth"]["w2"], "up")
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)
    else:
        lab["procs"][1] = start_worker(lab["root"] / "w2", PORT, "w2", host="0.0.0.0", netns=lab["ns"]["w2"])


@pytest.mark.parametrize("fault", ["kill", "stop", "link-down"])
def test_a_lost_worker_fails_the_request_in_bounded_time_and_the_cluster_heals(
    lab: dict[str, Any], as_head: None, fault: str, chat_ids: Any, reference_greedy: Any, assert_lossless: Any
) -> None:
    """Mid-generation across w1 and w2, w2 is killed, stopped, or cut off. The request fails within --peer-timeout
    (3 s) with an error naming what was lost; the next engine plans over the devices left (w1 alone) and is
    lossless; once w2 is back, the cluster says it is outdated and the one after plans over both again."""
    from homespec.config import GenerationConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.errors import PeerLostError
    from homespec.events import GenerationFinished

    workers = (f"{lab['net']}.2:{PORT}", f"{lab['net']}.3:{PORT}")

    def engine(stages: int) -> Any:
        options = EngineOptions(
            mode="specpipe", draft="none", stages=stages, workers=workers, peer_timeout_s=3.0, weights="fp32"
        )
        return Engine(options)

    def lossless(e: Any) -> None:
        ids = chat_ids(EQUIVALENCE_PROMPTS[0])
        done = [x for x in e.generate(ids, GenerationConfig(max_tokens=16)) if isinstance(x, GenerationFinished)]
        assert_lossless(ids, list(done[0].tokens), reference_greedy(ids, 16))

    first = engine(2)
    try:
        hosts = [s.device.host for s in first.backend.plan.stages]
        assert sorted(hosts) == ["w1", "w2"]
        events = first.generate(chat_ids("Write a very long story about a dragon."),
                                GenerationConfig(max_tokens=4000, stop_on_eos=False))  # fmt: skip
        next(events)
        _break(lab, fault)
        # the cause: the head's silence timeout (--peer-timeout 3) fired for the stage on w2, the worker that went
        # away; a dead, stopped or cut-off machine cannot say so itself
        lost = (rf"stage {hosts.index('w2')} \(layers [0-9-]+\) has not answered for \d+ s \(--peer-timeout 3\)"
                r"|worker w2 at [0-9.]+ has been silent for \d+ s")  # fmt: skip
        with pytest.raises(PeerLostError, match=lost):
            for _ in events:
                pass
    finally:
        first.close()
    try:
        with engine(1) as rest:
            assert [s.device.host for s in rest.backend.plan.stages] == ["w1"]
            assert [p.address for p in rest.backend.cluster.missing] == [f"{lab['net']}.3"]
            lossless(rest)
            _mend(lab)
            deadline = time.monotonic() + 20
            while not rest.backend.cluster.outdated():
                assert time.monotonic() < deadline, "w2 came back but was never re-admitted"
                time.sleep(0.5)
    finally:
        _mend(lab)
    with engine(2) as healed:
        assert sorted(s.device.host for s in healed.backend.plan.stages) == ["w1", "w2"]
        lossless(healed)
