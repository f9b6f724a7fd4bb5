"""The chat pane: the conversation as Markdown, the assistant's reply growing as tokens are committed (through
Textual's MarkdownStream, which batches fragments that arrive faster than it renders)."""

from __future__ import annotations

from textual.containers import VerticalScroll
from textual.widgets import Markdown, Static
from textual.widgets._markdown import MarkdownStream


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
        self._stream: MarkdownStream | None = None

    def add_user(self, text: str) -> None:
        self.mount(Static(f"> {text}", classes="user", markup=False))
        self.scroll_end(animate=False)

    def start_reply(self) -> None:
        self.reply_text = ""
        reply = Markdown("", classes="assistant")
        self.mount(reply)
        self._stream = Markdown.get_stream(reply)

    async def append(self, text: str) -> None:
        if self._stream is None:
            self.start_reply()
        assert self._stream is not None
        self.reply_text += text
        await self._stream.write(text)
        self.scroll_end(animate=False)

    async def end_reply(self) -> None:
        """The reply is complete: render what is left and close its stream."""
        if self._stream is not None:
            await self._stream.stop()
            self._stream = None

    def note(self, text: str) -> None:
        self.mount(Static(text, classes="note", markup=False))
        self.scroll_end(animate=False)

    async def clear(self) -> None:
        await self.end_reply()
        await self.remove_children()
        self.reply_text = ""
