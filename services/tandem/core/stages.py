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
