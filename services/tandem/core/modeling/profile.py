"""The stage profile: what one decoder layer, the LM head and the embedding cost on a device.

One documented JSON format (docs/stage-profile.md) for everything that reasons about time:
the cost-aware layer split today, a temporal scheduler and placement later. A profile is a
table of milliseconds (the fastest of a few runs) over a grid of tokens in a step x context
length, measured by tandem.core.modeling.profiler; `load_profile` checks a file and names the field at fault, and the
`*_ms` methods interpolate between the grid points. Pure: no torch here.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tandem.core.errors import ConfigError
from tandem.core.modeling.stages import LayerRange, balanced_boundaries, plan_stages, stage_times

FORMAT = "tandem-stage-profile"
VERSION = 1
# The step a cost-aware split balances by default: decode of 16 sequences, 256 tokens long.
BALANCE_TOKENS = 16
BALANCE_CONTEXT = 256


@dataclass(frozen=True)
class StageProfile:
    """Median forward times of one model on one device, dtype and thread count.

    A step of `tokens` new tokens is `min(tokens, max_seqs_per_step)` sequences sharing the
    tokens evenly, each `context` tokens long after the step (cached plus new): decode-shaped
    up to max_seqs_per_step tokens, chunks of prefill beyond.
    """

    model: str  # the model directory's name
    num_layers: int  # decoder layers of the whole model
    hidden_size: int
    vocab_size: int
    device: str  # torch device type: cpu or cuda
    dtype: str  # float32, bfloat16 or float16
    num_threads: int  # torch intra-op threads it was measured with
    cpus: tuple[int, ...]  # cores it was measured on
    max_seqs_per_step: int
    repeats: int  # timed runs per point, after one warm-up; the fastest is kept
    tokens: tuple[int, ...]  # grid: new tokens in the step, ascending
    contexts: tuple[int, ...]  # grid: tokens per sequence after the step, ascending
    layer_ms: tuple[tuple[float, ...], ...]  # [tokens][contexts] one decoder layer
    head_ms: tuple[float, ...]  # [tokens] final norm + LM head on each sequence's last token
    embed_ms: tuple[float, ...]  # [tokens] token embedding lookup
    measure_s: float  # how long measuring took

    def num_seqs(self, tokens: int) -> int:
        """Sequences in a profiled step of `tokens` tokens."""
        return max(1, min(tokens, self.max_seqs_per_step))

    def layer(self, tokens: float, context: float) -> float:
        """Milliseconds of one decoder layer, interpolated (bilinear; linear beyond the grid)."""
        per_context = [interpolate(self.tokens, [row[j] for row in self.layer_ms], tokens)
                       for j in range(len(self.contexts))]
        return max(0.0, interpolate(self.contexts, per_context, context))

    def head(self, tokens: float) -> float:
        """Milliseconds of the final norm and LM head for a step of `tokens` tokens."""
        return max(0.0, interpolate(self.tokens, self.head_ms, tokens))

    def embed(self, tokens: float) -> float:
        """Milliseconds of the embedding lookup for a step of `tokens` tokens."""
        return max(0.0, interpolate(self.tokens, self.embed_ms, tokens))

    def to_json(self) -> str:
        """The JSON text `load_profile` reads back: a field a line."""
        fields = {"format": FORMAT, "version": VERSION, **asdict(self)}
        return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in fields.items()) + "\n}\n"


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear y(x) through the points (xs ascending); beyond either end, the line of
    the two outermost points goes on (one point: a constant)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"need as many ys as xs, and at least one; got {len(xs)} and {len(ys)}")
    if len(xs) == 1:
        return float(ys[0])
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def parse_profile(text: str, source: str = "profile") -> StageProfile:
    """A profile from its JSON text; ConfigError naming the field (and `source`) if it is not one."""
    try:
        data = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{source}: not JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{source}: field 'format' must be {FORMAT!r}")
    if data.get("version") != VERSION:
        raise ConfigError(f"{source}: field 'version'={data.get('version')!r}, this release reads {VERSION}")
    fields = {k: v for k, v in data.items() if k not in ("format", "version")}
    known = StageProfile.__dataclass_fields__
    for name in known:
        if name not in fields:
            raise ConfigError(f"{source}: field {name!r} is missing")
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown field {unknown[0]!r}")
    try:
        profile = StageProfile(
            model=str(fields["model"]), device=str(fields["device"]), dtype=str(fields["dtype"]),
            **{k: _int(fields[k], k) for k in ("num_layers", "hidden_size", "vocab_size", "num_threads",
                                               "max_seqs_per_step", "repeats")},
            cpus=tuple(_int(c, "cpus") for c in _list(fields["cpus"], "cpus")),
            tokens=_axis(fields["tokens"], "tokens"), contexts=_axis(fields["contexts"], "contexts"),
            layer_ms=tuple(_times(row, "layer_ms") for row in _list(fields["layer_ms"], "layer_ms")),
            head_ms=_times(fields["head_ms"], "head_ms"), embed_ms=_times(fields["embed_ms"], "embed_ms"),
            measure_s=_number(fields["measure_s"], "measure_s"))
        _check_shapes(profile)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {e}") from None
    return profile


def load_profile(path: str | Path) -> StageProfile:
    """Read a profile file; ConfigError naming the file and the field at fault."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the stage profile ({e})") from None
    return parse_profile(text, str(path))


def _check_shapes(p: StageProfile) -> None:
    n, m = len(p.tokens), len(p.contexts)
    if len(p.layer_ms) != n or any(len(row) != m for row in p.layer_ms):
        raise ValueError(f"field 'layer_ms' must be {n} rows (tokens) of {m} values (contexts)")
    for name in ("head_ms", "embed_ms"):
        if len(getattr(p, name)) != n:
            raise ValueError(f"field {name!r} must hold {n} values, one per tokens")
    if p.num_layers < 1 or p.max_seqs_per_step < 1:
        raise ValueError("fields 'num_layers' and 'max_seqs_per_step' must be >= 1")


def _list(value: Any, name: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"field {name!r} must be a list, got {value!r}")
    return value


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"field {name!r} must hold integers, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"field {name!r} must hold finite numbers >= 0, got {value!r}")
    return float(value)


def _times(values: Any, name: str) -> tuple[float, ...]:
    return tuple(_number(v, name) for v in _list(values, name))


def _axis(values: Any, name: str) -> tuple[int, ...]:
    axis = tuple(_int(v, name) for v in _list(values, name))
    if not axis or axis[0] < 1 or any(a >= b for a, b in zip(axis, axis[1:])):
        raise ValueError(f"field {name!r} must be positive integers, strictly ascending, got {list(axis)}")
    return axis


@dataclass(frozen=True)
class Split:
    """A cost-aware split: the boundaries to configure and each stage's estimated time."""

    ranges: tuple[LayerRange, ...]
    stage_ms: tuple[float, ...]
    tokens: int  # the step it balances
    context: int

    @property
    def boundaries(self) -> tuple[int, ...]:
        """First layer of stages 1..N-1 (the stage_boundaries config field)."""
        return tuple(r.start for r in self.ranges[1:])

    def describe(self) -> str:
        stages = "; ".join(
            f"stage {i} layers [{r.start}, {r.end}){' + LM head' if r.is_last else ''} {ms:.2f} ms"
            for i, (r, ms) in enumerate(zip(self.ranges, self.stage_ms)))
        return f"split balanced for {self.tokens} tokens at context {self.context}: {stages}"


def balanced_split(profile: StageProfile, num_stages: int, tokens: int = BALANCE_TOKENS,
                   context: int = BALANCE_CONTEXT) -> Split:
    """The split of the profiled model into `num_stages` stages that take equal time (as near as
    whole layers allow) on a step of `tokens` tokens at `context`, LM head and embedding included."""
    layers = [profile.layer(tokens, context)] * profile.num_layers
    embed, head = profile.embed(tokens), profile.head(tokens)
    ranges = plan_stages(profile.num_layers, num_stages, balanced_boundaries(layers, num_stages, embed, head))
    return Split(tuple(ranges), tuple(stage_times(ranges, layers, embed, head)), tokens, context)
