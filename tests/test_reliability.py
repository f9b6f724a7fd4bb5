"""Faults with real processes: what is left when a part dies."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.workers import stage_processes

pytestmark = pytest.mark.slow

HOMESPEC = str(Path(sys.executable).parent / "homespec")


def stage_children(head: int) -> list[int]:
    """Pids of the stage processes ``head`` started (read from /proc: tests/workers.py)."""
    return stage_processes(head)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stage_name(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.mark.parametrize("launcher", ["1", "0"])
@pytest.mark.parametrize("when", ["mid-request", "while-loading"])
def test_stages_exit_when_the_head_is_killed(launcher: str, when: str) -> None:
    """SIGKILL the head on 4 stages: it sends no Shutdown. Every stage notices that its parent is gone and exits
    within seconds: forked by the head's launcher (whose input closes with the head: it exits, and its stages
    follow) or, with ``HOMESPEC_STAGE_LAUNCHER=0``, started as processes of their own. ``mid-request``: while it
    decodes (a stage may be waiting for a prune that will never come, or idle in its loop). ``while-loading``: as
    soon as the 4 stage processes exist, while they still load their weights (or import torch). A stage that read
    its parent's pid only after loading saw init's and never exited (8 were found alive 42 minutes after a bench was
    killed at its start): each now gets its starter's pid when it is started."""
    loading = when == "while-loading"
    head = subprocess.Popen(
        [HOMESPEC, "generate", "--stages", "4", "--draft", "ngram", "-n", "64" if loading else "2000",
         "Count from one to a thousand."],
        stdout=subprocess.DEVNULL if loading else subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HOMESPEC_STAGE_LAUNCHER": launcher},
    )  # fmt: skip
    stages: list[int] = []
    try:
        if loading:
            deadline = time.monotonic() + 60
            while len(stages) < 4 and head.poll() is None and time.monotonic() < deadline:
                stages = stage_children(head.pid)
                time.sleep(0.02)
        else:
            assert head.stdout is not None
            assert head.stdout.read(1), "generation never began"  # text streams: the pipeline is decoding
            stages = stage_children(head.pid)
        assert len(stages) == 4, f"stages {stages}"
        forked = {stage_name(p) == "homespec-stage" for p in stages}
        assert forked == {launcher == "1"}, "stages not started the way HOMESPEC_STAGE_LAUNCHER asks"
        head.send_signal(signal.SIGKILL)
        head.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in stages) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = [p for p in stages if alive(p)]
        assert not left, f"stages {left} outlived their head"
    finally:
        head.kill()
        for pid in stages:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_hung_stage_fails_the_request_within_the_peer_timeout_and_the_next_request_works(
    chat_ids: Any, reference_greedy: Any, assert_lossless: Any
) -> None:
    """SIGSTOP a local stage mid-generation: its process lives on, so only silence shows it. The request fails with
    an error naming the stage within --peer-timeout (3 s here) plus a ping; a new engine serves the next request."""
    from homespec.config import GenerationConfig
    from homespec.engine import Engine, EngineOptions
    from homespec.errors import PeerLostError
    from homespec.events import GenerationFinished

    options = EngineOptions(mode="specpipe", stages=3, draft="none", peer_timeout_s=3.0, weights="fp32")
    engine = Engine(options)
    stopped: int | None = None
    try:
        events = engine.generate(chat_ids("Write a very long story about a dragon."),
                                 GenerationConfig(max_tokens=2000, stop_on_eos=False))  # fmt: skip
        next(events)
        stopped = engine.backend.cluster.procs[1].pid
        os.kill(stopped, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(PeerLostError, match=r"stage 1 \(layers 10-19\) has not answered") as lost:
            for _ in events:
                pass
        print(f"local SIGSTOP: the request failed after {time.monotonic() - start:.1f} s: {lost.value.message}")
        # the cause, by the head's own clock: the stopped stage's silence passed --peer-timeout, and nothing else
        silent = lost.value.message.split("has not answered for ")[1]
        assert silent.endswith("s (--peer-timeout 3)") and int(silent.split()[0]) >= 3
    finally:
        engine.close()  # kills what does not stop, the stopped stage included
    assert stopped is not None and not alive(stopped)
    with Engine(options) as again:
        ids = chat_ids("Write a haiku about GPUs.")
        done = [e for e in again.generate(ids, GenerationConfig(max_tokens=16)) if isinstance(e, GenerationFinished)]
        assert_lossless(ids, list(done[0].tokens), reference_greedy(ids, 16))


def test_the_head_never_blocks_on_a_stage_that_takes_nothing(bundled: Any) -> None:
    """Two real stage processes; stage 0 is SIGSTOPped, so it reads nothing and the head's queue into it fills.
    The next send then waits at most the peer timeout and fails as a lost stage naming that timeout, instead of
    blocking the head for ever."""
    from homespec.core.messages import Assign, Heartbeat
    from homespec.core.planner import even_split
    from homespec.errors import PeerLostError
    from homespec.pipeline.cluster import LocalCluster

    assigns = [Assign(i, 2, str(bundled.folder), a, b, "fp32", "cpu", 256, 8)
               for i, (a, b) in enumerate(even_split(bundled.num_layers, 2))]  # fmt: skip
    with LocalCluster(assigns, timeout_s=0.5) as cluster:
        stage0 = cluster.procs[0]
        os.kill(stage0.pid, signal.SIGSTOP)
        outcome: list[BaseException | int] = []

        def flood() -> None:
            try:
                for sent in range(1_000_000):
                    cluster.send_first(Heartbeat(-1, sent))
                outcome.append(sent)
            except BaseException as exc:
                outcome.append(exc)

        try:
            sender = threading.Thread(target=flood, daemon=True)
            sender.start()
            sender.join(timeout=120)  # the watchdog: a head that blocked in a send would never come back
            assert outcome, "the head blocked sending into a stage that reads nothing"
            assert isinstance(outcome[0], PeerLostError), outcome[0]
            assert re.fullmatch(r"stage 0 took no input for 0\.5 s", outcome[0].message)  # the send timeout fired
            assert stage0.poll() is None  # the stage is stopped, not dead: only the send timeout can tell
        finally:
            os.kill(stage0.pid, signal.SIGCONT)
