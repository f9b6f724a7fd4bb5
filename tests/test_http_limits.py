"""The HTTP server cannot be frozen or held (RELIABILITY.md): a prompt too big to fit is refused by its size before
any tokenizing, and tokenizing runs off the event loop, so ``/health`` keeps answering while 4 MB bodies are refused;
clients that never finish their request head or body are dropped after ``--read-timeout``, and connections past
``--max-connections`` get 503 at once. A real ``homespec serve`` process, real sockets."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.test_server import KEY, MODEL, Server, chat

pytestmark = pytest.mark.slow

READ_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 64


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server("--read-timeout", str(READ_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS), "--draft", "none")
    yield s
    s.close()


def _huge_bodies() -> list[tuple[str, dict[str, object]]]:
    big = "lorem ipsum dolor sit amet " * 144_000  # 3.9 MB of text
    many = [{"role": "user", "content": "hi"}] * 100_000  # 100 000 messages, 3.4 MB
    return [
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": big}]}),
        ("/v1/chat/completions", {"model": MODEL, "messages": many}),
        ("/v1/completions", {"model": MODEL, "prompt": big}),
    ]


def test_health_answers_on_time_while_huge_prompts_are_refused(server: Server) -> None:
    """Three 4 MB-class bodies, four times each, posted while /health is polled: every body gets 400
    context_length_exceeded, /health answers all along, and the server's own event-loop clock counts no stall (a
    watchdog tick more than 0.5 s late) over the whole run (before the size checks and the tokenizer thread, each
    such body held the event loop for ~3 s: 12 stalls)."""
    statuses: list[tuple[int, str]] = []
    bodies = [(path, json.dumps(body)) for path, body in _huge_bodies() * 4]
    before = server.metrics()

    def post_all() -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
            for path, body in bodies:
                r = client.post(path, content=body, headers={"content-type": "application/json"})
                statuses.append((r.status_code, r.json()["error"].get("code")))

    poster = threading.Thread(target=post_all)
    polls = during = 0
    with httpx.Client(base_url=server.url, timeout=30) as health:
        poster.start()
        while poster.is_alive() or polls < 20:
            assert health.get("/health").status_code == 200
            polls += 1
            during += poster.is_alive()
    poster.join()
    after = server.metrics()
    assert statuses == [(400, "context_length_exceeded")] * 12
    stalls = after["homespec_event_loop_stalls"] - before["homespec_event_loop_stalls"]
    print(f"/health: {polls} answers, {during} while 12 huge bodies were sent and refused; event loop stalls "
          f"{stalls:.0f}, worst tick {after['homespec_event_loop_stall_max_seconds'] * 1000:.0f} ms late")  # fmt: skip
    assert during >= 5, "the polls did not overlap the huge bodies"
    assert stalls == 0, f"the event loop stalled {stalls:.0f} times while the bodies were refused"
    assert chat(server, max_tokens=4).usage.completion_tokens == 4


def _slow_client(port: int, body: bool) -> socket.socket:
    """A connection that starts a request and never finishes its head (or, with ``body``, its body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
    if body:
        s.sendall(f'{head}Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"model"'.encode())
    else:
        s.sendall(head.encode())
    return s


def _read_to_close(s: socket.socket) -> str:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data.decode()


def test_slow_clients_are_dropped_after_the_read_timeout(server: Server) -> None:
    """30 clients that never finish their request head and 20 that never finish their body: each slow head is closed
    by the server, and each slow body answered 408 in OpenAI's shape, after --read-timeout; then requests are served
    as before."""
    slow_heads = [_slow_client(server.port, body=False) for _ in range(30)]
    slow_bodies = [_slow_client(server.port, body=True) for _ in range(20)]
    try:
        for s in slow_heads:
            assert s.recv(4096) == b"", "a connection without a whole request head was answered instead of dropped"
        for s in slow_bodies:
            reply = _read_to_close(s)
            assert reply.startswith("HTTP/1.1 408"), reply[:80]
            assert '"code":"request_timeout"' in reply.replace(" ", "")
    finally:
        for s in slow_heads + slow_bodies:
            s.close()
    assert chat(server, max_tokens=4).usage.completion_tokens == 4


def test_connections_past_the_cap_get_503_at_once_and_silent_ones_are_dropped(server: Server) -> None:
    """70 connections that send nothing (> --max-connections 64): a request then gets 503 at once instead of
    waiting for a socket; the server closes the silent ones after --read-timeout and serves again."""
    silent = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(70)]
    try:
        statuses = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while 503 not in statuses and len(statuses) < 200:  # until the server has accepted all 70
                statuses.append(client.get("/health").status_code)
        assert statuses[-1] == 503 and set(statuses) <= {200, 503}
        for s in silent:
            assert s.recv(4096) == b"", "a silent connection was answered instead of dropped"
    finally:
        for s in silent:
            s.close()
    assert chat(server, max_tokens=4).usage.completion_tokens == 4
