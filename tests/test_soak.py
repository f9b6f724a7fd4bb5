"""A bounded soak of the real server on 2 stage processes: 200 requests from 16 clients at once, a share of them
hanging up mid-stream, and one stage killed part-way (the requests in flight then fail with 503 and the server
restarts its stages). Every completed reply equals its solo run, no client hangs, and afterwards nothing is active,
queued or open on the stages and the server holds no more file descriptors than before."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.test_server import MODEL, Server

pytestmark = pytest.mark.slow

REQUESTS = 200
CLIENTS = 16
TOKENS = 6
PROMPTS = [
    "Write a haiku about GPUs.",
    "What is 17 times 23?",
    "Name two planets.",
    "Give me a synonym of happy.",
    "What is the boiling point of water?",
    "Translate to French: good morning.",
    "Say hello to a friend.",
    "What colour is the sky?",
]


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_connections(port: int) -> int:
    """TCP connections to ``port`` the server still holds open (ESTABLISHED or CLOSE_WAIT, from /proc/net/tcp*)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                count += int(local.rsplit(":", 1)[1], 16) == port and state in ("01", "08")
    return count


def server_fds(server: Server) -> int:
    """The server's open file descriptors with no client connected: the openai client's pooled keep-alive
    connections are closed first, and the count taken once the server has closed its ends of them."""
    server.client.close()
    deadline = time.monotonic() + 30  # watchdog
    while open_connections(server.port):
        assert time.monotonic() < deadline, f"the server still holds {open_connections(server.port)} connections"
        time.sleep(0.05)
    count = fds(server.proc.pid)
    server.client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.client.api_key, max_retries=0,
                                  timeout=120)  # fmt: skip
    return count


def ask(server: Server, i: int, stream: bool) -> Any:
    messages = [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
    return server.client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=TOKENS, temperature=0.7, seed=i % 5, stream=stream
    )


def test_soak(tmp_path: Path) -> None:
    s = Server("--stages", "2", "--max-concurrency", "8", "--max-queue", "256", "--draft", "ngram+recycle")
    try:
        solo = {i: ask(s, i, False).choices[0].message.content for i in range(len(PROMPTS) * 5)}
        idle = s.wait_idle()
        fds_before = server_fds(s)
        outcomes: dict[int, str] = {}
        wrong: list[tuple[int, str, str]] = []
        lock = threading.Lock()
        todo = iter(range(REQUESTS))

        def client() -> None:
            while True:
                with lock:
                    i = next(todo, None)
                if i is None:
                    return
                key = i % (len(PROMPTS) * 5)
                try:
                    if i % 5 == 4:  # a fifth hang up after their first chunk
                        stream = ask(s, key, True)
                        next(iter(stream))
                        stream.close()
                        outcome = "left"
                    else:
                        text = ask(s, key, False).choices[0].message.content
                        outcome = "ok"
                        if text != solo[key]:
                            with lock:
                                wrong.append((i, text, solo[key]))
                except openai.APIStatusError as exc:
                    outcome = f"http {exc.status_code}"
                with lock:
                    outcomes[i] = outcome

        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        start = time.monotonic()
        for t in threads:
            t.start()
        while len(outcomes) < REQUESTS * 2 // 5 and time.monotonic() - start < 300:
            time.sleep(0.1)
        killed = s.stage_pids()[-1]
        os.kill(killed, signal.SIGKILL)  # once, part-way: the requests in flight fail, the server restarts its stages
        for t in threads:
            t.join(timeout=600)
        took = time.monotonic() - start
        assert not any(t.is_alive() for t in threads), f"{REQUESTS - len(outcomes)} requests hung"
        counts = {o: list(outcomes.values()).count(o) for o in set(outcomes.values())}
        assert not wrong, f"{len(wrong)} replies differ from their solo run, e.g. {wrong[0]}"
        assert set(counts) <= {"ok", "left", "http 503"}, counts
        assert counts["ok"] >= REQUESTS // 2 and counts.get("http 503", 0) <= 8 + 8, counts
        after = s.wait_idle()
        for k in ("homespec_requests_active", "homespec_queue_length", "homespec_requests_open_on_stages"):
            assert after[k] == 0, (k, after[k])
        assert killed not in s.stage_pids()
        fds_after = server_fds(s)
        assert fds_after <= fds_before + 2, f"file descriptors {fds_before} -> {fds_after}"
        served = after['homespec_requests_total{outcome="ok"}'] - idle['homespec_requests_total{outcome="ok"}']
        print(f"soak: {REQUESTS} requests in {took:.0f} s, {counts}, fds {fds_before} -> {fds_after}, "
              f"served ok {served:.0f}")  # fmt: skip
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 200
    finally:
        s.close()
