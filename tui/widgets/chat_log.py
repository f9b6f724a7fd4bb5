"""The chat pane: the conversation as Markdown, the assistant's reply growing as tokens are committed."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static


class ChatLog(VerticalScroll):
    DEFAULT_CSS = """
    ChatLog { height: 1fr; }
    ChatLog .user { color: $text-accent; margin: 1 0 0 0; }
    ChatLog Markdown.assistant { margin: 0; padding: 0 1; }
    ChatLog .note { color: $text-muted; }
    """

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.reply_text = ""  # the reply being streamed (the last one when idle)
        self._reply: Markdown | None = None

    def add_user(self, text: str) -> None:
        self.mount(Static(f"> {text}", classes="user", markup=False))
        self.scroll_end(animate=False)

    def start_reply(self) -> None:
        self.reply_text = ""
        self._reply = Markdown("", classes="assistant")
        self.mount(self._reply)

    def append(self, text: str) -> None:
        if self._reply is None:
            self.start_reply()
        self.reply_text += text
        assert self._reply is not None
        self._reply.update(self.reply_text)
        self.scroll_end(animate=False)

    def note(self, text: str) -> None:
        self.mount(Static(text, classes="note", markup=False))
        self.scroll_end(animate=False)

    def clear(self) -> None:
        self.remove_children()
        self._reply = None
        self.reply_text = ""
