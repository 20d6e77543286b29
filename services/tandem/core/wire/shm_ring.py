"""A ring of shared-memory slots for handing logits to a sampler on the same host.

The last stage (the writer) creates the ring as a file in a shared-memory filesystem, copies a
frame's logits into a free slot and sends only the slot's handle over gRPC; the sampler (the
reader) maps the same file and samples straight from the slot, then frees it. Nothing is
serialized and no bytes cross a socket.

File layout: a 16-byte nonce, then one int64 state per slot (0 free, 1 full), padded to 64
bytes, then the slots. The writer sets a slot full only after its bytes are written and sends
the handle after that; the reader frees it only after sampling; a slot is never rewritten while
full, so the reader never sees a slot change under it. The reader proves it maps the same
memory by reading the nonce back (a sampler on another host cannot).

Space is reserved up front with posix_fallocate, so a full /dev/shm refuses the ring (the
stage then sends logits over the stream) instead of killing a process with SIGBUS later.
"""

from __future__ import annotations

import logging
import mmap
import os
import secrets
import tempfile
import time
from pathlib import Path

import torch

from tandem.core.errors import InvalidArgumentError

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
NONCE_BYTES = 16
PREFIX = "tandem-logits-"
FREE, FULL = 0, 1


def _header_bytes(slots: int) -> int:
    return -(-(NONCE_BYTES + 8 * slots) // 64) * 64


def _map(fd: int, size: int) -> tuple[mmap.mmap, torch.Tensor]:
    mm = mmap.mmap(fd, size)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)  # [size], shares the mapping


class RingWriter:
    """The stage's end: owns the file; `put` copies a tensor into a free slot."""

    def __init__(self, slots: int, slot_bytes: int):
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.slots, self.slot_bytes = slots, slot_bytes
        self.nonce = secrets.token_bytes(NONCE_BYTES)
        self.ring_id = secrets.token_hex(8)
        self._header = _header_bytes(slots)
        size = self._header + slots * slot_bytes
        _remove_stale()
        fd, self.path = tempfile.mkstemp(prefix=f"{PREFIX}{os.getpid()}-", dir=SHM_DIR)
        try:
            os.posix_fallocate(fd, 0, size)  # reserve now: ENOSPC here, not SIGBUS later
            self._mm, self._bytes = _map(fd, size)
        except OSError:
            os.close(fd)
            os.unlink(self.path)
            raise
        os.close(fd)
        self._bytes[:NONCE_BYTES] = torch.frombuffer(bytearray(self.nonce), dtype=torch.uint8)
        self._states = self._bytes[NONCE_BYTES:NONCE_BYTES + 8 * slots].view(torch.int64)  # [slots]
        self._next = 0

    def put(self, tensor: torch.Tensor, timeout_s: float) -> tuple[int, int] | None:
        """Copy `tensor` into the next slot once the reader has freed it; (slot, nbytes), or
        None when it does not fit a slot or the slot stays full for `timeout_s`."""
        flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
        nbytes = flat.numel()
        if nbytes > self.slot_bytes:
            return None
        slot = self._next
        deadline, pause = time.monotonic() + timeout_s, 20e-6
        while int(self._states[slot]) != FREE:
            if time.monotonic() > deadline:
                return None
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)
        start = self._header + slot * self.slot_bytes
        self._bytes[start:start + nbytes].copy_(flat)
        self._states[slot] = FULL  # after the bytes: the reader only looks once it has the handle
        self._next = (slot + 1) % self.slots
        return slot, nbytes

    def unlink(self) -> None:
        """Remove the file; the mappings of both ends stay valid until they are dropped."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class RingReader:
    """The sampler's end: maps a ring it was offered after checking the nonce in it."""

    def __init__(self, path: str, nonce: bytes, slots: int, slot_bytes: int):
        name = Path(path).name
        if not name.startswith(PREFIX) or Path(path).parent != Path(SHM_DIR):
            raise InvalidArgumentError(f"ring path must be a {PREFIX}* file in {SHM_DIR}, got {path[:128]!r}")
        if not 1 <= slots <= 1024 or not 1 <= slot_bytes <= 2**34:
            raise InvalidArgumentError(f"ring of {slots} slots of {slot_bytes} bytes is out of range")
        self.slots, self.slot_bytes = slots, slot_bytes
        self._header = _header_bytes(slots)
        size = self._header + slots * slot_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError as e:
            raise FileNotFoundError(f"cannot open ring {path}: {e.strerror}") from None
        try:
            if os.fstat(fd).st_size != size:
                raise FileNotFoundError(f"ring {path} is not {size} bytes")
            self._mm, self._bytes = _map(fd, size)
        finally:
            os.close(fd)
        if bytes(self._bytes[:NONCE_BYTES].numpy()) != nonce:
            raise FileNotFoundError(f"ring {path} holds another nonce: not the same memory")
        self._states = self._bytes[NONCE_BYTES:NONCE_BYTES + 8 * slots].view(torch.int64)

    def view(self, slot: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """The slot's first `nbytes` as a flat tensor of `dtype` (no copy); checks the handle."""
        if not 0 <= slot < self.slots or not 0 <= nbytes <= self.slot_bytes or nbytes % dtype.itemsize:
            raise InvalidArgumentError(f"ring slot {slot} with {nbytes} bytes is outside the ring "
                                       f"({self.slots} slots of {self.slot_bytes} bytes)")
        if int(self._states[slot]) != FULL:
            raise InvalidArgumentError(f"ring slot {slot} is not full")
        start = self._header + slot * self.slot_bytes
        return self._bytes[start:start + nbytes].view(dtype)

    def free(self, slot: int) -> None:
        self._states[slot] = FREE


def _remove_stale() -> None:
    """Remove rings left by processes that died without removing theirs (SIGKILL)."""
    for path in Path(SHM_DIR).glob(f"{PREFIX}*"):
        pid = path.name[len(PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            log.info("removed stale logits ring %s", path)
        except PermissionError:
            pass  # alive, someone else's
