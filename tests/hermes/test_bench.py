"""The one bench: either fake LLM (HTTP server, in process) with either span sink (recorded, counted), judged and timed."""

from __future__ import annotations

from typing import Iterator

import pytest
from statebackends_hermes_testbed.driver import COUNT, IN_PROCESS, NONE, HermesBench, run_threads

SPANS_PER_CALL = 6  # invoke_agent, 2 x react step, 2 x chat, 1 x execute_tool for "[tools:1]"


@pytest.mark.parametrize(("kwargs", "bad", "valid"), [({"llm": "http"}, "'http'", ("'server'", "'in_process'")),
                                                      ({"spans": "keep"}, "'keep'", ("'record'", "'count'"))])
def test_a_bad_choice_names_the_value_and_the_valid_ones(kwargs: dict, bad: str, valid: tuple) -> None:
    with pytest.raises(ValueError) as info:
        HermesBench(**kwargs)
    message = str(info.value)
    assert bad in message
    assert all(name in message for name in valid), message


@pytest.fixture(scope="module")
def in_process() -> Iterator[HermesBench]:
    """The in-process LLM with every span recorded."""
    bench = HermesBench(llm=IN_PROCESS)
    try:
        yield bench
    finally:
        bench.close()


def test_the_in_process_llm_is_judged_as_the_server_is(in_process: HermesBench) -> None:
    in_process.instrument("invocation_id")
    try:
        in_process.reset()
        tags = [f"ip{i}" for i in range(4)]
        results = run_threads(lambda i: in_process.call(in_process.agent(), tags[i], "[tools:1]"), len(tags))
        verdict = in_process.verdict([in_process.truth(tag, tools=1) for tag in tags])
    finally:
        in_process.uninstrument()
        in_process.reset()
    assert [r["final_response"] for r in results] == [f"done {tag}" for tag in tags]
    assert verdict.ok, verdict.summary()
    assert in_process.agent() is in_process.timed_agent  # one agent per kind, the timed one included


def test_the_server_bench_times_and_replays_the_floor(bench: HermesBench) -> None:
    assert bench.record_plan("invocation_id") == SPANS_PER_CALL
    assert bench.mode == NONE
    ended = bench.spans_ended()
    bench.floor_call()
    assert bench.spans_ended() - ended == SPANS_PER_CALL
    assert bench.completed(bench.run())
    assert bench.spans_ended() - ended == SPANS_PER_CALL  # uninstrumented: no span


def test_a_counting_bench_is_judged_on_a_recorder_of_its_own_and_has_no_verdict() -> None:
    bench = HermesBench(llm=IN_PROCESS, spans=COUNT)
    try:
        outcome = bench.correctness("invocation_id", n=4)
        assert bench.spans_ended() == 0  # the judged calls went to their own recorder
        with pytest.raises(RuntimeError, match="spans=RECORD"):
            bench.verdict([])
    finally:
        bench.close()
    assert outcome["ok"] and outcome["correct"] == 4, outcome["summary"]
