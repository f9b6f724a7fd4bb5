"""The chat TUI, for real: the Textual app driven by its Pilot on the bundled model (2 local stage processes), a
recorded high-rate event stream replayed into it, the tree rendering, and the error screen."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from textual.widgets import Input

from homespec.cli.common import engine_options
from homespec.config import GenerationConfig, SamplingConfig
from homespec.engine import Engine, EngineOptions
from homespec.events import (
    GenerationFinished,
    StageUtilization,
    TokensCommitted,
    TreeNodeView,
    TreeSnapshot,
)
from tui.app import ChatApp, ErrorScreen, LoadingScreen, make_app
from tui.widgets.chat_log import ChatLog
from tui.widgets.stage_bars import StageBars
from tui.widgets.tree_view import TreeView, render_tree

SIZE = (140, 44)
HOMESPEC = str(Path(sys.executable).parent / "homespec")


async def wait_for(pilot: Any, cond: Callable[[], bool], timeout: float = 240.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, "timed out waiting for the app"
        await pilot.pause(0.05)


async def error_shown(pilot: Any, app: ChatApp) -> str:
    """The error screen's message once the screen is up and composed (a pushed screen mounts its widgets at a later
    turn of the app's loop than the one that pushed it)."""
    await wait_for(
        pilot, lambda: isinstance(app.screen, ErrorScreen) and len(app.screen.query("#error-message")) > 0, 60
    )
    return str(app.screen.query_one("#error-message").render())


async def ask(pilot: Any, app: ChatApp, text: str) -> None:
    prompt = app.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = text
    await pilot.press("enter")


def test_tree_rendering_marks_each_state() -> None:
    nodes = (
        TreeNodeView(0, -1, " The", "done", 4),
        TreeNodeView(1, 0, " cat", "done", 4),
        TreeNodeView(2, 0, " dog", "done", 4),
        TreeNodeView(3, 1, " sat", "sent", 2),
        TreeNodeView(4, 3, "\n", "drafted", -1),
    )
    tree = render_tree(TreeSnapshot(7, 4, nodes, accepted=(0, 1), pruned=(2,), flushed=False))

    def styles(node: Any) -> str:
        return " ".join(str(span.style) for span in node.label.spans)

    root = tree.children[0]
    assert str(root.label) == " The" and "bold green" in styles(root)
    cat, dog = root.children
    assert "bold green" in styles(cat) and "strike" in styles(dog)
    sat = cat.children[0]
    assert str(sat.label) == " sat s3"  # in flight: its wave has left stage 3
    assert str(sat.children[0].label) == "⏎" and "grey" in styles(sat.children[0])  # drafted, a newline as a symbol
    chain = render_tree(TreeSnapshot(8, 4, (nodes[3], TreeNodeView(5, 3, " down", "sent", 2)), (), (), True))
    assert str(chain.children[0].label) == " sat· down s3" and "flush" in str(chain.label)  # a chain is one line
    assert "accepted 2" in str(tree.label) and "pruned 1" in str(tree.label)


@pytest.mark.slow
def test_error_screen_instead_of_a_crash(tmp_path: Any) -> None:
    """A model that does not exist: the loading screen gives way to an error screen, and enter quits with 1."""

    async def run() -> None:
        app = make_app(engine_options(str(tmp_path / "nope"), 1, None, "none", 32, True, None, 0.0, "fp32", "cpu",
                                      4096), GenerationConfig())  # fmt: skip
        async with app.run_test(size=SIZE) as pilot:
            assert "nope" in await error_shown(pilot, app)
            await pilot.press("enter")
        assert app.return_code == 1

    asyncio.run(run())


@pytest.mark.slow
def test_a_recorded_high_rate_stream_is_coalesced(chat_ids: Callable[[str], list[int]]) -> None:
    """Events recorded from a real traced generation, replayed into the app 20 times over as fast as the bridge
    can post them (thousands of events a second): the tree pane draws far fewer times than it gets snapshots, shows
    the newest one, and no committed text is lost."""
    engine = Engine(EngineOptions(draft="ngram"))
    config = GenerationConfig(max_tokens=48, trace=True)
    with engine:
        recorded = list(engine.generate(chat_ids("Count from one to twenty."), config))
    snapshots = [e for e in recorded if isinstance(e, TreeSnapshot)]
    text = "".join(e.text for e in recorded if isinstance(e, TokensCommitted))
    assert len(snapshots) >= 10 and any(isinstance(e, StageUtilization) for e in recorded)

    async def run() -> None:
        app = ChatApp(lambda progress: Engine(EngineOptions(draft="none"), progress), config, "replay")
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.bridge.engine is not None)
            chat, tree = app.query_one(ChatLog), app.query_one(TreeView)
            chat.start_reply()
            rounds = 20
            for _ in range(rounds):
                assert isinstance(app.bridge.relay(recorded), GenerationFinished)
            await wait_for(pilot, lambda: chat.reply_text == text * rounds, 60)
            await wait_for(pilot, lambda: tree.snapshot is snapshots[-1], 30)  # the pane's next frame: the newest
            assert 1 <= tree.renders < len(snapshots) * rounds / 5, f"{tree.renders} draws"

    asyncio.run(run())


@pytest.mark.slow
def test_chat_on_two_stages() -> None:
    """Type a prompt, press enter: the reply in the chat pane is ``homespec generate``'s for the same prompt and
    seed (there in one process, here on 2 stage processes with a draft); the tree pane showed accepted nodes; the
    stage pane has a row per stage, each busy. Ctrl+C mid-reply stops it, and the next prompt gets its whole reply.
    A stage killed mid-reply gets an error screen, and enter starts new stages."""
    options = engine_options(None, 2, "specpipe", "ngram", 32, True, None, 0.0, "fp32", "cpu", 4096)
    config = GenerationConfig(max_tokens=24, sampling=SamplingConfig(temperature=0.8, seed=5), trace=True)
    prompt = "Name two planets."
    solo = subprocess.run(
        [HOMESPEC, "generate", prompt, "-n", "24", "--temperature", "0.8", "--seed", "5", "--draft", "none"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip

    async def run() -> None:
        app = make_app(options, config)
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.bridge.engine is not None)
            await ask(pilot, app, prompt)
            await wait_for(pilot, lambda: app.replies == 1)
            chat, tree, stages = app.query_one(ChatLog), app.query_one(TreeView), app.query_one(StageBars)
            assert chat.reply_text + "\n" == solo
            assert any("stage 2 ready" in t for t in app.load_log), app.load_log
            assert app.last_done is not None and not app.last_done.stopped
            assert tree.accepted_seen > 0 and tree.renders > 0
            assert len(stages.stages) == 2 and all(b > 0 for b in stages.busy)
            assert "tok/step" in str(app.query_one("#status").render())
            app.config = GenerationConfig(max_tokens=400, trace=True)
            await ask(pilot, app, "Write a long story about a lighthouse keeper.")
            await wait_for(pilot, lambda: len(chat.reply_text) > 20)
            await pilot.press("ctrl+c")
            await wait_for(pilot, lambda: app.replies == 2)
            assert app.last_done is not None and app.last_done.stopped
            app.config = config
            await ask(pilot, app, "What is the boiling point of water?")
            await wait_for(pilot, lambda: app.replies == 3)
            assert app.last_done is not None and app.last_done.finished is not None
            done = app.last_done.finished
            assert done.reason in ("eos", "length") and done.text and chat.reply_text == done.text and not app.busy
            assert app.bridge.engine.open_requests == 0
            # a stage dies mid-reply: an error screen, and enter starts new stages for the next prompt
            app.config = GenerationConfig(max_tokens=400, trace=True)
            before = len(chat.reply_text)
            await ask(pilot, app, "Tell me about the history of bridges.")
            await wait_for(pilot, lambda: chat.reply_text and len(chat.reply_text) != before)
            os.kill(app.bridge.engine.backend.cluster.procs[-1].pid, signal.SIGKILL)
            assert "stage" in await error_shown(pilot, app)
            await pilot.press("enter")
            await wait_for(pilot, lambda: app.bridge.engine is not None and not isinstance(app.screen, LoadingScreen))
            app.config = config
            await ask(pilot, app, prompt)
            await wait_for(pilot, lambda: app.replies == 5)
            assert app.last_done is not None and app.last_done.finished is not None
            # t toggles the tree pane (not while typing: there the prompt gets the letter); ctrl+l clears the
            # conversation, so the same prompt then gets the single-turn reply again
            box = app.query_one("#tree-box")
            app.query_one("#prompt", Input).focus()
            await pilot.press("t")
            assert app.query_one("#prompt", Input).value == "t" and box.display
            app.query_one("#prompt", Input).value = ""
            await pilot.press("escape", "t")
            await wait_for(pilot, lambda: not box.display, 30)
            await pilot.press("t")
            await wait_for(pilot, lambda: box.display, 30)
            assert app.conversation
            await pilot.press("ctrl+l")
            await wait_for(pilot, lambda: not app.conversation, 30)
            await ask(pilot, app, prompt)
            await wait_for(pilot, lambda: app.replies == 6)
            assert chat.reply_text + "\n" == solo  # a fresh conversation: the first turn's reply, to the token

    asyncio.run(run())
