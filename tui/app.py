"""``homespec chat``: the Textual app (DESIGN §9).

Left: the chat pane (the conversation as Markdown, the reply streaming in) over the input box. Right: the live
token tree of the current request (``t`` toggles it) over the stage pane (one row per stage). Bottom: the status
line. Keys: enter sends, ctrl+c stops the reply (the request leaves every stage; the next prompt works), ctrl+l
clears the conversation, ctrl+q quits. A loading screen shows while the model loads and the stages start; errors
(model not found, a stage lost) get a screen that goes back instead of a crash.

The app only consumes: the bridge (``tui/bridge.py``) runs the engine in a thread and posts messages.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, ClassVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Input, LoadingIndicator, Static

from homespec.config import GenerationConfig
from homespec.engine import Engine, EngineOptions, model_name
from tui import messages as m
from tui.bridge import Bridge
from tui.widgets.chat_log import ChatLog
from tui.widgets.stage_bars import StageBars
from tui.widgets.tree_view import TreeView


def make_app(options: EngineOptions, config: GenerationConfig) -> ChatApp:
    """The app for these engine options; the engine is built inside it, behind the loading screen."""
    name = model_name(options.model)
    where = f"{options.stages} stage processes" if options.mode != "ar" else "this process"
    if options.remote:
        where = "remote workers"
    describe = f"{name} · {options.mode} on {where} · draft {options.draft}"
    return ChatApp(lambda progress: Engine(options, progress), config, name, describe)


class LoadingScreen(ModalScreen[None]):
    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def compose(self) -> ComposeResult:
        with Vertical(id="loading-box"):
            yield Static(f"[b]HomeSpec[/b]  {self.what}")
            yield Static("starting…", id="loading-text")
            yield LoadingIndicator()

    def progress(self, text: str) -> None:
        self.query_one("#loading-text", Static).update(text)


class ErrorScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter", "back", "back"),
        Binding("ctrl+q", "app.quit", "quit"),
    ]

    def __init__(self, message: str, hint: str = "", fatal: bool = False) -> None:
        super().__init__()
        self.message, self.hint, self.fatal = message, hint, fatal

    def compose(self) -> ComposeResult:
        with Vertical(id="error-box"):
            yield Static("[b red]error[/b red]")
            yield Static(self.message, markup=False, id="error-message")
            if self.hint:
                yield Static(f"hint: {self.hint}", markup=False)
            yield Static("[dim]enter: " + ("quit" if self.fatal else "back") + " · ctrl+q: quit[/dim]")

    def action_back(self) -> None:
        if self.fatal:
            self.app.exit(return_code=1)
        else:
            self.dismiss()


class ChatApp(App[None]):
    TITLE = "HomeSpec"
    CSS_PATH = "app.tcss"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("ctrl+c", "stop", "stop reply", priority=True),
        Binding("ctrl+l", "clear", "clear"),
        Binding("ctrl+q", "quit", "quit", priority=True),
        Binding("t", "toggle_tree", "tree"),
        Binding("ctrl+t", "tree", "tree", show=False),
        Binding("escape", "blur", "leave the prompt", show=False),
    ]

    def __init__(
        self,
        make_engine: Callable[[Callable[[str], None]], Any],
        config: GenerationConfig,
        model_name: str,
        describe: str = "",
    ) -> None:
        super().__init__()
        self.bridge = Bridge(self.post_message, make_engine)
        self.config, self.model_name, self.describe = config, model_name, describe
        self.conversation: list[dict[str, str]] = []
        self.busy = False  # a reply is being generated
        self.replies = 0  # replies finished (or stopped)
        self.last_done: m.ReplyDone | None = None
        self.load_log: list[str] = []  # what the loading screen said
        self._reply_started = 0.0
        self._first_token_at = 0.0
        self._tokens = 0
        self._last_wave = 0  # nodes in the wave verified last

    # -- layout --------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        with Horizontal(id="main"):
            with Vertical(id="left"):
                yield ChatLog(id="chat")
                yield Input(placeholder="Ask something · enter sends · ctrl+c stops · ctrl+q quits", id="prompt")
            with Vertical(id="right"):
                with VerticalScroll(id="tree-box"):
                    yield Static("token tree", classes="pane-title")
                    yield TreeView(id="tree")
                with Vertical(id="stage-box"):
                    yield Static("stages", classes="pane-title")
                    yield StageBars(id="stages")
        yield Static("", id="status")

    def on_mount(self) -> None:
        # the panes, held here: messages keep arriving while another screen (loading, error) is on top
        self.chat_log, self.tree_view = self.query_one(ChatLog), self.query_one(TreeView)
        self.stage_bars, self.status_line = self.query_one(StageBars), self.query_one("#status", Static)
        self.prompt_box = self.query_one("#prompt", Input)
        self.push_screen(LoadingScreen(self.describe or self.model_name))
        self._load()

    @work(thread=True, exclusive=True, group="load")
    def _load(self) -> None:
        self.bridge.load()

    # -- engine lifecycle ----------------------------------------------------------------------------------
    def on_load_progress(self, msg: m.LoadProgress) -> None:
        self.load_log.append(msg.text)
        if isinstance(self.screen, LoadingScreen):
            self.screen.progress(msg.text)

    def on_engine_ready(self, msg: m.EngineReady) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.pop_screen()
        engine = msg.engine
        self.stage_bars.configure(engine.stage_info(), engine.options.draft)
        self._status(ready=True)
        self.prompt_box.focus()

    def on_engine_failed(self, msg: m.EngineFailed) -> None:
        if isinstance(self.screen, LoadingScreen):
            self.pop_screen()
        self.push_screen(ErrorScreen(msg.message, msg.hint, fatal=True))

    # -- a reply -------------------------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.busy or self.bridge.engine is None:
            return
        event.input.value = ""
        self.conversation.append({"role": "user", "content": text})
        chat = self.chat_log
        chat.add_user(text)
        chat.start_reply()
        self.busy = True
        self._reply_started, self._first_token_at, self._tokens = time.perf_counter(), 0.0, 0
        self._generate(list(self.conversation))

    @work(thread=True, exclusive=True, group="generate")
    def _generate(self, conversation: list[dict[str, str]]) -> None:
        self.bridge.generate(conversation, self.config)

    async def on_committed(self, msg: m.Committed) -> None:
        if not self._first_token_at:
            self._first_token_at = time.perf_counter()
        await self.chat_log.append(msg.text)

    def on_step_done(self, msg: m.StepDone) -> None:
        self._tokens, self._last_wave = msg.tokens, msg.wave_size
        self._status(step=msg)

    def on_tree_changed(self, msg: m.TreeChanged) -> None:
        self.tree_view.show(msg.snapshot)

    def on_stages_changed(self, msg: m.StagesChanged) -> None:
        tree = self.tree_view.snapshot
        waves = None
        if tree is not None:  # nodes per stage: those in flight where their wave is, the verified wave at the last
            waves = [0] * tree.stages
            for n in tree.nodes:
                if n.state == "sent" and 0 <= n.stage < tree.stages:
                    waves[n.stage] += 1
            waves[-1] = self._last_wave
        self.stage_bars.show(msg.utilization, waves, msg.utilization.draft)

    async def on_reply_done(self, msg: m.ReplyDone) -> None:
        chat = self.chat_log
        await chat.end_reply()
        text = msg.finished.text if msg.finished else chat.reply_text
        self.conversation.append({"role": "assistant", "content": text})
        if msg.stopped:
            chat.note("(stopped)")
        self.busy = False
        self.replies += 1
        self.last_done = msg
        self._status(done=msg)

    async def on_reply_failed(self, msg: m.ReplyFailed) -> None:
        await self.chat_log.end_reply()
        self.conversation.pop()  # the prompt that got no reply
        self.chat_log.note("(failed)")
        self.busy = False
        self.replies += 1
        if msg.lost:  # the stages are gone: back from the error screen, start them again
            self.bridge.close()
            hint = (msg.hint + "; " if msg.hint else "") + "enter restarts the stages"
            self.push_screen(ErrorScreen(msg.message, hint), callback=lambda _: self._reload())
        else:
            self.push_screen(ErrorScreen(msg.message, msg.hint))

    def _reload(self) -> None:
        self.push_screen(LoadingScreen(self.describe or self.model_name))
        self._load()

    # -- keys ----------------------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.busy:
            self.bridge.stop.set()

    async def action_clear(self) -> None:
        if not self.busy:
            self.conversation.clear()
            await self.chat_log.clear()

    def action_toggle_tree(self) -> None:
        self.screen_stack[0].query_one("#right").toggle_class("hidden-tree")  # the main screen, under any modal

    def action_tree(self) -> None:
        self.action_toggle_tree()

    def action_blur(self) -> None:
        self.set_focus(None)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # 't' types into the prompt while it has the focus: there ctrl+t toggles (or escape leaves the prompt)
        return not (action == "toggle_tree" and isinstance(self.focused, Input))

    async def action_quit(self) -> None:
        self.bridge.stop.set()
        self.exit()

    def on_unmount(self) -> None:
        self.bridge.close()

    # -- status line ---------------------------------------------------------------------------------------
    def _status(self, ready: bool = False, step: m.StepDone | None = None, done: m.ReplyDone | None = None) -> None:
        engine = self.bridge.engine
        mode = engine.options.mode if engine else "?"
        parts: list[str] = []
        if step is not None:
            elapsed = time.perf_counter() - (self._first_token_at or self._reply_started)
            rate = (step.tokens - 1) / elapsed if step.tokens > 1 and elapsed > 0 else 0.0
            tbt = 1000 / rate if rate else 0.0
            parts += [f"{rate:.1f} tok/s", f"TBT {tbt:.0f} ms"]
            parts.append(f"{step.tokens / step.steps if step.steps else 0:.2f} tok/step")
            parts.append(f"accept {step.accepted / step.forwards if step.forwards else 0:.2f}/fwd")
        elif done is not None and done.stats is not None:
            s = done.stats
            parts += [f"{s.tokens_per_s:.1f} tok/s", f"TBT {1000 / s.tokens_per_s if s.tokens_per_s else 0:.0f} ms"]
            parts += [f"{s.tokens_per_step:.2f} tok/step", f"accept {s.accepted_per_step:.2f}/fwd"]
        parts += [mode, self.model_name]
        self.status_line.update(" · ".join(parts))
