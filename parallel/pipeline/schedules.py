"""Pipeline schedules as plain data: for every rank, the ordered list of actions it runs.

One source of truth for the executor (parallel/pipeline/runtime.py), the simulator
(parallel/pipeline/simulator.py) and the planner. An action is

    F(phase)            forward of the next micro-batch of that phase
    B(phase, split)     backward of the next micro-batch of that phase; split=True computes only
                        input gradients and queues the weight gradients (zero-bubble)
    W                   run the oldest queued weight-gradient work (FIFO)
    FB(f_phase, b_phase)  an overlapped pair: forward of one micro-batch and backward of another

Micro-batch numbers are filled in here (each phase counts its forwards and backwards in order),
so consumers never re-derive them. A rank holds one stage per phase:

    gpipe, 1f1b   P stages, rank r holds stage r (one phase)
    dualpipe      P stages twice: micro-batches 0..C/2-1 flow rank 0 -> P-1, C/2..C-1 flow
                  P-1 -> 0 through mirror copies; rank r's phase 0 is the direction in which it
                  sits early (depth h = min(r, P-1-r)), phase 1 the other
    dualpipev     2P stages, rank r holds stages r (phase 0) and 2P-1-r (phase 1); every
                  micro-batch goes down the ranks and comes back (the V turns on rank P-1)

DualPipe and DualPipeV follow DeepSeek's 8 steps (ANCHORS.md): F0 | F0 F1 | B1 W1 F1 |
(F0,B1)(F1,B0) | B1 (F1,B0) | B1 B0 | W B0 | W.
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("gpipe", "1f1b", "dualpipe", "dualpipev")


@dataclass(frozen=True)
class Action:
    kind: str  # "F", "B", "W" or "FB"
    phase: int = 0  # F and B: which of the rank's stages; FB: the forward's
    mb: int = -1  # F and B: micro-batch; FB: the forward's
    split: bool = False  # B (and FB's backward): defer weight gradients to a later W
    b_phase: int = 0  # FB only: the backward's phase and micro-batch
    b_mb: int = -1

    def __str__(self) -> str:
        if self.kind == "W":
            return "W"
        if self.kind == "FB":
            return f"F{self.phase}.{self.mb}+B{self.b_phase}.{self.b_mb}"
        return f"{self.kind}{self.phase}.{self.mb}" + ("z" if self.split else "")


@dataclass(frozen=True)
class Placement:
    """Where stages live. stage_of(rank, phase) -> stage index; rank_of(stage, direction) -> the
    rank holding that stage for micro-batches of that direction; direction_of(mb)."""

    name: str
    pp: int
    chunks: int

    @property
    def n_stages(self) -> int:
        return 2 * self.pp if self.name == "dualpipev" else self.pp

    @property
    def phases(self) -> int:
        return 2 if self.name in ("dualpipe", "dualpipev") else 1

    def direction_of(self, mb: int) -> int:
        return int(self.name == "dualpipe" and mb >= self.chunks // 2)

    def stage_of(self, rank: int, phase: int) -> int:
        P = self.pp
        if self.name == "dualpipev":
            return rank if phase == 0 else 2 * P - 1 - rank
        if self.name == "dualpipe":
            # phase 0 is the direction in which this rank is early
            direction = phase if rank < P // 2 else 1 - phase
            return rank if direction == 0 else P - 1 - rank
        return rank

    def direction_of_phase(self, rank: int, phase: int) -> int:
        if self.name != "dualpipe":
            return 0
        return phase if rank < self.pp // 2 else 1 - phase

    def locate(self, stage: int, direction: int) -> tuple[int, int]:
        """(rank, phase) that runs `stage` for micro-batches of `direction`."""
        P = self.pp
        if self.name == "dualpipev":
            return (stage, 0) if stage < P else (2 * P - 1 - stage, 1)
        if self.name == "dualpipe":
            rank = stage if direction == 0 else P - 1 - stage
            phase = direction if rank < P // 2 else 1 - direction
            return rank, phase
        return stage, 0

    def micro_batches(self, rank: int, phase: int) -> list[int]:
        """Global micro-batch ids a phase processes, in order."""
        if self.name == "dualpipe":
            half = self.chunks // 2
            start = half * self.direction_of_phase(rank, phase)
            return list(range(start, start + half))
        return list(range(self.chunks))


def check(name: str, pp: int, chunks: int) -> None:
    """Raise ValueError naming the rule a schedule setting breaks."""
    if name not in SCHEDULES:
        raise ValueError(f"schedule {name!r}: choose one of {', '.join(SCHEDULES)}")
    if pp < 1 or chunks < 1:
        raise ValueError(f"pp={pp} and micro-batches={chunks} must be >= 1")
    if name == "dualpipe" and (pp % 2 or chunks % 2 or chunks < 2 * pp):
        raise ValueError(f"DualPipe needs an even pp and an even number of micro-batches >= 2 * pp "
                         f"(pp={pp}, micro-batches={chunks})")
    if name == "dualpipev" and chunks < 2 * pp:
        raise ValueError(f"DualPipeV needs micro-batches >= 2 * pp (pp={pp}, micro-batches={chunks})")


class _Builder:
    """Appends actions for one rank, numbering each phase's forwards and backwards."""

    def __init__(self, placement: Placement, rank: int, wgrad_split: bool) -> None:
        self.mbs = [placement.micro_batches(rank, p) for p in range(placement.phases)]
        self.next_f = [0] * placement.phases
        self.next_b = [0] * placement.phases
        self.wgrad_split = wgrad_split
        self.actions: list[Action] = []

    def _take(self, counters: list[int], phase: int) -> int:
        mb = self.mbs[phase][counters[phase]]
        counters[phase] += 1
        return mb

    def f(self, phase: int) -> None:
        self.actions.append(Action("F", phase, self._take(self.next_f, phase)))

    def b(self, phase: int, zb: bool = False) -> None:
        self.actions.append(Action("B", phase, self._take(self.next_b, phase), split=zb and self.wgrad_split))

    def w(self) -> None:
        if self.wgrad_split:
            self.actions.append(Action("W"))

    def fb(self, f_phase: int, b_phase: int) -> None:
        mb = self._take(self.next_f, f_phase)
        self.actions.append(Action("FB", f_phase, mb, b_phase=b_phase, b_mb=self._take(self.next_b, b_phase)))


def _gpipe(bld: _Builder, P: int, r: int, C: int) -> None:
    for _ in range(C):
        bld.f(0)
    for _ in range(C):
        bld.b(0, zb=True)
        bld.w()


def _one_f_one_b(bld: _Builder, P: int, r: int, C: int) -> None:
    warmup = min(P - r - 1, C)
    for _ in range(warmup):
        bld.f(0)
    for _ in range(C - warmup):
        bld.f(0)
        bld.b(0, zb=True)
        bld.w()
    for _ in range(warmup):
        bld.b(0, zb=True)
        bld.w()


def _dual(bld: _Builder, h: int, H: int, main_steps: int, turn_rank: bool) -> None:
    """DeepSeek's 8 steps; h = this rank's depth in phase 0, H = ranks per half path.
    turn_rank: the rank whose first main-step pair is run unoverlapped (DualPipe's middle ranks,
    DualPipeV's last rank), as DeepSeek does to shorten the bubble."""
    for _ in range(2 * (H - h - 1)):  # 1: F0
        bld.f(0)
    for _ in range(h + 1):  # 2: F0 F1
        bld.f(0)
        bld.f(1)
    for _ in range(H - h - 1):  # 3: B1 W1 F1 (zero bubble)
        bld.b(1, zb=True)
        bld.w()
        bld.f(1)
    for i in range(main_steps):  # 4: (F0, B1) (F1, B0)
        if i == 0 and turn_rank:
            bld.f(0)
            bld.b(1)
        else:
            bld.fb(0, 1)
        bld.fb(1, 0)
    for _ in range(H - h - 1):  # 5: B1 (F1, B0)
        bld.b(1)
        bld.fb(1, 0)
    zb = False
    for i in range(h + 1):  # 6: B1 B0, the second half zero bubble
        if i == (h + 1) // 2 and h % 2 == 1:
            zb = True
        bld.b(1, zb=zb)
        if i == (h + 1) // 2 and h % 2 == 0:
            zb = True
        bld.b(0, zb=zb)
    for _ in range(H - h - 1):  # 7: W B0
        bld.w()
        bld.b(0, zb=True)
    for _ in range(h + 1):  # 8: W
        bld.w()


def build(name: str, pp: int, chunks: int, wgrad_split: bool = True) -> list[list[Action]]:
    """The action list of every rank. wgrad_split=False: every backward computes all its
    gradients at once and there are no W actions (same schedule otherwise)."""
    check(name, pp, chunks)
    placement = Placement(name, pp, chunks)
    out = []
    for r in range(pp):
        bld = _Builder(placement, r, wgrad_split)
        if name == "gpipe":
            _gpipe(bld, pp, r, chunks)
        elif name == "1f1b":
            _one_f_one_b(bld, pp, r, chunks)
        elif name == "dualpipe":
            h, H = min(r, pp - 1 - r), pp // 2
            _dual(bld, h, H, chunks // 2 - pp + h + 1, turn_rank=h == H - 1)
        else:
            _dual(bld, r, pp, chunks - 2 * pp + r + 1, turn_rank=r == pp - 1)
        for phase in range(placement.phases):
            done_f, done_b = bld.next_f[phase], bld.next_b[phase]
            expected = len(bld.mbs[phase])
            if done_f != expected or done_b != expected:
                raise AssertionError(f"{name} rank {r} phase {phase}: {done_f} F / {done_b} B of {expected}")
        out.append(bld.actions)
    return out
