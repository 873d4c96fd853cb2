"""The batch runner: the OpenAI Batch format, shard assignment, the ordered writer, checkpoints,
and whole runs against a fake ``respond`` (local and on S3, via moto's server): a stopped run
resumed by a new attempt writes exactly what an uninterrupted run writes, each record once."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tidal import api
from tidal.inference_worker.batch import (
    EXIT_COMPLETE,
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_STOPPED,
    BatchResult,
    BatchSettings,
    main,
    run_batch,
)
from tidal.inference_worker.batch.checkpoint import Checkpoint, checkpoint_name, checkpoint_number
from tidal.inference_worker.batch.jsonl import (
    BadLine,
    Request,
    error_line,
    parse_line,
    response_line,
    seed_for,
    shard_records,
    with_seed,
)
from tidal.inference_worker.batch.podnote import (
    MERGE_PATCH,
    NO_CREDENTIALS,
    PodAnnotator,
    checkpoint_patch,
    kubeconfig_path,
)
from tidal.inference_worker.batch.store import ConfigError, Part, input_files, read_lines
from tidal.inference_worker.batch.writer import OrderedWriter
from tidal.inference_worker.engine.params import EngineDeadError
from tidal.inference_worker.metrics import WorkerMetrics

Respond = Callable[[str, dict[str, Any]], Any]


# -- helpers ----------------------------------------------------------------------------------
def request_line(custom_id: str, *, url: str = "/v1/completions", **body: Any) -> str:
    payload = {"model": "m", "prompt": custom_id, **body}
    return orjson.dumps(
        {"custom_id": custom_id, "method": "POST", "url": url, "body": payload}
    ).decode()


def write_input(root: Path, files: dict[str, list[str]]) -> Path:
    for name, lines in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in lines))
    return root


def standard_input(root: Path, records: int = 60) -> Path:
    """``records`` requests over three files (one nested, blank lines, one bad line)."""
    lines = [request_line(f"req-{i}") for i in range(records)]
    lines[7] = "this is not json"
    third = records // 3
    return write_input(
        root,
        {
            "a.jsonl": lines[:third],
            "b.jsonl": ["", *lines[third : 2 * third], "   "],
            "sub/c.jsonl": lines[2 * third :],
            "notes.txt": ["not input"],
        },
    )


async def echo(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A deterministic engine whose answers finish out of order (random small delays)."""
    await asyncio.sleep(random.random() * 0.004)
    if body.get("fail"):
        return 400, {"error": {"message": "bad prompt", "type": "invalid_request_error"}}
    return 200, {"object": "text_completion", "url": url, "echo": body}


def settings_for(
    input_uri: Path | str, output_uri: Path | str, shard: str = "0/1", **changes: Any
) -> BatchSettings:
    index, count = (int(x) for x in shard.split("/"))
    base = BatchSettings(
        input_uri=str(input_uri),
        output_uri=str(output_uri),
        shard_index=index,
        shard_count=count,
        checkpoint_interval_s=3600,
        attempt=1,
        model_name="m",
    )
    return replace(base, **changes)


def run(
    settings: BatchSettings,
    respond: Respond = echo,
    *,
    stop_after: int | None = None,
    calls: list[str] | None = None,
    **options: Any,
) -> BatchResult:
    """One attempt; ``stop_after``: set the stop event when that many records were sent."""

    async def attempt() -> BatchResult:
        stop = asyncio.Event()
        sent: list[str] = [] if calls is None else calls

        async def counted(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            sent.append(str(body.get("prompt")))
            if stop_after is not None and len(sent) >= stop_after:
                stop.set()
            status, answer = await respond(url, body)
            return status, answer

        options.setdefault("concurrency", 8)
        return await run_batch(settings, counted, stop=stop, **options)

    return asyncio.run(attempt())


def checkpoints(output: Path, index: int = 0) -> list[Checkpoint]:
    directory = output / "_checkpoints" / f"shard-{index}"
    files = sorted(directory.glob("ckpt-*.json")) if directory.exists() else []
    return [Checkpoint.from_json(f.read_bytes(), str(f)) for f in files]


def output_lines(output: Path, index: int = 0) -> list[bytes]:
    """The shard's output as a reader sees it: the latest checkpoint's parts, in order."""
    latest = checkpoints(output, index)[-1]
    lines: list[bytes] = []
    for part in latest.parts:
        lines += (output / part.name).read_bytes().splitlines()
    return lines


def custom_ids(lines: list[bytes]) -> list[str | None]:
    return [orjson.loads(line)["custom_id"] for line in lines]


@pytest.fixture(autouse=True)
def _seeded() -> None:
    random.seed(1234)


@pytest.fixture
def uninterrupted(tmp_path: Path) -> tuple[Path, list[bytes]]:
    """The standard input and the output of one uninterrupted run of it."""
    source = standard_input(tmp_path / "in")
    result = run(settings_for(source, tmp_path / "reference"))
    assert result.exit_code == EXIT_COMPLETE
    return source, output_lines(tmp_path / "reference")


# -- the format -------------------------------------------------------------------------------
def test_shards_take_every_nth_record_counted_over_all_files_in_order(tmp_path: Path) -> None:
    root = write_input(
        tmp_path / "in",
        {"b.jsonl": ["r3", "", "r4"], "a.jsonl": ["r0", " ", "r1", "r2"], "z/x.jsonl": ["r5"]},
    )
    (root / "skip.json").write_text("r-not-input\n")
    fs, files = input_files(str(root))
    assert [Path(f).name for f in files] == ["a.jsonl", "b.jsonl", "x.jsonl"]
    lines = list(read_lines(fs, files))
    got = {
        index: [(r.ordinal, r.number, r.line.strip()) for r in shard_records(lines, index, 2)]
        for index in (0, 1)
    }
    assert got[0] == [(0, 0, b"r0"), (1, 2, b"r2"), (2, 4, b"r4")]
    assert got[1] == [(0, 1, b"r1"), (1, 3, b"r3"), (2, 5, b"r5")]
    later = [r.number for r in shard_records(lines, 1, 2, start=2)]
    assert later == [5]


def test_input_uri_that_names_nothing_usable_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"TIDAL_INPUT_URI.*does not exist"):
        input_files(str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no \*\.jsonl"):
        input_files(str(tmp_path / "empty"))


@pytest.mark.parametrize(
    ("line", "code", "custom_id"),
    [
        (b"{not json", "invalid_json", None),
        (b'["a list"]', "invalid_json", None),
        (b"\xff\xfe", "invalid_json", None),
        (b'{"method": "POST", "url": "/v1/completions", "body": {}}', "missing_custom_id", None),
        (b'{"custom_id": 7, "method": "POST"}', "missing_custom_id", None),
        (b'{"custom_id": "a", "method": "GET", "url": "/v1/completions"}', "invalid_method", "a"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings"}', "invalid_url", "a"),
        (b'{"custom_id": "a", "method": "POST", "url": "/v1/completions"}', "invalid_body", "a"),
    ],
)
def test_bad_lines_say_why(line: bytes, code: str, custom_id: str | None) -> None:
    bad = parse_line(line)
    assert isinstance(bad, BadLine)
    assert (bad.code, bad.custom_id) == (code, custom_id)
    out = orjson.loads(error_line(4, bad))
    assert out["custom_id"] == custom_id
    assert out["response"]["status_code"] == 400
    assert out["response"]["body"] is None
    assert out["error"]["code"] == code and out["error"]["message"]
    assert re.fullmatch(r"batch_req_[0-9a-f]{32}", out["id"])


def test_good_lines_parse_and_get_a_stable_seed_unless_they_name_one() -> None:
    request = parse_line(request_line("x", url="/v1/chat/completions").encode())
    assert isinstance(request, Request)
    assert (request.custom_id, request.url) == ("x", "/v1/chat/completions")
    sent = with_seed(request)
    assert sent["seed"] == seed_for("x") and 0 <= seed_for("x") < 2**31
    assert "seed" not in request.body  # the caller's body is not changed
    assert seed_for("x") != seed_for("y")
    pinned = parse_line(request_line("x", seed=5).encode())
    assert isinstance(pinned, Request)
    assert with_seed(pinned)["seed"] == 5


def test_an_error_status_is_an_ordinary_line_with_the_error_body() -> None:
    body = {"error": {"message": "too long"}}
    out = orjson.loads(response_line(3, "c", 400, body))
    assert out["response"]["status_code"] == 400
    assert out["response"]["body"] == body
    assert out["error"] is None
    # Ids depend on the record alone: a redo writes the same line.
    assert response_line(3, "c", 400, body) == response_line(3, "c", 400, body)
    assert orjson.loads(response_line(4, "c", 400, body))["id"] != out["id"]


# -- the ordered writer -----------------------------------------------------------------------
def test_ordered_writer_writes_in_order_whatever_the_completion_order() -> None:
    async def scenario() -> list[int]:
        written: list[int] = []
        writer: OrderedWriter[int] = OrderedWriter(written.append, window=4, start=10)
        for index in (12, 11, 13):
            writer.put(index, index)
        assert written == [] and writer.buffered == 3 and writer.next == 10
        writer.put(10, 10)
        assert writer.next == 14 and writer.buffered == 0
        writer.put(15, 15)
        writer.put(14, 14)
        return written

    assert asyncio.run(scenario()) == [10, 11, 12, 13, 14, 15]


def test_ordered_writer_bounds_its_buffer() -> None:
    async def scenario() -> None:
        writer: OrderedWriter[str] = OrderedWriter(lambda _: None, window=3)
        writer.put(2, "c")
        with pytest.raises(ValueError, match="outside the window"):
            writer.put(3, "d")
        with pytest.raises(ValueError, match="already"):
            writer.put(2, "c")
        waiting = asyncio.create_task(writer.wait_for_room(3))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # the head (0) holds index 3 back
        writer.put(1, "b")
        await asyncio.sleep(0.01)
        assert not waiting.done()
        writer.put(0, "a")
        await asyncio.wait_for(waiting, 1)
        writer.put(3, "d")
        assert writer.next == 4

    asyncio.run(scenario())


# -- checkpoints and settings -----------------------------------------------------------------
def test_checkpoints_round_trip_and_bad_ones_say_what_is_wrong() -> None:
    checkpoint = Checkpoint(
        input_uri="s3://b/in",
        shard="1/4",
        next_record=12,
        parts=(Part("part-1-0-00000.jsonl", 5, "ab"), Part("part-1-2-00001.jsonl", 7, "cd")),
        model="m",
        attempt=2,
        complete=True,
    )
    assert Checkpoint.from_json(checkpoint.to_json(), "x") == checkpoint
    value = orjson.loads(checkpoint.to_json())
    assert set(value) == {
        "input_uri", "shard", "next_record", "parts", "model", "attempt", "created", "complete",
    }  # fmt: skip
    value["next_record"] = "12"
    with pytest.raises(ConfigError, match="next_record must be a int"):
        Checkpoint.from_json(orjson.dumps(value), "x")
    with pytest.raises(ConfigError, match="ckpt-9 is not valid"):
        Checkpoint.from_json(b"{", "ckpt-9")
    assert checkpoint_name(3, 7) == "_checkpoints/shard-3/ckpt-000007.json"
    assert checkpoint_number("ckpt-000007.json") == 7
    assert checkpoint_number(".ckpt-000007.json.tmp") is None


GOOD_ENV = {
    "TIDAL_INPUT_URI": "s3://bucket/in",
    "TIDAL_OUTPUT_URI": "s3://bucket/out/",
    "TIDAL_SHARD": "2/4",
    "TIDAL_CHECKPOINT_INTERVAL_SECONDS": "90",
    "TIDAL_RESUME_FROM": "",
    "TIDAL_ATTEMPT": "3",
    "TIDAL_POD_NAME": "job-2-3",
    "TIDAL_POD_NAMESPACE": "team",
    "TIDAL_MODEL_NAME": "llama",
}


def test_settings_come_from_the_pod_env() -> None:
    settings = BatchSettings.from_env(GOOD_ENV)
    assert settings == BatchSettings(
        input_uri="s3://bucket/in",
        output_uri="s3://bucket/out",
        shard_index=2,
        shard_count=4,
        checkpoint_interval_s=90.0,
        resume_from=None,
        attempt=3,
        model_name="llama",
        pod_name="job-2-3",
        pod_namespace="team",
    )
    assert settings.shard == "2/4"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"TIDAL_INPUT_URI": ""}, "TIDAL_INPUT_URI is not set"),
        ({"TIDAL_OUTPUT_URI": " "}, "TIDAL_OUTPUT_URI is not set"),
        ({"TIDAL_INPUT_URI": "nosuchproto://x/in"}, "TIDAL_INPUT_URI: cannot open"),
        ({"TIDAL_OUTPUT_URI": "s3://bucket/in/out"}, "TIDAL_OUTPUT_URI .* is inside"),
        ({"TIDAL_SHARD": "4/4"}, "TIDAL_SHARD must be 'i/n'"),
        ({"TIDAL_SHARD": "1"}, "TIDAL_SHARD must be 'i/n'"),
        ({"TIDAL_SHARD": "a/b"}, "TIDAL_SHARD must be 'i/n'"),
        ({"TIDAL_SHARD": "0/0"}, "TIDAL_SHARD must be 'i/n'"),
        ({"TIDAL_CHECKPOINT_INTERVAL_SECONDS": "0"}, "TIDAL_CHECKPOINT_INTERVAL_SECONDS"),
        ({"TIDAL_CHECKPOINT_INTERVAL_SECONDS": "nan"}, "TIDAL_CHECKPOINT_INTERVAL_SECONDS"),
        ({"TIDAL_ATTEMPT": "-1"}, "TIDAL_ATTEMPT must be a non-negative integer"),
        ({"TIDAL_RESUME_FROM": "nosuchproto://c"}, "TIDAL_RESUME_FROM: cannot open"),
    ],
)
def test_bad_settings_name_the_variable(changes: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BatchSettings.from_env({**GOOD_ENV, **changes})


def test_optional_settings_have_defaults() -> None:
    env = {k: GOOD_ENV[k] for k in ("TIDAL_INPUT_URI", "TIDAL_OUTPUT_URI", "TIDAL_SHARD")}
    settings = BatchSettings.from_env(env)
    assert (settings.checkpoint_interval_s, settings.attempt, settings.resume_from) == (
        600.0,
        0,
        None,
    )
    assert settings.pod_name is None


# -- whole runs -------------------------------------------------------------------------------
def test_a_full_run_answers_every_record_in_input_order(tmp_path: Path) -> None:
    source = standard_input(tmp_path / "in")
    metrics = WorkerMetrics("m")
    result = run(settings_for(source, tmp_path / "out"), metrics=metrics)
    assert result == BatchResult(
        exit_code=EXIT_COMPLETE,
        next_record=60,
        total=60,
        complete=True,
        checkpoint=str(tmp_path / "out" / "_checkpoints/shard-0/ckpt-000000.json"),
        written=60,
    )
    lines = [orjson.loads(line) for line in output_lines(tmp_path / "out")]
    assert [line["custom_id"] for line in lines] == [
        None if i == 7 else f"req-{i}" for i in range(60)
    ]
    for i, line in enumerate(lines):
        if i == 7:
            assert line["error"]["code"] == "invalid_json"
            continue
        assert line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["echo"]["prompt"] == f"req-{i}"
        assert line["response"]["body"]["echo"]["seed"] == seed_for(f"req-{i}")
    final = checkpoints(tmp_path / "out")[-1]
    assert final.complete and final.next_record == 60 and final.shard == "0/1"
    assert [p.name for p in final.parts] == ["part-0-1-00000.jsonl"]
    sample = metrics.registry.get_sample_value
    assert sample("tidal_batch_records_total", {"model_name": "m", "status": "ok"}) == 59
    assert sample("tidal_batch_records_total", {"model_name": "m", "status": "error"}) == 1
    assert sample("tidal_batch_checkpoints_total", {"model_name": "m"}) == 1


def test_error_statuses_are_written_and_counted(tmp_path: Path) -> None:
    source = write_input(
        tmp_path / "in", {"a.jsonl": [request_line("ok"), request_line("no", fail=True)]}
    )
    metrics = WorkerMetrics("m")
    assert run(settings_for(source, tmp_path / "out"), metrics=metrics).exit_code == 0
    failed = orjson.loads(output_lines(tmp_path / "out")[1])
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["message"] == "bad prompt"
    sample = metrics.registry.get_sample_value
    assert sample("tidal_batch_records_total", {"model_name": "m", "status": "error"}) == 1


def test_shards_together_answer_every_record_exactly_once(tmp_path: Path) -> None:
    source = standard_input(tmp_path / "in")

    async def all_shards() -> list[BatchResult]:
        stop = asyncio.Event()
        return list(
            await asyncio.gather(
                *(
                    run_batch(settings_for(source, tmp_path / "out", f"{i}/3"), echo, stop=stop)
                    for i in range(3)
                )
            )
        )

    results = asyncio.run(all_shards())
    assert [r.exit_code for r in results] == [0, 0, 0]
    for index in range(3):
        ids = custom_ids(output_lines(tmp_path / "out", index))
        expected = [None if i == 7 else f"req-{i}" for i in range(index, 60, 3)]
        assert ids == expected


def test_records_run_concurrently_and_a_slow_head_holds_back_dispatch(tmp_path: Path) -> None:
    source = write_input(tmp_path / "in", {"a.jsonl": [request_line(f"r{i}") for i in range(60)]})
    running: list[int] = [0, 0]  # now, most
    sent_before_head: list[int] = []
    sent: list[str] = []

    async def tracked(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        running[0] += 1
        running[1] = max(running)
        await asyncio.sleep(0.1 if body["prompt"] == "r0" else 0.001)
        if body["prompt"] == "r0":
            sent_before_head.append(len(sent))
        running[0] -= 1
        return await echo(url, body)

    result = run(settings_for(source, tmp_path / "out"), tracked, concurrency=3, calls=sent)
    assert result.exit_code == EXIT_COMPLETE
    assert running[1] == 3  # the engine saw full batches, never more
    # While record 0 ran, only its window (4 per slot) was dispatched, not the whole input.
    assert sent_before_head == [12]
    assert custom_ids(output_lines(tmp_path / "out")) == [f"r{i}" for i in range(60)]


def test_periodic_checkpoints_list_every_part_so_far(tmp_path: Path) -> None:
    source = standard_input(tmp_path / "in", records=120)

    async def slow(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        await asyncio.sleep(0.004)
        return await echo(url, body)

    metrics = WorkerMetrics("m")
    notes: list[str] = []
    settings = settings_for(source, tmp_path / "out", checkpoint_interval_s=0.03)
    result = run(settings, slow, concurrency=2, metrics=metrics, podnote=notes.append)
    assert result.exit_code == EXIT_COMPLETE
    saved = checkpoints(tmp_path / "out")
    assert len(saved) >= 3
    for earlier, later in itertools.pairwise(saved):
        assert later.parts[: len(earlier.parts)] == earlier.parts  # cumulative
        # progress every time, except that the final "complete" record may follow a periodic
        # one taken when the last record had just been written
        assert later.next_record > earlier.next_record or (
            later.complete and later.next_record == earlier.next_record
        )
    for checkpoint in saved:
        assert sum(p.lines for p in checkpoint.parts) == checkpoint.next_record
    assert [c.complete for c in saved] == [False] * (len(saved) - 1) + [True]
    assert notes[-1] == result.checkpoint and len(notes) == len(saved)
    sample = metrics.registry.get_sample_value
    assert sample("tidal_batch_checkpoints_total", {"model_name": "m"}) == len(saved)


@pytest.mark.parametrize("grace_s", [60.0, 0.0])
def test_a_stopped_run_resumed_writes_what_an_uninterrupted_run_writes(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]], grace_s: float
) -> None:
    source, reference = uninterrupted
    out = tmp_path / "out"
    before: list[str] = []
    first = run(settings_for(source, out), stop_after=25, grace_s=grace_s, calls=before)
    assert first.exit_code == EXIT_STOPPED and not first.complete
    assert 0 < first.next_record < 60
    dispatched = len(before) + 1  # and the bad line, 7, answered without the engine
    if grace_s:
        assert first.next_record == dispatched  # the grace let every in-flight record finish
    else:
        assert first.next_record < dispatched  # in-flight records were dropped, not written
    assert output_lines(out) == reference[: first.next_record]
    # The next attempt (a new number) redoes only what the checkpoint does not hold.
    sent: list[str] = []
    second = run(settings_for(source, out, attempt=2), calls=sent)
    assert second.exit_code == EXIT_COMPLETE and second.next_record == 60
    assert output_lines(out) == reference
    redone = sorted(sent)
    assert redone == sorted(f"req-{i}" for i in range(first.next_record, 60) if i != 7)
    names = [p.name for p in checkpoints(out)[-1].parts]
    assert names == ["part-0-1-00000.jsonl", "part-0-2-00001.jsonl"]


def test_a_part_written_after_the_last_checkpoint_is_ignored(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]]
) -> None:
    source, reference = uninterrupted
    out = tmp_path / "out"
    first = run(settings_for(source, out), stop_after=20)
    assert first.exit_code == EXIT_STOPPED
    # A killed attempt published a part, then died before its checkpoint.
    stray = out / "part-0-1-00001.jsonl"
    stray.write_bytes(b'{"custom_id": "req-0"}\n' * 30)
    assert run(settings_for(source, out, attempt=2)).exit_code == EXIT_COMPLETE
    lines = output_lines(out)
    assert lines == reference
    ids = custom_ids(lines)
    assert len(ids) == len(set(ids)) == 60
    assert stray.name not in {p.name for p in checkpoints(out)[-1].parts}


def test_a_dead_engine_exits_1_after_checkpointing_what_is_done(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]]
) -> None:
    source, reference = uninterrupted
    out = tmp_path / "out"
    sent: list[str] = []

    async def dying(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if len(sent) > 30:
            raise EngineDeadError("rank 1 died")
        return await echo(url, body)

    first = run(settings_for(source, out), dying, calls=sent)
    assert first.exit_code == EXIT_FAILED and "rank 1 died" in first.message
    assert 0 < first.next_record <= 30
    assert output_lines(out) == reference[: first.next_record]
    assert run(settings_for(source, out, attempt=2)).exit_code == EXIT_COMPLETE
    assert output_lines(out) == reference


def test_a_complete_shard_exits_0_without_redoing_anything(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]]
) -> None:
    source, _ = uninterrupted
    out = tmp_path / "reference"
    before = sorted(p.name for p in out.rglob("*"))

    async def never(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        raise AssertionError("a complete shard was redone")

    result = run(settings_for(source, out, attempt=5), never)
    assert (result.exit_code, result.complete, result.next_record) == (EXIT_COMPLETE, True, 60)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_resume_uses_the_latest_checkpoint_even_when_the_hint_is_older(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]]
) -> None:
    source, reference = uninterrupted
    out = tmp_path / "out"
    first = run(settings_for(source, out), stop_after=10)
    second = run(settings_for(source, out, attempt=2), stop_after=10)
    assert (first.exit_code, second.exit_code) == (EXIT_STOPPED, EXIT_STOPPED)
    assert second.next_record > first.next_record
    sent: list[str] = []
    third = run(settings_for(source, out, attempt=3, resume_from=first.checkpoint), calls=sent)
    assert third.exit_code == EXIT_COMPLETE
    assert len(sent) == len([i for i in range(second.next_record, 60) if i != 7])
    assert output_lines(out) == reference


def test_a_hint_that_names_nothing_in_an_empty_store_is_a_config_error(tmp_path: Path) -> None:
    source = standard_input(tmp_path / "in")
    hint = str(tmp_path / "out" / "_checkpoints/shard-0/ckpt-000004.json")
    result = run(settings_for(source, tmp_path / "out", resume_from=hint))
    assert result.exit_code == EXIT_CONFIG and "TIDAL_RESUME_FROM" in result.message


@pytest.mark.parametrize("mismatch", ["input", "shard", "part"])
def test_resume_refuses_a_checkpoint_of_another_input_shard_or_a_changed_part(
    tmp_path: Path, uninterrupted: tuple[Path, list[bytes]], mismatch: str
) -> None:
    source, _ = uninterrupted
    out = tmp_path / "out"
    shard = "0/3" if mismatch == "shard" else "0/1"
    assert run(settings_for(source, out, shard), stop_after=8).exit_code == EXIT_STOPPED
    settings = settings_for(source, out, shard, attempt=2)
    if mismatch == "input":
        other = standard_input(tmp_path / "other")
        settings = replace(settings, input_uri=str(other))
        expected = "TIDAL_INPUT_URI"
    elif mismatch == "shard":
        settings = replace(settings, shard_count=2)
        expected = "TIDAL_SHARD"
    else:
        part = out / checkpoints(out)[-1].parts[0].name
        part.write_bytes(part.read_bytes() + b"{}\n")
        expected = "sha256"
    result = run(settings)
    assert result.exit_code == EXIT_CONFIG
    assert expected in result.message


def test_main_turns_sigterm_into_a_checkpoint_and_143(tmp_path: Path) -> None:
    source = standard_input(tmp_path / "in")
    out = tmp_path / "out"
    sent: list[str] = []

    async def signalled(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sent.append(body["prompt"])
        if len(sent) == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return await echo(url, body)

    env = {
        "TIDAL_INPUT_URI": str(source),
        "TIDAL_OUTPUT_URI": str(out),
        "TIDAL_SHARD": "0/1",
        "TIDAL_ATTEMPT": "1",
    }
    assert main(signalled, env=env, podnote=lambda uri: None) == EXIT_STOPPED
    assert 0 < checkpoints(out)[-1].next_record < 60
    assert main(echo, env={**env, "TIDAL_ATTEMPT": "2"}) == EXIT_COMPLETE
    assert main(echo, env={**env, "TIDAL_SHARD": "1/1"}) == EXIT_CONFIG


def test_the_batch_package_imports_no_torch() -> None:
    code = "import sys, tidal.inference_worker.batch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- on S3 (moto's server) ----------------------------------------------------------------------
@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Any]:
    """An S3 endpoint (moto's server on a free port) reached the way a pod reaches one: the
    endpoint and credentials in botocore's environment variables, nothing in tidal's."""
    from moto.server import ThreadedMotoServer  # noqa: PLC0415
    from s3fs import S3FileSystem  # type: ignore[import-untyped, unused-ignore]  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    for name, value in {
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }.items():
        monkeypatch.setenv(name, value)
    S3FileSystem.clear_instance_cache()  # a cached client would keep another endpoint
    fs = S3FileSystem()
    fs.mkdir("jobs")
    try:
        yield fs
    finally:
        S3FileSystem.clear_instance_cache()
        server.stop()


def test_stop_and_resume_on_s3(s3: Any, tmp_path: Path) -> None:
    local = standard_input(tmp_path / "in")
    for path in sorted(local.rglob("*")):
        if path.is_file():
            s3.pipe_file(f"jobs/in/{path.relative_to(local)}", path.read_bytes())
    reference = run(settings_for(local, tmp_path / "reference"))
    assert reference.exit_code == EXIT_COMPLETE
    expected = output_lines(tmp_path / "reference")

    settings = settings_for("s3://jobs/in", "s3://jobs/out", checkpoint_interval_s=0.05)
    notes: list[str] = []
    first = run(settings, stop_after=25, podnote=notes.append)
    assert first.exit_code == EXIT_STOPPED
    assert notes and notes[-1] == first.checkpoint
    assert first.checkpoint is not None and first.checkpoint.startswith("s3://jobs/out/")
    s3.pipe_file("jobs/out/part-0-1-00042.jsonl", b"{}\n")  # a killed attempt's stray part
    second = run(replace(settings, attempt=2, resume_from=first.checkpoint))
    assert second.exit_code == EXIT_COMPLETE

    s3.invalidate_cache()
    names = sorted(s3.ls("jobs/out/_checkpoints/shard-0", detail=False))
    latest = Checkpoint.from_json(s3.cat_file(names[-1]), names[-1])
    assert latest.complete and latest.next_record == 60
    lines: list[bytes] = []
    for part in latest.parts:
        lines += s3.cat_file(f"jobs/out/{part.name}").splitlines()
    assert lines == expected
    assert not [p for p in s3.find("jobs/out") if p.endswith(".tmp")]


# -- the pod annotation -----------------------------------------------------------------------
class FakeCore:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self.fail = fail

    def patch_namespaced_pod(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        if self.fail:
            raise OSError("connection refused")
        return self

    def release_conn(self) -> None:
        pass


def test_the_annotation_is_a_merge_patch_of_the_pods_own_checkpoint_key() -> None:
    uri = "s3://b/out/_checkpoints/shard-0/ckpt-000003.json"
    assert checkpoint_patch(uri) == {"metadata": {"annotations": {api.ANNOTATION_CHECKPOINT: uri}}}
    core = FakeCore()
    made: list[int] = []

    def make_api(env: Any) -> FakeCore:
        made.append(1)
        return core

    annotator = PodAnnotator("job-0-1", "team", env={}, make_api=make_api)
    assert annotator(uri) and annotator(uri)
    assert made == [1]  # the client is made once, on first use
    args, kwargs = core.calls[0]
    assert args == ("job-0-1", "team", checkpoint_patch(uri))
    assert kwargs["_content_type"] == MERGE_PATCH
    assert kwargs["_request_timeout"] == 10


def test_a_failed_annotation_never_fails_the_job(caplog: pytest.LogCaptureFixture) -> None:
    annotator = PodAnnotator("p", "ns", env={}, make_api=lambda env: FakeCore(fail=True))
    with caplog.at_level(logging.WARNING):
        assert annotator("s3://b/c") is False
    assert "could not annotate pod ns/p" in caplog.text


def test_without_credentials_annotating_is_a_no_op_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    env = {"HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "absent")}
    assert kubeconfig_path(env) is None
    annotator = PodAnnotator("p", "ns", env=env)
    with caplog.at_level(logging.INFO):
        assert annotator("u1") is False
        assert annotator("u2") is False
    assert caplog.text.count(NO_CREDENTIALS) == 1


def test_a_kubeconfig_pointing_at_nothing_only_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    kubeconfig = tmp_path / "config"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
    )
    env = {"KUBECONFIG": str(kubeconfig)}
    assert kubeconfig_path(env) == kubeconfig
    with caplog.at_level(logging.WARNING):
        assert PodAnnotator("p", "ns", env=env)("u") is False
    assert "could not annotate pod ns/p" in caplog.text
