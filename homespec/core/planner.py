"""Which devices run which layers (DESIGN §6). Pure: stdlib only; profiles and model files are read by the shell.

Vocabulary. A **device** is one GPU, a Mac's unified memory, or a host's CPU and RAM; a **host** is one machine (one
``homespec worker``). A **chain** is the ordered list of devices that run stages 1..S. A **plan** is a chain with each
stage's contiguous layer range, its memory and its modeled times, plus the devices left out and why.

The model of time, for a stage of ``params`` parameters over ``rows`` wave rows on a device:

    t(rows) = max(read bytes / memory bandwidth, 2 · params · rows / (FLOP/s · efficiency)) + overhead

where the read bytes are the stage's weights plus the KV it attends over (half the planned context on average); a
link costs its latency plus rows · hidden · activation bytes / its bandwidth. The modeled time between tokens:

- ``pp``: a token walks every stage and link: Σ (t_i(1) + link_i(1));
- ``tree``: a tree of B rows walks every stage and link per round and yields ``tree_tokens`` tokens (measured);
- ``specpipe``: one step is the slowest stage plus its link at W rows; a miss (probability 1 - h per token, h the
  draft's per-depth hit rate) costs about S steps, so tokens per step = 1 / (h + (1 - h) · S) (DESIGN §5), and never
  fewer than ``tree``'s per S steps (a score-ordered wave can carry a whole tree; at S = 1 the two are alike).

The search. For a fixed chain, dynamic programming over layers places contiguous ranges minimizing the objective
mode's cost (the bottleneck step for ``specpipe``, the sum for ``pp`` and ``tree``), each stage within its memory
(weights + KV for the context + activations + headroom). Over chains: every order of the hosts (a host's devices stay
together, fastest first), then devices are dropped one at a time while dropping one lowers the modeled TBT — a device
that only slows the chain is left out, and the plan says why.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from homespec.core.step import DEFAULT_MAX_TREE, DEFAULT_WAVE_SIZE
from homespec.errors import PlanError

GB = 1e9
GiB = 2**30

#: Bytes per weight of each weight format as a stage holds it (model/quant.py), before the scales: float formats
#: their dtype; int8 one byte (one scale per output row, negligible); int4 half a byte plus a scale and a zero per
#: group of ``INT4_PLAN_GROUP`` in the activation dtype (``PlanOptions.weight_bytes``).
WEIGHT_BYTES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "int8": 1.0, "int4": 0.5}
INT4_PLAN_GROUP = 32  # GGUF's Q4 blocks; a float checkpoint quantized at load uses 128, so this is the larger size
ACT_DTYPES = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0}
#: ``--weights``: a format of WEIGHT_BYTES, or ``auto`` (model/formats.py).
WEIGHT_FORMATS = ("auto", "fp32", "fp16", "bf16", "int8", "int4")
PLAN_MODES = ("pp", "tree", "specpipe")


def even_split(num_layers: int, stages: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges [a, b) for ``stages`` stages, sizes differing by at most one."""
    bounds = [round(i * num_layers / stages) for i in range(stages + 1)]
    return list(itertools.pairwise(bounds))


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs of a model, read from its ``config.json`` (and checked against its weight index)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    attention_bias: bool = False  # Qwen2's q/k/v biases
    index_bytes: int = 0  # the safetensors index's total_size (0: no index), in the published dtype
    experts: int = 0  # mixture of experts (Qwen3-MoE, Mixtral): experts per MoE layer; 0 for a dense model
    experts_per_token: int = 0  # the router's top k
    expert_intermediate: int = 0  # one expert's MLP width
    moe_layers: int = 0  # how many layers are MoE (Qwen3-MoE may keep some dense: mlp_only_layers)

    def _attention_params(self) -> int:
        h, q, kv = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim
        return h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0) + 2 * h

    def _mlp_params(self, experts: float) -> float:
        """An average layer's feed-forward parameters when ``experts`` of an MoE layer's experts count (a dense
        layer's MLP otherwise), with the router."""
        dense = 3 * self.hidden * self.intermediate
        if not self.experts:
            return dense
        share = self.moe_layers / self.layers
        moe = experts * 3 * self.hidden * self.expert_intermediate + self.experts * self.hidden
        return share * moe + (1 - share) * dense

    @property
    def layer_params(self) -> int:
        """What a layer holds (an average layer; every expert counts)."""
        return round(self._attention_params() + self._mlp_params(self.experts))

    def layer_read_params(self, rows: int) -> float:
        """What a step of ``rows`` rows reads of a layer: an MoE layer's router and the experts those rows are
        expected to touch, E · (1 - (1 - k / E)^rows) under uniform routing (all of a dense layer)."""
        if not self.experts:
            return self.layer_params
        touched = self.experts * (1 - (1 - self.experts_per_token / self.experts) ** rows)
        return self._attention_params() + self._mlp_params(touched)

    @property
    def layer_row_params(self) -> float:
        """The parameters one row multiplies by in a layer (its top k experts in an MoE layer)."""
        return self._attention_params() + self._mlp_params(self.experts_per_token)

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def head_params(self) -> int:
        """Final norm + LM head (a tied head is the embedding matrix, which the last stage holds a copy of)."""
        return self.vocab * self.hidden + self.hidden

    @property
    def params(self) -> int:
        head = self.hidden if self.tied_embeddings else self.head_params
        return self.layers * self.layer_params + self.embed_params + head

    def kv_bytes_per_token(self, act_bytes: float) -> float:
        """KV of one token in one layer."""
        return 2 * self.kv_heads * self.head_dim * act_bytes


@dataclass(frozen=True)
class Device:
    host: str
    name: str
    kind: str  # cuda | mps | cpu
    index: int  # its index on the host (cuda:N)
    memory_bytes: float  # free memory the plan may use, before headroom
    mem_bw: float  # bytes/s
    flops: float  # FLOP/s at the plan's dtype

    @property
    def label(self) -> str:
        where = f"{self.kind}:{self.index}" if self.kind == "cuda" else self.kind
        return f"{self.host} {where} ({self.name})"

    @property
    def torch_device(self) -> str:
        return f"cuda:{self.index}" if self.kind == "cuda" else self.kind


@dataclass(frozen=True)
class Link:
    latency_s: float
    bytes_per_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bytes_per_s


@dataclass(frozen=True)
class Topology:
    """The devices, the head's host, and the links between hosts (a pair not listed gets ``inter_host``)."""

    devices: tuple[Device, ...]
    head_host: str
    intra_host: Link = Link(20e-6, 12e9)
    inter_host: Link = Link(0.5e-3, 117e6)
    links: tuple[tuple[str, str, Link], ...] = ()  # (host a, host b, measured link), either direction

    def link(self, a: str, b: str) -> Link:
        if a == b:
            return self.intra_host
        for x, y, link in self.links:
            if {x, y} == {a, b}:
                return link
        return self.inter_host


@dataclass(frozen=True)
class PlanOptions:
    weights: str = "fp16"
    act: str = ""  # activations' and KV's dtype (--dtype): "" = the weights' own float dtype, fp16 when quantized
    context: int = 4096  # tokens of KV each stage reserves
    mode: str = "specpipe"  # the mode whose modeled TBT the plan minimizes
    stages: int | None = None  # exactly this many stages (None: as many as help)
    wave_rows: int = DEFAULT_WAVE_SIZE  # specpipe: rows per step (default_wave_rows for a given model)
    tree_rows: int = 25  # tree: draft budget + the root
    hit_rate: float = 0.6  # specpipe: the draft's per-depth hit rate (BENCHMARKS.md §2: 0.61 at S = 8, auto)
    tree_tokens: float = 1.85  # tree: tokens per round of a 24-node tree (BENCHMARKS.md §2: 0.23 per step at S = 8)
    efficiency: float = 0.5  # achieved share of peak FLOP/s
    overhead_s: float = 0.5e-3  # fixed cost of a stage step (launches, the step loop)
    headroom_bytes: float = 1 * GiB  # per device: runtime, allocator slack
    max_rows: int = DEFAULT_MAX_TREE  # activations are reserved for this many rows (Assign.max_tree)

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_BYTES:
            raise PlanError(f"unknown weight format {self.weights!r}", hint=f"one of {', '.join(WEIGHT_BYTES)}")
        if self.act and self.act not in ACT_DTYPES:
            raise PlanError(f"unknown activation dtype {self.act!r}", hint=f"one of {', '.join(ACT_DTYPES)}")
        if self.mode not in PLAN_MODES:
            raise PlanError(f"unknown mode {self.mode!r}", hint=f"one of {', '.join(PLAN_MODES)}")
        if not (1 <= self.context <= 10_000_000):
            raise PlanError(f"context must be in [1, 10000000], got {self.context}")
        if not (1 <= self.wave_rows <= self.max_rows):
            raise PlanError(f"wave rows must be in [1, {self.max_rows}], got {self.wave_rows}")
        if self.stages is not None and self.stages < 1:
            raise PlanError(f"stages must be >= 1, got {self.stages}")
        if not (0.0 <= self.hit_rate < 1.0) or not (0.0 < self.efficiency <= 1.0) or self.tree_tokens < 1.0:
            raise PlanError("hit rate must be in [0, 1), efficiency in (0, 1] and tree tokens at least 1")

    @property
    def weight_bytes(self) -> float:
        """Bytes per weight as stored, scales included (int4: two per group, in the activation dtype)."""
        scales = 2 * self.act_bytes / INT4_PLAN_GROUP if self.weights == "int4" else 0.0
        return WEIGHT_BYTES[self.weights] + scales

    @property
    def act_bytes(self) -> float:
        """Activations and KV: ``act``'s dtype; by default the weights' own float dtype, 16-bit when quantized."""
        if self.act:
            return ACT_DTYPES[self.act]
        return ACT_DTYPES.get(self.weights, 2.0)


@dataclass(frozen=True)
class StagePlan:
    device: Device
    layers: tuple[int, int]  # [a, b)
    embed: bool
    head: bool
    weight_bytes: float
    kv_bytes: float
    activation_bytes: float
    step_s: float  # one row
    wave_step_s: float  # the mode's rows (specpipe: wave_rows)
    link_s: float  # the outgoing link (to the next stage, or back to the head) at the mode's rows

    @property
    def memory_bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.activation_bytes


@dataclass(frozen=True)
class LeftOut:
    device: Device
    reason: str


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    options: PlanOptions
    stages: tuple[StagePlan, ...]
    left_out: tuple[LeftOut, ...]
    tbt_s: dict[str, float] = field(hash=False, compare=False)  # modeled time between tokens per mode

    @property
    def step_s(self) -> float:
        """specpipe's modeled step: the slowest stage plus its outgoing link, at the wave's rows."""
        return max(s.wave_step_s + s.link_s for s in self.stages)


# -- the stage model -----------------------------------------------------------------------------------------------


def stage_memory(shape: ModelShape, opts: PlanOptions, n: int, embed: bool, head: bool) -> tuple[float, float, float]:
    """(weights, KV, activations) in bytes of a stage of ``n`` layers."""
    params = n * shape.layer_params + (shape.embed_params if embed else 0) + (shape.head_params if head else 0)
    kv = n * shape.kv_bytes_per_token(opts.act_bytes) * opts.context
    widest = max(4 * shape.hidden, 2 * shape.intermediate, shape.vocab if head else 0)
    activations = opts.max_rows * widest * opts.act_bytes * 2
    return params * opts.weight_bytes, kv, activations


@dataclass(frozen=True)
class StageTime:
    """The time model of one stage step (module docstring), the one the planner and the emulator share:
    ``max(read_s, row_s · rows) + overhead_s``."""

    read_s: float  # the bytes a step reads (weights, KV) / memory bandwidth
    row_s: float  # one row's compute: 2 · params / (FLOP/s · efficiency)
    overhead_s: float  # fixed cost of a step

    def seconds(self, rows: int) -> float:
        return max(self.read_s, self.row_s * rows) + self.overhead_s


def stage_time(params: float, read_bytes: float, device: Device, efficiency: float, overhead_s: float) -> StageTime:
    """The step model of ``params`` parameters that read ``read_bytes`` per step on ``device``."""
    return StageTime(read_bytes / device.mem_bw, 2 * params / (device.flops * efficiency), overhead_s)


def stage_seconds(shape: ModelShape, opts: PlanOptions, device: Device, n: int, head: bool, rows: int) -> float:
    """Modeled time of one step of ``rows`` rows over ``n`` layers (module docstring); the embedding lookup reads
    only its rows and is left out."""
    end = shape.head_params if head else 0
    weights = (n * shape.layer_read_params(rows) + end) * opts.weight_bytes  # MoE: the experts these rows touch
    read = weights + n * shape.kv_bytes_per_token(opts.act_bytes) * opts.context / 2
    return stage_time(n * shape.layer_row_params + end, read, device, opts.efficiency, opts.overhead_s).seconds(rows)


def row_bytes(shape: ModelShape, opts: PlanOptions) -> float:
    return shape.hidden * opts.act_bytes


def mode_rows(opts: PlanOptions, mode: str) -> int:
    return {"pp": 1, "tree": opts.tree_rows, "specpipe": opts.wave_rows}[mode]


def tbt_seconds(mode: str, stage_s: Sequence[float], link_s: Sequence[float], opts: PlanOptions) -> float:
    """Modeled time between tokens of ``mode`` from each stage's step and outgoing link at the mode's rows."""
    h, stages = opts.hit_rate, len(stage_s)
    if mode == "specpipe":  # never modeled below sending whole trees, which a score-ordered wave can do
        step = max(s + link for s, link in zip(stage_s, link_s, strict=True))
        return step / max(1 / (h + (1 - h) * stages), opts.tree_tokens / stages)
    walk = sum(stage_s) + sum(link_s)
    return walk / opts.tree_tokens if mode == "tree" else walk


def default_wave_rows(shape: ModelShape, most: int = DEFAULT_WAVE_SIZE) -> int:
    """specpipe's default wave: ``most`` rows for a dense model (a wave of 32 reads what one row reads, the weights);
    for a mixture of experts the largest power of two whose step reads at most twice what one row's does (more rows
    touch more experts: Qwen3-30B-A3B reads 9% of its expert bytes for one row, 88% for 32)."""
    if not shape.experts:
        return most
    rows = 1
    while rows * 2 <= most and shape.layer_read_params(rows * 2) <= 2 * shape.layer_read_params(1):
        rows *= 2
    return rows


# -- placing layers on a fixed chain ----------------------------------------------------------------------------------


def _stage_cost(
    shape: ModelShape, opts: PlanOptions, topo: Topology, chain: Sequence[Device], k: int, n: int, a: int
) -> float:
    """Cost of device ``k`` of ``chain`` running layers [a, a + n): its step plus its outgoing link at the objective
    mode's rows (the first stage also pays the head's link in), or infinity when it does not fit in memory."""
    dev = chain[k]
    embed, head = a == 0, a + n == shape.layers
    if sum(stage_memory(shape, opts, n, embed, head)) + opts.headroom_bytes > dev.memory_bytes:
        return math.inf
    rows = mode_rows(opts, opts.mode)
    cost = stage_seconds(shape, opts, dev, n, head, rows)
    nxt = chain[k + 1].host if k + 1 < len(chain) else topo.head_host
    cost += topo.link(dev.host, nxt).seconds(0 if k + 1 == len(chain) else rows * row_bytes(shape, opts))
    if k == 0:
        cost += topo.link(topo.head_host, dev.host).latency_s
    return cost


def split_layers(
    shape: ModelShape, opts: PlanOptions, topo: Topology, chain: Sequence[Device]
) -> tuple[float, list[tuple[int, int]]] | None:
    """The best contiguous ranges (each stage ≥ 1 layer) on ``chain`` by dynamic programming over layers, and their
    cost under the objective mode (the bottleneck for specpipe, the sum otherwise); None when nothing fits."""
    L, S = shape.layers, len(chain)
    if S == 0 or S > L:
        return None
    combine: Callable[[float, float], float] = max if opts.mode == "specpipe" else (lambda x, y: x + y)
    best = [[math.inf] * (L + 1) for _ in range(S + 1)]
    came = [[0] * (L + 1) for _ in range(S + 1)]
    best[0][0] = 0.0
    for k in range(S):
        for a in range(k, L - (S - k) + 1):
            if best[k][a] == math.inf:
                continue
            last_b = L if k == S - 1 else L - (S - k - 1)
            for b in range(a + 1, last_b + 1):
                if k == S - 1 and b != L:
                    continue
                c = _stage_cost(shape, opts, topo, chain, k, b - a, a)
                if c == math.inf:
                    break  # more layers never fit where fewer did not
                value = combine(best[k][a], c)
                if value < best[k + 1][b]:
                    best[k + 1][b], came[k + 1][b] = value, a
    if best[S][L] == math.inf:
        return None
    bounds, b = [], L
    for k in range(S, 0, -1):
        a = came[k][b]
        bounds.append((a, b))
        b = a
    return best[S][L], bounds[::-1]


def build_plan(
    shape: ModelShape, opts: PlanOptions, topo: Topology, chain: Sequence[Device], left_out: Sequence[LeftOut] = ()
) -> Plan | None:
    """The plan of ``chain`` with its best layer ranges, every stage's figures and each mode's modeled TBT."""
    split = split_layers(shape, opts, topo, chain)
    if split is None:
        return None
    rows = mode_rows(opts, opts.mode)
    stages = []
    for k, ((a, b), dev) in enumerate(zip(split[1], chain, strict=True)):
        embed, head = a == 0, b == shape.layers
        w, kv, act = stage_memory(shape, opts, b - a, embed, head)
        nxt = chain[k + 1].host if k + 1 < len(chain) else topo.head_host
        link = topo.link(dev.host, nxt).seconds(0 if head else rows * row_bytes(shape, opts))
        one = stage_seconds(shape, opts, dev, b - a, head, 1)
        wave = stage_seconds(shape, opts, dev, b - a, head, rows)
        stages.append(StagePlan(dev, (a, b), embed, head, w, kv, act, one, wave, link))
    tbt = {m: _mode_tbt(shape, opts, topo, chain, split[1], m) for m in PLAN_MODES}
    return Plan(shape, opts, tuple(stages), tuple(left_out), tbt)


def _mode_tbt(
    shape: ModelShape,
    opts: PlanOptions,
    topo: Topology,
    chain: Sequence[Device],
    bounds: Sequence[tuple[int, int]],
    mode: str,
) -> float:
    rows = mode_rows(opts, mode)
    stage_s, link_s = [], []
    for k, ((a, b), dev) in enumerate(zip(bounds, chain, strict=True)):
        head = b == shape.layers
        stage_s.append(stage_seconds(shape, opts, dev, b - a, head, rows))
        nxt = chain[k + 1].host if k + 1 < len(chain) else topo.head_host
        link = topo.link(dev.host, nxt).seconds(0 if head else rows * row_bytes(shape, opts))
        link_s.append(link + (topo.link(topo.head_host, dev.host).latency_s if k == 0 else 0.0))
    return tbt_seconds(mode, stage_s, link_s, opts)


# -- choosing the chain -------------------------------------------------------------------------------------------


def plan(shape: ModelShape, topo: Topology, opts: PlanOptions = PlanOptions()) -> Plan:
    """The plan with the lowest modeled TBT of ``opts.mode`` (module docstring); PlanError with the numbers when the
    model fits nowhere or ``opts.stages`` cannot be met."""
    if not topo.devices:
        raise PlanError("the profile lists no devices", hint="run `homespec profile --save` on each machine")
    left: list[LeftOut] = []
    usable = []
    for dev in topo.devices:
        need = sum(stage_memory(shape, opts, 1, False, False)) + opts.headroom_bytes
        if need > dev.memory_bytes:
            has = dev.memory_bytes / GB
            left.append(LeftOut(dev, f"cannot hold one layer: needs {need / GB:.2f} GB, has {has:.2f}"))
        else:
            usable.append(dev)
    chain = _best_order(shape, opts, topo, usable)
    if chain is None:
        raise _too_big(shape, opts, topo)
    current = build_plan(shape, opts, topo, chain)
    assert current is not None
    floor = opts.stages or 1
    while len(chain) > floor:
        candidates = []
        for dev in chain:
            rest = [d for d in chain if d is not dev]
            p = build_plan(shape, opts, topo, rest)
            if p is not None:
                candidates.append((p.tbt_s[opts.mode], dev, rest, p))
        if not candidates:
            break
        tbt, dev, rest, p = min(candidates, key=lambda c: c[0])
        before = current.tbt_s[opts.mode]
        if opts.stages is None and tbt >= before * 0.999:
            break
        why = f"--stages {opts.stages}" if tbt >= before else "it only slows the chain"
        left.append(LeftOut(dev, f"{why}: modeled {opts.mode} TBT {before * 1e3:.1f} -> {tbt * 1e3:.1f} ms without it"))
        chain, current = rest, p
    if opts.stages is not None and len(chain) != opts.stages:
        raise PlanError(
            f"--stages {opts.stages}: only {len(chain)} of the {len(topo.devices)} devices can hold a stage of "
            f"{shape.name}",
            hint="leave --stages out to let the planner choose",
        )
    return replace(current, left_out=tuple(left))


def _best_order(shape: ModelShape, opts: PlanOptions, topo: Topology, devices: Sequence[Device]) -> list[Device] | None:
    """The chain over every usable device in the order of hosts with the lowest modeled TBT (a host's devices stay
    together, fastest first; every order when there are at most 5 hosts, else the profile's)."""
    hosts = list(dict.fromkeys(d.host for d in devices))
    by_host = {h: sorted((d for d in devices if d.host == h), key=lambda d: (-d.mem_bw, d.index)) for h in hosts}
    orders = itertools.permutations(hosts) if len(hosts) <= 5 else iter([tuple(hosts)])
    best: tuple[float, list[Device]] | None = None
    for order in orders:
        chain = [d for h in order for d in by_host[h]][: shape.layers]
        p = build_plan(shape, opts, topo, chain)
        if p is not None and (best is None or p.tbt_s[opts.mode] < best[0]):
            best = (p.tbt_s[opts.mode], chain)
    return None if best is None else best[1]


def _too_big(shape: ModelShape, opts: PlanOptions, topo: Topology) -> PlanError:
    weights = shape.params * opts.weight_bytes
    kv = shape.layers * shape.kv_bytes_per_token(opts.act_bytes) * opts.context
    usable = sum(max(0.0, d.memory_bytes - opts.headroom_bytes) for d in topo.devices)
    free = sum(d.memory_bytes for d in topo.devices)
    return PlanError(
        f"{shape.name} does not fit: it needs {weights / GB:.1f} GB of {opts.weights} weights + {kv / GB:.1f} GB of "
        f"KV for {opts.context} tokens; the {len(topo.devices)} devices have {free / GB:.1f} GB free, "
        f"{usable / GB:.1f} GB after {opts.headroom_bytes / GiB:.1f} GiB headroom each",
        hint="add devices, lower --context, or see what smaller weights would need (--weights int8 | int4)",
    )
