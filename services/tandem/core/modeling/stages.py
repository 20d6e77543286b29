"""Stage planning: split a model's layers into half-open ranges [start, end), one per stage."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tandem.core.errors import ConfigError


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, end) of a model with `num_layers` layers, in global indices."""

    start: int
    end: int
    num_layers: int

    @property
    def is_first(self) -> bool:
        """Stage 0 owns the token embeddings."""
        return self.start == 0

    @property
    def is_last(self) -> bool:
        """The last stage owns the final norm and the LM head."""
        return self.end == self.num_layers

    def __len__(self) -> int:
        return self.end - self.start

    def __iter__(self):
        return iter(range(self.start, self.end))


def plan_stages(
    num_layers: int, num_stages: int = 1, boundaries: Sequence[int] | None = None
) -> list[LayerRange]:
    """Split `num_layers` into `num_stages` contiguous ranges.

    Without `boundaries` the split is as even as possible (earlier stages take the
    remainder). `boundaries` are the start indices of stages 1..N-1, strictly
    increasing inside (0, num_layers); they fix an uneven split and imply the stage count.
    """
    if num_layers < 1:
        raise ConfigError(f"num_layers must be >= 1, got {num_layers}")
    if boundaries is not None:
        cuts = [int(b) for b in boundaries]
        if len(cuts) + 1 != num_stages and num_stages != 1:
            raise ConfigError(
                f"stage_boundaries has {len(cuts)} entries, which makes {len(cuts) + 1} stages, "
                f"but num_stages={num_stages}"
            )
        edges = [0, *cuts, num_layers]
        for a, b in zip(edges, edges[1:]):
            if not a < b:
                raise ConfigError(
                    f"stage_boundaries={cuts} must be strictly increasing inside (0, {num_layers}): "
                    "every stage needs at least one layer"
                )
    else:
        if not 1 <= num_stages <= num_layers:
            raise ConfigError(f"num_stages={num_stages} must be between 1 and the layer count {num_layers}")
        base, extra = divmod(num_layers, num_stages)
        edges = [0]
        for i in range(num_stages):
            edges.append(edges[-1] + base + (1 if i < extra else 0))
    return [LayerRange(a, b, num_layers) for a, b in zip(edges, edges[1:])]


def balanced_boundaries(
    layer_costs: Sequence[float], num_stages: int, first_extra: float = 0.0, last_extra: float = 0.0
) -> tuple[int, ...]:
    """The first layers of stages 1..N-1 that make the busiest stage as quick as possible.

    A stage's time is the sum of its layers' costs, plus `first_extra` on stage 0 (the
    embedding) and `last_extra` on the last stage (final norm and LM head). Every stage gets at
    least one layer. Among splits with the same busiest stage, the one whose stage times spread
    least (smallest sum of squares) wins, then the one with the earliest boundaries.
    """
    n = len(layer_costs)
    if not 1 <= num_stages <= n:
        raise ConfigError(f"num_stages={num_stages} must be between 1 and the layer count {n}")
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))

    def stage_time(i: int, j: int) -> float:
        return prefix[j] - prefix[i] + (first_extra if i == 0 else 0.0) + (last_extra if j == n else 0.0)

    # best[s][j]: (busiest, sum of squares) of layers [0, j) in s stages; cut[s][j]: where the last one starts
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for j in range(s, n - (num_stages - s) + 1):
            for i in range(s - 1, j):
                if best[s - 1][i] == inf:
                    continue
                t = stage_time(i, j)
                score = (max(best[s - 1][i][0], t), best[s - 1][i][1] + t * t)
                if score < best[s][j]:
                    best[s][j], cut[s][j] = score, i
    bounds, j = [], n
    for s in range(num_stages, 1, -1):
        j = cut[s][j]
        bounds.append(j)
    return tuple(reversed(bounds))


def stage_times(
    ranges: Sequence[LayerRange], layer_costs: Sequence[float], first_extra: float = 0.0, last_extra: float = 0.0
) -> list[float]:
    """Each stage's time under the same costs as balanced_boundaries."""
    return [sum(layer_costs[r.start:r.end]) + (first_extra if r.is_first else 0.0) + (last_extra if r.is_last else 0.0)
            for r in ranges]


AUTO = "auto"


def parse_boundaries(text: str) -> tuple[int, ...] | str:
    """A command line's stage boundaries: "7,15,24", "" (an even split) or "auto"; ValueError otherwise."""
    if text.strip() == AUTO:
        return AUTO
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated layer indices or {AUTO!r}, got {text!r}") from None
