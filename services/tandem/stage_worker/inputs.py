"""Token-safe input preparation: the inputs of step n+1 are built while step n computes.

Turning a plan into tensors (checks, token ids, positions, slot mappings, block tables and the
attention mask) takes time a stage would otherwise spend idle between forward passes. A
preparer thread does it ahead, into one of `num_slots` slots (two: double buffering). A slot
is written again only after the step that read it has been released by the executor, so a
buffer is never rewritten under a step still computing or sending its outputs; preparation
runs at most `num_slots - 1` steps ahead. With `overlap` off, the executor prepares each step
itself, in series with compute (the baseline).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_END = object()


@dataclass(eq=False)
class Slot:
    """One version of the input buffers; `free` is set while no step holds it."""

    index: int
    buffers: dict[str, Any] = field(default_factory=dict)  # reused from step to step by `prepare`
    free: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.free.set()


@dataclass(eq=False)
class Prepared:
    """A plan and its inputs (or the error preparing them), holding `slot` until released."""

    plan: Any
    slot: Slot
    inputs: Any = None
    error: Exception | None = None


class InputPreparer:
    """Feeds plans in order to `prepare(plan, slot) -> inputs` and hands out the results in order.

    `prepare` may keep tensors in `slot.buffers` and reuse them: the slot is not given to another
    plan until `release` of the one that holds it.
    """

    def __init__(self, prepare: Callable[[Any, Slot], Any], num_slots: int = 2, overlap: bool = True):
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        self._prepare, self.overlap = prepare, overlap
        self.slots = [Slot(i) for i in range(num_slots)]
        self._plans: queue.Queue = queue.Queue()
        self._ready: queue.Queue = queue.Queue()
        self._next_slot = 0
        if overlap:
            threading.Thread(target=self._run, name="stage-input-prep", daemon=True).start()

    def submit(self, plan: Any) -> None:
        self._plans.put(plan)

    def close(self) -> None:
        self._plans.put(_END)
        for slot in self.slots:  # wake a preparer waiting for a slot
            slot.free.set()

    def next(self) -> Prepared | None:
        """The next plan with its inputs, in submission order; None after close()."""
        if self.overlap:
            item = self._ready.get()
            return None if item is _END else item
        plan = self._plans.get()
        return None if plan is _END else self._fill(plan)

    def release(self, prepared: Prepared) -> None:
        """The step that read `prepared.slot` has finished: the slot may be written again."""
        prepared.slot.free.set()

    def _run(self) -> None:
        while (plan := self._plans.get()) is not _END:
            self._ready.put(self._fill(plan))
        self._ready.put(_END)

    def _fill(self, plan: Any) -> Prepared:
        slot = self.slots[self._next_slot]
        self._next_slot = (self._next_slot + 1) % len(self.slots)
        slot.free.wait()  # the step that last read this slot must have finished
        slot.free.clear()
        prepared = Prepared(plan, slot)
        try:
            prepared.inputs = self._prepare(plan, slot)
        except Exception as e:  # noqa: BLE001 - reported when the step's turn comes
            prepared.error = e
        return prepared
