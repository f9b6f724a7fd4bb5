"""Save an SVG screenshot of a real conversation: ``python -m tui.screenshot OUT.svg [--stages N] [--emulate P]``.

Drives the app with Textual's Pilot on the bundled model: asks one question, and takes the picture while the reply
is streaming (so the tree has nodes in flight) or when it is done. The README's picture is made with it."""

from __future__ import annotations

import argparse
import asyncio

from textual.widgets import Input

from homespec.config import GenerationConfig
from homespec.engine import EngineOptions
from tui.app import make_app


async def shoot(out: str, stages: int, emulate: str | None, prompt: str, after_chars: int) -> None:
    options = EngineOptions(
        draft="ngram+recycle", mode="specpipe" if stages > 1 else "ar", stages=stages, emulate=emulate
    )
    app = make_app(options, GenerationConfig(max_tokens=200, trace=True))
    async with app.run_test(size=(150, 46)) as pilot:
        while app.bridge.engine is None:
            await pilot.pause(0.1)
        box = app.query_one("#prompt", Input)
        box.value = prompt
        await pilot.press("enter")
        while len(app.query_one("#chat").reply_text) < after_chars and app.replies == 0:  # type: ignore[attr-defined]
            await pilot.pause(0.05)
        await pilot.pause(0.3)
        app.save_screenshot(out)
        app.bridge.stop.set()
        while app.replies == 0:
            await pilot.pause(0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--emulate", default="profiles/home-8x3090-1gbe.json")
    parser.add_argument("--prompt", default="Explain what a hash table is to a beginner, with a short Python example.")
    parser.add_argument("--after-chars", type=int, default=400)
    a = parser.parse_args()
    asyncio.run(shoot(a.out, a.stages, a.emulate or None, a.prompt, a.after_chars))


if __name__ == "__main__":
    main()
