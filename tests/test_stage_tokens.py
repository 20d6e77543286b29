"""Decode chaining on the stages (stage_worker/tokens.py): the last stage's Tokens feed and
stage 0's book of the tokens it got, and what a step waits for (stage_worker/arrivals.py)."""

from __future__ import annotations

import threading
from itertools import islice

import pytest

from tandem.core.errors import InvalidArgumentError
from tandem.stage_worker import tokens
from tandem.stage_worker.arrivals import Arrivals, StageStopped
from tandem.stage_worker.tokens import TokenBook, TokenFeed


def take(follower, n: int) -> list[tuple[int, list[str], list[int]]]:
    messages = follower.messages()
    return [(m.step_id, list(m.request_ids), list(m.token_ids)) for m in islice(messages, n)]


def test_a_follower_is_confirmed_then_gets_every_step_in_order():
    feed = TokenFeed()
    follower = feed.subscribe()
    reader = follower.messages()
    assert next(reader).step_id == 0  # the subscription holds from here on
    feed.publish(3, ["a", "b"], [7, 8])
    feed.publish(4, ["a"], [9])
    assert [(m.step_id, list(m.token_ids)) for m in islice(reader, 2)] == [(3, [7, 8]), (4, [9])]
    follower.close()
    assert list(reader) == []  # closed: the stream ends


def test_a_new_follower_first_gets_the_recent_steps():
    feed = TokenFeed()
    for step in range(1, tokens.REPLAY_STEPS + 11):
        feed.publish(step, ["a"], [step])
    follower = feed.subscribe()
    got = take(follower, tokens.REPLAY_STEPS + 1)
    assert got[0][0] == 0
    assert [step for step, _, _ in got[1:]] == list(range(11, tokens.REPLAY_STEPS + 11))


def test_publish_waits_for_the_stream_to_take_the_tokens_but_not_for_ever():
    feed = TokenFeed()
    follower = feed.subscribe()
    reader = follower.messages()
    next(reader)
    taken = []
    thread = threading.Thread(target=lambda: taken.append(next(reader).step_id))
    thread.start()
    feed.publish(5, ["a"], [1])  # returns once the reader took it
    thread.join(timeout=5)
    assert taken == [5]
    feed.publish(6, ["a"], [2])  # nobody reads: returns after the hand-over wait
    feed.unsubscribe(follower)
    assert len(feed) == 0


def test_a_follower_that_falls_behind_is_dropped_and_its_stream_ends(monkeypatch):
    monkeypatch.setattr(tokens, "HANDOFF_WAIT_S", 0.0)
    feed = TokenFeed()
    follower = feed.subscribe()
    for step in range(1, tokens.MAX_QUEUED + 2):
        feed.publish(step, ["a"], [step])
    assert len(feed) == 0
    got = [m.step_id for m in follower.messages()]
    assert got[0] == 0 and got[-1] < tokens.MAX_QUEUED + 1  # it ends short of the last: stage 0 follows again


def test_the_book_keeps_the_recent_steps_by_request():
    book = TokenBook()
    book.put(1, ["a", "b"], [5, 6])
    assert book.get(1) == {"a": 5, "b": 6} and book.get(2) is None
    for step in range(2, tokens.BOOK_STEPS + 3):
        book.put(step, ["a"], [step])
    assert book.get(1) is None and book.get(tokens.BOOK_STEPS + 2) == {"a": tokens.BOOK_STEPS + 2}


def test_a_waiting_step_gets_what_comes_or_gives_up_for_a_newer_stream_or_the_clock():
    arrivals = Arrivals()
    epoch = arrivals.new_epoch()
    threading.Timer(0.05, lambda: arrivals.put_tokens(7, ["a", "b"], [11, 12])).start()
    assert arrivals.tokens(8, 7, epoch, timeout_s=10) == {"a": 11, "b": 12}
    arrivals.put_activations(9, "hidden")  # type: ignore[arg-type]  # any frame: it is handed out as it came
    assert arrivals.activations(9, epoch) == "hidden"
    threading.Timer(0.05, arrivals.new_epoch).start()  # a newer plan stream supersedes the waiting step
    with pytest.raises(InvalidArgumentError, match="step 10: superseded"):
        arrivals.activations(10, epoch)
    with pytest.raises(InvalidArgumentError, match="the tokens of step 3 did not come within 0s"):
        arrivals.tokens(11, 3, arrivals.epoch, timeout_s=0.01)
    arrivals.put_activations(12, "late")  # type: ignore[arg-type]
    arrivals.drop_activations(12)  # its step was superseded: nothing is kept for it
    arrivals.put_activations(13, "x")  # type: ignore[arg-type]
    assert arrivals.take_all_activations() == {13: "x"} and arrivals.take_all_activations() == {}
    threading.Timer(0.05, arrivals.stop).start()
    with pytest.raises(StageStopped):  # the step is neither computed nor answered
        arrivals.activations(12, arrivals.epoch)
