"""Graceful drain: a coordinator sent SIGTERM while requests stream finishes them all, refuses new
ones with UNAVAILABLE, and exits within its grace period."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from processes import children_of, wait_gone
from tandem.client import TandemClient
from tandem.client import errors as client_errors
from test_cli import start_up

MAX_TOKENS = 240  # long enough that the streams outlive the SIGTERM and the refused probe (prompt 3 + 240 < 256 positions)


def coordinator_pid(supervisor: int) -> int:
    (pid,) = [p for p in children_of(supervisor)
              if b"coordinator" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
    return pid


def test_sigterm_drains_the_coordinator(checkpoint, tmp_path):
    proc, endpoint = start_up(checkpoint("llama"), tmp_path, "--no-gateway")
    kids = children_of(proc.pid)
    try:
        results: list = [None] * 6
        started = threading.Event()

        def one(i: int) -> None:
            try:
                with TandemClient(endpoint, timeout_s=60) as client:
                    tokens: list[int] = []
                    for chunk in client.generate_stream(prompt_ids=[5 + i, 7, 9], max_tokens=MAX_TOKENS,
                                                        ignore_eos=True, temperature=0.0):
                        tokens += chunk.token_ids
                        started.set()
                    results[i] = tokens
            except client_errors.ClientError as e:
                results[i] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        assert started.wait(60)
        coordinator = coordinator_pid(proc.pid)
        os.kill(coordinator, signal.SIGTERM)
        sigterm = time.monotonic()
        refused = None
        with TandemClient(endpoint, timeout_s=10) as client:
            while refused is None and any(t.is_alive() for t in threads):
                try:
                    client.generate(prompt_ids=[1, 2, 3], max_tokens=1)
                except client_errors.UnavailableError as e:
                    refused = e
        for t in threads:
            t.join(timeout=60)
        assert [len(r) if isinstance(r, list) else r for r in results] == [MAX_TOKENS] * len(results)
        assert refused is not None and "shutting down" in str(refused)
        while Path(f"/proc/{coordinator}").exists() and time.monotonic() - sigterm < 30:
            time.sleep(0.1)
        assert time.monotonic() - sigterm < 30  # within the default 30 s grace (--drain-s)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        wait_gone(kids)
