"""Every wire message as a frozen dataclass with a ``kind`` literal and the protocol version (DESIGN §7).

Pure: stdlib only. Tensors travel as ``RawTensor`` (dtype *name*, shape, bytes); converting them to framework
tensors is the receiver's business. ``from_fields`` validates a decoded header against the dataclass's field
types before anything is built, so a malformed header raises ``ValueError`` and never reaches a stage's logic.
"""

from __future__ import annotations

import math
import typing
from dataclasses import MISSING, dataclass, fields
from typing import Any, ClassVar

from homespec.core.planner import WEIGHT_FORMATS

PROTOCOL_VERSION = 1

#: How many of the target's top next tokens a Result carries per computed position (display, token recycling, the
#: API's top_logprobs).
RESULT_TOP_K = 8

#: The most tree nodes a stage's cache may hold (``Assign.max_tree``), and so the longest id list one message may
#: carry; a stage checks its own, smaller, ``max_tree`` too.
MAX_TREE_LIMIT = 4096
#: Requests a stage holds open at once unless the head says otherwise (the server's --max-concurrency); a stage
#: also holds no more than its free memory has KV caches for.
DEFAULT_MAX_REQUESTS = 8
#: The longest context any stage is given (positions are below it).
MAX_CONTEXT_LIMIT = 1 << 24
#: Every integer on the wire fits a signed 64-bit value (msgpack carries more; nothing here needs it).
INT_LIMIT = 2**63

#: dtype name -> bytes per element. The name, never the element size alone, says how to read the bytes.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int64": 8,
    "int32": 4,
    "uint8": 1,
    "bool": 1,
}


@dataclass(frozen=True)
class RawTensor:
    dtype: str
    shape: tuple[int, ...]
    data: bytes | memoryview

    def __post_init__(self) -> None:
        check_tensor_spec(self.dtype, self.shape)
        if len(self.data) != nbytes(self.dtype, self.shape):
            raise ValueError(
                f"tensor {self.dtype}{list(self.shape)} needs {nbytes(self.dtype, self.shape)} bytes, "
                f"got {len(self.data)}"
            )


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return DTYPE_SIZES[dtype] * math.prod(shape)


def check_tensor_spec(dtype: object, shape: object) -> None:
    if dtype not in DTYPE_SIZES:
        raise ValueError(f"unknown dtype {dtype!r}")
    if not isinstance(shape, tuple) or not all(type(d) is int and 0 <= d < 2**31 for d in shape) or len(shape) > 8:
        raise ValueError(f"bad shape {shape!r}")


NO_TENSOR = RawTensor("float32", (0,), b"")  # an absent optional tensor


def _in_range(kind: str, name: str, value: float, lo: float, hi: float) -> None:
    """``lo <= value <= hi`` and finite, else ValueError (the codec's "malformed message")."""
    if not (math.isfinite(value) and lo <= value <= hi):
        raise ValueError(f"{kind}.{name} = {value!r} is outside [{lo:g}, {hi:g}]")


def _ids(
    kind: str, name: str, values: tuple[int, ...], lo: int = 0, most: int = MAX_TREE_LIMIT, hi: int = INT_LIMIT
) -> None:
    """A list of ids: at most ``most`` of them, each in [lo, hi)."""
    if len(values) > most:
        raise ValueError(f"{kind}.{name}: {len(values)} ids, at most {most}")
    if values and (min(values) < lo or max(values) >= hi):
        raise ValueError(f"{kind}.{name}: ids outside [{lo}, {hi})")


@dataclass(frozen=True)
class Message:
    kind: ClassVar[str] = ""

    def tensors(self) -> tuple[RawTensor, ...]:
        return tuple(getattr(self, name) for name in tensor_names(type(self)))


@dataclass(frozen=True)
class Assign(Message):
    """Head -> stage: which layers to load and how to run them."""

    kind: ClassVar[str] = "assign"
    stage: int
    num_stages: int
    model: str  # a path or repo id on the stage's own disk; never weights over the wire
    layer_start: int
    layer_end: int
    dtype: str
    device: str
    max_context: int
    max_tree: int
    # emulation (DESIGN §10; all 0 = off): a step of n rows is padded to the planner's time model,
    # max(emu_base_ms, emu_ms_per_row * n) + emu_overhead_ms; sending it on takes emu_link_ms + emu_link_ms_per_row * n
    emu_base_ms: float = 0.0
    emu_ms_per_row: float = 0.0
    emu_overhead_ms: float = 0.0
    emu_link_ms: float = 0.0
    emu_link_ms_per_row: float = 0.0
    model_digest: str = ""  # the head's ModelSource.digest(): a stage whose copy of the model differs refuses to run
    weights: str = "auto"  # the linear weights' format (model/formats.py); activations and KV in ``dtype``
    max_requests: int = DEFAULT_MAX_REQUESTS  # requests open on the stage at once (each holds a KV cache)
    # an EAGLE-3 head whose fc columns for this stage's layers it adds up: a path on the stage's disk, a hub repo id,
    # or ``shipped:NAME`` (the head shipped with HomeSpec, read from the stage's own installation)
    taps: str = ""

    def __post_init__(self) -> None:
        k = self.kind
        _in_range(k, "num_stages", self.num_stages, 1, 4096)
        _in_range(k, "stage", self.stage, 0, self.num_stages - 1)
        _in_range(k, "layer_start", self.layer_start, 0, 1 << 20)
        _in_range(k, "layer_end", self.layer_end, self.layer_start + 1, 1 << 20)
        _in_range(k, "max_context", self.max_context, 1, MAX_CONTEXT_LIMIT)
        _in_range(k, "max_tree", self.max_tree, 1, MAX_TREE_LIMIT)
        _in_range(k, "max_requests", self.max_requests, 1, 4096)
        if self.weights not in WEIGHT_FORMATS:
            raise ValueError(f"{k}: weights {self.weights!r} is not one of {', '.join(WEIGHT_FORMATS)}")
        for name in ("emu_base_ms", "emu_ms_per_row", "emu_overhead_ms", "emu_link_ms", "emu_link_ms_per_row"):
            _in_range(k, name, getattr(self, name), 0.0, 1e6)


@dataclass(frozen=True)
class Wave(Message):
    """One pipeline step's micro-batch: the rows of one or more requests (SpecPipe-DB, DESIGN §4.2), each request's
    rows contiguous and in ``requests`` order, so that a stage runs them as one forward. Tree nodes, or
    (``prefix``, exactly one request) a chunk of committed prompt tokens."""

    kind: ClassVar[str] = "wave"
    step: int
    prefix: bool  # True: committed prompt tokens (causal chunk) of one request; False: tree nodes
    requests: tuple[int, ...]
    counts: tuple[int, ...]  # rows of each request
    prune_seqs: tuple[int, ...]  # per request: the stage must have applied its Prunes up to this seq first
    nodes: tuple[int, ...]  # tree waves: one per row; prefix chunks: ()
    parents: tuple[int, ...]
    positions: tuple[int, ...]  # one per row
    data: RawTensor  # int64 [rows] token ids into the first stage; hidden [rows, hidden] after it
    busy_s: tuple[float, ...] = ()  # each stage it passed: its busy seconds so far (live utilization)
    carry: RawTensor = NO_TENSOR  # float32 [rows, hidden]: EAGLE-3's fc sum so far (Assign.taps), else [0]

    def __post_init__(self) -> None:
        if not (len(self.requests) == len(self.counts) == len(self.prune_seqs)):
            raise ValueError("wave: requests, counts and prune_seqs differ in length")
        if any(c < 0 for c in self.counts) or len(set(self.requests)) != len(self.requests):
            raise ValueError("wave: negative count or repeated request")
        rows = sum(self.counts)
        if len(self.positions) != rows:
            raise ValueError(f"wave: {len(self.positions)} positions for {rows} rows")
        if self.prefix:
            if len(self.requests) != 1 or self.nodes or self.parents:
                raise ValueError("wave: a prefix chunk belongs to one request and has no nodes")
        elif not (len(self.nodes) == len(self.parents) == rows):
            raise ValueError(f"wave: {len(self.nodes)} nodes and {len(self.parents)} parents for {rows} rows")
        if not self.data.shape or self.data.shape[0] != rows:
            raise ValueError(f"wave: data {list(self.data.shape)} for {rows} rows")
        if self.carry.shape != (0,) and (
            self.carry.dtype != "float32" or len(self.carry.shape) != 2 or self.carry.shape[0] != rows
        ):
            raise ValueError(f"wave: carry {self.carry.dtype}{list(self.carry.shape)} for {rows} rows")
        _in_range("wave", "step", self.step, -1, INT_LIMIT - 1)
        _ids("wave", "requests", self.requests, lo=1)
        _ids("wave", "prune_seqs", self.prune_seqs)
        _ids("wave", "nodes", self.nodes)
        _ids("wave", "parents", self.parents, lo=-1)
        _ids("wave", "positions", self.positions, most=1 << 24, hi=MAX_CONTEXT_LIMIT)
        if any(b < 0 or not math.isfinite(b) for b in self.busy_s) or len(self.busy_s) > 4096:
            raise ValueError("wave: bad busy_s")

    def segments(self) -> list[tuple[int, int, int, int]]:
        """(request, prune_seq, first row, end row) of each request's rows."""
        out, at = [], 0
        for request, seq, count in zip(self.requests, self.prune_seqs, self.counts, strict=True):
            out.append((request, seq, at, at + count))
            at += count
        return out


@dataclass(frozen=True)
class Prune(Message):
    """Head -> every stage: committed nodes join the prefix (in order); dead nodes are dropped."""

    kind: ClassVar[str] = "prune"
    request: int
    step: int
    seq: int  # per request, from 1, in the order the head sent them
    committed: tuple[int, ...]
    dead: tuple[int, ...]

    def __post_init__(self) -> None:
        _in_range("prune", "request", self.request, 1, INT_LIMIT - 1)
        _in_range("prune", "seq", self.seq, 1, INT_LIMIT - 1)
        _in_range("prune", "step", self.step, -1, INT_LIMIT - 1)
        _ids("prune", "committed", self.committed)
        _ids("prune", "dead", self.dead)


@dataclass(frozen=True)
class Result(Message):
    """Last stage -> head: per node, the target's next token and its top log-probs."""

    kind: ClassVar[str] = "result"
    request: int
    step: int
    nodes: tuple[int, ...]
    next_tokens: tuple[int, ...]
    top_tokens: RawTensor  # int64 [n, k]
    top_logprobs: RawTensor  # float32 [n, k]
    hidden: RawTensor  # float32 [n, hidden]: the target's last-layer states, when Start asked for features; else [0]
    next_logprobs: tuple[float, ...] = ()  # per node, the log-prob of its next token (raw distribution)
    busy_s: tuple[float, ...] = ()  # every stage's busy seconds so far, carried along by the wave

    def __post_init__(self) -> None:
        _ids("result", "nodes", self.nodes)
        _ids("result", "next_tokens", self.next_tokens, most=len(self.nodes))
        if len(self.next_tokens) != len(self.nodes) or len(self.next_logprobs) not in (0, len(self.nodes)):
            raise ValueError("result: nodes, next_tokens and next_logprobs differ in length")


@dataclass(frozen=True)
class Start(Message):
    """Head -> every stage: a request begins (its sampling key lives on the last stage)."""

    kind: ClassVar[str] = "start"
    request: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    features: bool = False  # the last stage returns its hidden states with every Result (a draft head needs them)
    taps: bool = False  # ... and those features are EAGLE-3's fc sum (Assign.taps), not the last hidden states
    prompt_top: bool = False  # prompt chunks' Results carry the top-k of every position (token recycling)

    def __post_init__(self) -> None:  # the ranges of config.SamplingConfig, checked before a stage builds one
        _in_range("start", "request", self.request, 1, INT_LIMIT - 1)
        _in_range("start", "temperature", self.temperature, 0.0, 100.0)
        _in_range("start", "top_p", self.top_p, 1e-12, 1.0)
        _in_range("start", "top_k", self.top_k, 0, 1 << 31)
        _in_range("start", "seed", self.seed, 0, INT_LIMIT - 1)


@dataclass(frozen=True)
class Abort(Message):
    kind: ClassVar[str] = "abort"
    request: int
    reason: str

    def __post_init__(self) -> None:
        _in_range("abort", "request", self.request, 0, INT_LIMIT - 1)


@dataclass(frozen=True)
class Heartbeat(Message):
    """A ping (head -> stages, head -> workers) or its answer, which carries the answerer's count of bad messages;
    a stage's first one (it has loaded) also the bytes of weights it holds."""

    kind: ClassVar[str] = "heartbeat"
    sender: int
    seq: int
    bad_messages: int = 0
    weight_bytes: int = 0


@dataclass(frozen=True)
class StageStats(Message):
    """Stage -> head when a request ends: what the stage did for it."""

    kind: ClassVar[str] = "stats"
    stage: int
    request: int
    steps: int
    busy_s: float
    rows: int
    dropped_rows: int
    bad_messages: int


@dataclass(frozen=True)
class Shutdown(Message):
    kind: ClassVar[str] = "shutdown"
    reason: str = ""


@dataclass(frozen=True)
class Failure(Message):
    """Stage -> head: a request failed on a stage (the stage itself keeps running)."""

    kind: ClassVar[str] = "failure"
    stage: int
    request: int
    message: str


# -- head <-> worker daemon (``homespec worker``, pipeline/daemon.py) ---------------------------------------------


@dataclass(frozen=True)
class Hello(Message):
    """Head -> worker: who are you (answered with WorkerInfo); with ``measure`` it measures its devices first."""

    kind: ClassVar[str] = "hello"
    measure: bool = False


@dataclass(frozen=True)
class WorkerInfo(Message):
    """Worker -> head: its name, public key, ports and its host profile (profiles/README.md, as JSON text that the
    head parses and validates like a profile file)."""

    kind: ClassVar[str] = "worker_info"
    name: str
    key: str  # z85 CurveZMQ public key
    port: int  # the control port (data ports follow: port + 2 + slot)
    devices: tuple[str, ...]  # the torch devices it serves, in slot order (cpu, cuda:0, mps…)
    profile: str  # a profile host entry, JSON
    session: int = 0  # the session it serves now (0: free)


@dataclass(frozen=True)
class Deploy(Assign):
    """Head -> worker: run one stage of a session (the Assign fields) wired to its neighbours over CurveZMQ."""

    kind: ClassVar[str] = "deploy"
    session: int = 0
    slot: int = 0  # which of the worker's devices, and so which data port
    next_address: str = ""  # the next stage's input, or the head's results socket for the last stage
    next_key: str = ""  # the public key of whoever binds next_address
    upstream_key: str = ""  # who may send into this stage's input: the previous stage's worker, or the head
    control_address: str = ""  # the head's broadcasts (SUB)
    report_address: str = ""  # the head's report socket (PUSH)
    head_key: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        _in_range("deploy", "slot", self.slot, 0, 255)
        _in_range("deploy", "session", self.session, 0, INT_LIMIT - 1)


@dataclass(frozen=True)
class Deployed(Message):
    """Worker -> head: the stage process is started (it says Heartbeat on the report socket once it has loaded)."""

    kind: ClassVar[str] = "deployed"
    session: int
    stage: int
    in_address: str


@dataclass(frozen=True)
class Release(Message):
    """Head -> worker: the session is over; stop its stages and free their memory."""

    kind: ClassVar[str] = "release"
    session: int
    reason: str = ""


@dataclass(frozen=True)
class Echo(Message):
    """Head <-> worker: a round trip of ``payload`` bytes (link latency and bandwidth, ``homespec profile --lan``)."""

    kind: ClassVar[str] = "echo"
    seq: int
    payload: RawTensor  # uint8 [n]


REGISTRY: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Assign,
        Wave,
        Prune,
        Result,
        Start,
        Abort,
        Heartbeat,
        StageStats,
        Shutdown,
        Failure,
        Hello,
        WorkerInfo,
        Deploy,
        Deployed,
        Release,
        Echo,
    )
}


_HINTS: dict[type[Message], dict[str, Any]] = {}
_TENSOR_NAMES: dict[type[Message], tuple[str, ...]] = {}


def _hints(cls: type[Message]) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:  # typing.get_type_hints evaluates the annotations: slow, so once per class
        hints = _HINTS[cls] = typing.get_type_hints(cls)
    return hints


def _is_tensor_field(cls: type[Message], name: str) -> bool:
    return _hints(cls)[name] is RawTensor


def header_fields(msg: Message) -> dict[str, Any]:
    """The non-tensor fields of a message, as plain values (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in fields(msg):
        if not _is_tensor_field(type(msg), f.name):
            value = getattr(msg, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def tensor_names(cls: type[Message]) -> tuple[str, ...]:
    names = _TENSOR_NAMES.get(cls)
    if names is None:
        names = _TENSOR_NAMES[cls] = tuple(f.name for f in fields(cls) if _is_tensor_field(cls, f.name))
    return names


_SCALARS: dict[Any, tuple[type, ...]] = {int: (int,), float: (float, int), str: (str,), bool: (bool,)}


def from_fields(cls: type[Message], values: dict[str, Any], tensors: list[RawTensor]) -> Message:
    """Build a message from decoded header values, checking every field's type first."""
    hints = _hints(cls)
    names = tensor_names(cls)
    if len(tensors) != len(names):
        raise ValueError(f"{cls.kind}: expected {len(names)} tensors, got {len(tensors)}")
    expected = {f.name for f in fields(cls)} - set(names)
    unknown = set(values) - expected
    if unknown:
        raise ValueError(f"{cls.kind}: unknown fields {sorted(unknown)}")
    kwargs: dict[str, Any] = dict(zip(names, tensors, strict=True))
    for f in fields(cls):
        if f.name in names:
            continue
        if f.name not in values:
            if f.default is not MISSING:
                continue
            raise ValueError(f"{cls.kind}: missing field {f.name!r}")
        kwargs[f.name] = _check(cls.kind, f.name, hints[f.name], values[f.name])
    return cls(**kwargs)


def _check(kind: str, name: str, hint: Any, value: Any) -> Any:
    if hint in _SCALARS:
        if type(value) not in _SCALARS[hint] or (hint is not bool and isinstance(value, bool)):
            raise ValueError(f"{kind}.{name}: expected {hint.__name__}, got {type(value).__name__}")
        return float(value) if hint is float else value
    if typing.get_origin(hint) is tuple:
        item = typing.get_args(hint)[0]
        if not isinstance(value, list | tuple):
            raise ValueError(f"{kind}.{name}: expected a list")
        return tuple(_check(kind, name, item, v) for v in value)
    raise ValueError(f"{kind}.{name}: unsupported field type {hint!r}")
