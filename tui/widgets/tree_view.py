"""The token-tree pane: the live tree of the current request as the last verification found it.

Accepted nodes (this step's path) are bold green, nodes in flight are coloured by the stage their wave is in, drafted
nodes not sent yet are grey, and the branches pruned at that step stay on screen dimmed and struck through until the
next snapshot; a flush (the target's token was not in the tree) is marked. Snapshots arrive at the step rate; the
pane draws at most ``FPS`` times a second, always the newest one (``renders`` counts the draws, for tests).
"""

from __future__ import annotations

from rich.text import Text
from rich.tree import Tree
from textual.widgets import Static

from homespec.events import TreeNodeView, TreeSnapshot

FPS = 10
MAX_NODES = 80  # nodes drawn at most (the best-scoring first: the tree comes in the head's order)
STAGE_COLORS = ("cyan", "magenta", "yellow", "blue", "bright_cyan", "bright_magenta", "bright_yellow", "bright_blue")


def _label(text: str) -> str:
    """A token as a tree label: newlines and tabs as symbols, a blank token quoted."""
    shown = text.replace("\n", "⏎").replace("\t", "⇥")
    return shown if shown.strip() else f"'{shown}'"


def render_tree(snap: TreeSnapshot, max_nodes: int = MAX_NODES) -> Tree:
    """The snapshot as a rich Tree (pure: no app state). A chain of single children is one line, each token keeping
    its own style, so the long paths of a good draft read as text."""
    accepted, pruned = set(snap.accepted), set(snap.pruned)
    title = Text.assemble(
        ("step ", "dim"), (str(snap.step), "bold"), ("  accepted ", "dim"), (str(len(snap.accepted)), "bold green"),
        ("  pruned ", "dim"), (str(len(snap.pruned)), "bold red"),
    )  # fmt: skip
    if snap.flushed:
        title.append("  flush", style="bold yellow")
    out = Tree(title)
    nodes = {n.id: n for n in snap.nodes[:max_nodes]}
    children: dict[int, list[int]] = {}
    roots = []
    for n in nodes.values():
        if n.parent in nodes:
            children.setdefault(n.parent, []).append(n.id)
        else:
            roots.append(n.id)

    def style(n: TreeNodeView) -> str:
        if n.id in accepted:
            return "bold green"
        if n.id in pruned:
            return "dim strike"
        if n.state == "sent":
            return STAGE_COLORS[n.stage % len(STAGE_COLORS)]
        return "green" if n.state == "done" else "grey50"

    def add(branch: Tree, first: int) -> None:
        label, node = Text(), first
        while True:
            n = nodes[node]
            if label:
                label.append("·", style="grey35")
            label.append(_label(n.text), style=style(n))
            kids = children.get(node, [])
            if len(kids) != 1 or n.state != nodes[kids[0]].state or (n.id in pruned) != (kids[0] in pruned):
                break
            node = kids[0]
        n = nodes[node]
        if n.state == "sent" and n.id not in pruned:
            label.append(f" s{n.stage + 1}", style="dim")
        sub = branch.add(label)
        for kid in children.get(node, []):
            add(sub, kid)

    for r in roots:
        add(out, r)
    if len(snap.nodes) > max_nodes:
        out.add(Text(f"… {len(snap.nodes) - max_nodes} more nodes", style="dim"))
    return out


class TreeView(Static):
    """Shows the newest TreeSnapshot, redrawn at most FPS times a second."""

    DEFAULT_CSS = "TreeView { height: auto; }"

    def __init__(self, **kw: object) -> None:
        super().__init__(Text("no request yet", style="dim"), **kw)  # type: ignore[arg-type]
        self.snapshot: TreeSnapshot | None = None
        self.renders = 0  # draws done (tests count them)
        self.accepted_seen = 0  # accepted nodes shown over the session
        self._dirty = False

    def on_mount(self) -> None:
        self.set_interval(1 / FPS, self._draw)

    def show(self, snap: TreeSnapshot) -> None:
        self.snapshot = snap
        self.accepted_seen += len(snap.accepted)
        self._dirty = True

    def _draw(self) -> None:
        if self._dirty and self.snapshot is not None:
            self._dirty = False
            self.renders += 1
            self.update(render_tree(self.snapshot))
