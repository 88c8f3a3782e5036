"""The LLM judge over real HTTP (a local fake OpenAI-compatible server), and its prompt sources."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from collapse.judge import prompts as prompts_mod
from collapse.judge.client import (
    GradeResult,
    Grades,
    InvalidReply,
    JudgeSettings,
    JudgeStopped,
    aggregate,
    cache_key,
    cache_path,
    grade_completions,
    parse_grades,
)
from collapse.judge.instruction import GRADES_SCHEMA, SPLIT_MARK, build_messages
from collapse.judge.prompts import PromptsUnavailable, cut_mid_sentence, load_prompts
from tests import judge_server as js

KEY = "sk-test-PLANTED-123"


def make_items(grades: list[tuple[int, int, int]]) -> list[tuple[int, int, str, str]]:
    """Items whose completions carry the grades the fake server will give them."""
    return [
        (i // 2, i % 2, f"Once upon a time, a fox called Rex{i} found a", f" red ball. GRADES={g}")
        for i, g in enumerate(",".join(map(str, t)) for t in grades)
    ]


@dataclass
class Judge:
    """Runs `grade_completions` against a fake server, capturing logs and sleeps."""

    tmp: Path
    server: js.JudgeServer
    messages: list[str] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def log_path(self) -> Path:
        return self.tmp / "judge.jsonl"

    @property
    def cache_dir(self) -> Path:
        return self.tmp / "cache"

    def settings(self, **overrides: Any) -> JudgeSettings:
        values: dict[str, Any] = {
            "base_url": self.server.base_url,
            "model": "judge-test",
            "api_key": KEY,
            "max_concurrency": 4,
            "timeout_s": 5.0,
            "backoff_base_s": 1.0,
            "backoff_max_s": 10.0,
        }
        values.update(overrides)
        return JudgeSettings(**values)

    def grade(self, items: list[tuple[int, int, str, str]], **overrides: Any) -> list[GradeResult]:
        try:
            return grade_completions(
                items,
                self.settings(**overrides),
                cache_dir=self.cache_dir,
                log_path=self.log_path,
                log=self.messages.append,
                sleep=self.sleeps.append,
            )
        except JudgeStopped as exc:
            self.errors.append(str(exc))
            raise

    def journal(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text().splitlines()]


@pytest.fixture
def judge(tmp_path: Path) -> Iterator[Callable[[js.Behaviour], Judge]]:
    """A factory of judges; afterwards, the planted key must appear in nothing we wrote."""
    made: list[Judge] = []
    servers: list[js.JudgeServer] = []

    def factory(behaviour: js.Behaviour = js.normal) -> Judge:
        server = js.JudgeServer(behaviour).__enter__()
        servers.append(server)
        made.append(Judge(tmp_path, server))
        return made[-1]

    yield factory
    for server in servers:
        server.__exit__(None, None, None)
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert KEY not in file.read_text(errors="replace"), file
    for j in made:
        assert not any(KEY in m for m in j.messages + j.errors)


# --- normal operation, aggregation, order, cache --------------------------------------------


def test_grades_aggregate_over_real_http(judge: Callable[..., Judge]) -> None:
    j = judge(js.normal)
    items = make_items([(7, 3, 5), (8, 4, 5), (9, 3, 6), (6, 2, 4)])
    items.append((9, 0, "Tom had a", " hat. GRADES=12,1,1"))  # out of range: a failure
    results = j.grade(items)

    assert [(r.prompt_index, r.completion_index) for r in results] == [(i[0], i[1]) for i in items]
    assert [r.grades for r in results[:4]] == [
        Grades(grammar=7, creativity=3, consistency=5),
        Grades(grammar=8, creativity=4, consistency=5),
        Grades(grammar=9, creativity=3, consistency=6),
        Grades(grammar=6, creativity=2, consistency=4),
    ]
    assert results[4].grades is None and "less than or equal to 9" in (results[4].failure or "")

    summary = aggregate(results)
    # By hand: grammar 7,8,9,6 -> mean 7.5, squared deviations sum 5, sample variance 5/3.
    assert summary["grammar"]["mean"] == pytest.approx(7.5)
    assert summary["grammar"]["stderr"] == pytest.approx(math.sqrt(5 / 3) / 2)
    # creativity 3,4,3,2 -> mean 3, deviations^2 sum 2; consistency 5,5,6,4 -> mean 5, sum 2.
    assert summary["creativity"]["mean"] == pytest.approx(3.0)
    assert summary["creativity"]["stderr"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert summary["consistency"]["mean"] == pytest.approx(5.0)
    assert summary["consistency"]["stderr"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert all(summary[c]["n"] == 4 for c in ("grammar", "creativity", "consistency"))
    assert summary["failures"] == 1 and summary["graded"] == 4 and summary["items"] == 5
    # One request per valid item, parse_attempts (3) for the invalid one; openai's own retries
    # are off, so the server saw exactly what we counted.
    assert summary["requests"] == 4 + 3 == j.server.count
    assert summary["cached"] == 0

    first = j.server.requests[0]
    assert first.headers["authorization"] == f"Bearer {KEY}"  # the planted key was really used
    body = first.body
    assert body["model"] == "judge-test"
    assert body["temperature"] == 0.0 and body["max_tokens"] == 100
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "story_grades", "schema": GRADES_SCHEMA, "strict": True},
    }
    assert [m["role"] for m in body["messages"]] == ["system", "user"]

    events = [r["event"] for r in j.journal()]
    assert events.count("reply") == 4 and events.count("invalid") == 3
    assert events.count("failure") == 1
    assert any("4/5 graded" in m for m in j.messages)


def test_reasoning_model_settings_change_what_is_sent(judge: Callable[..., Judge]) -> None:
    j = judge(js.normal)
    items = make_items([(7, 3, 5)])
    results = j.grade(items, temperature=None, token_limit_param="max_completion_tokens")
    assert results[0].grades == Grades(grammar=7, creativity=3, consistency=5)
    body = j.server.requests[0].body
    assert body["max_completion_tokens"] == 100
    assert "max_tokens" not in body and "temperature" not in body
    # a different request: not answered from the temperature-0 cache entry
    j.grade(items)
    assert j.server.count == 2 and j.server.requests[1].body["temperature"] == 0.0


def test_results_follow_item_order_not_timing(judge: Callable[..., Judge]) -> None:
    # Earlier items answer later: completion order is the reverse of item order.
    def slow_first(request: js.Request) -> js.Reply:
        rank = int(request.user_text.split("Rex")[1].split()[0])
        reply = js.normal(request)
        reply.delay_s = 0.05 * (8 - rank)
        return reply

    j = judge(slow_first)
    items = make_items([(i, 9 - i, i % 3) for i in range(8)])
    results = j.grade(items, max_concurrency=8)
    assert [r.grades.grammar for r in results if r.grades] == list(range(8))


def test_second_run_sends_no_request(judge: Callable[..., Judge]) -> None:
    j = judge(js.normal)
    items = make_items([(1, 2, 3), (4, 5, 6), (7, 8, 9)])
    first = j.grade(items)
    assert j.server.count == 3 and not any(r.cached for r in first)

    second = j.grade(items)
    assert j.server.count == 3  # zero new requests
    assert all(r.cached and r.attempts == 0 for r in second)
    assert [r.grades for r in second] == [r.grades for r in first]
    assert aggregate(second)["requests"] == 0 and aggregate(second)["cached"] == 3

    # The cache layout, and the key leaves out base_url: another server gets nothing either.
    settings = j.settings()
    key = cache_key(settings, build_messages(items[0][2], items[0][3]), "json_schema")
    entry = json.loads(cache_path(j.cache_dir, key).read_text())
    assert cache_path(j.cache_dir, key).parent.name == key[:2]
    assert entry["grades"] == {"grammar": 1, "creativity": 2, "consistency": 3}
    assert json.loads(entry["reply"]) == entry["grades"]
    other = judge(js.normal)
    assert all(r.cached for r in other.grade(items)) and other.server.count == 0
    # ... but the model is part of it.
    other.grade(items[:1], model="another-judge")
    assert other.server.count == 1


def test_identical_items_are_asked_once(judge: Callable[..., Judge]) -> None:
    j = judge(js.normal)
    item = make_items([(5, 5, 5)])[0]
    results = j.grade([item, (3, 1, item[2], item[3]), item])
    assert j.server.count == 1
    assert [r.grades for r in results] == [Grades(grammar=5, creativity=5, consistency=5)] * 3
    assert (results[1].prompt_index, results[1].completion_index) == (3, 1)
    assert [r.cached for r in results] == [False, True, True]


def test_failures_are_not_cached(judge: Callable[..., Judge]) -> None:
    j = judge(js.content('{"grammar": 5}'))
    items = make_items([(1, 1, 1)])
    j.grade(items, parse_attempts=2)
    j.grade(items, parse_attempts=2)
    assert j.server.count == 4
    assert not list(j.cache_dir.rglob("*.json"))


# --- response-format fallbacks --------------------------------------------------------------


@pytest.mark.parametrize(
    "behaviour",
    [
        js.reject_formats("json_schema", status=400),
        js.reject_formats("json_schema", status=422),
        js.llama_cpp,
    ],
    ids=["400", "422", "llama.cpp-500"],
)
def test_json_schema_rejected_falls_back_to_json_object(
    judge: Callable[..., Judge], behaviour: js.Behaviour
) -> None:
    j = judge(behaviour)
    items = make_items([(1, 2, 3), (2, 3, 4), (3, 4, 5)])
    results = j.grade(items, max_concurrency=1)
    assert [r.grades.grammar for r in results if r.grades] == [1, 2, 3]
    # The mode that worked is remembered: json_schema was tried once only.
    assert [r.mode for r in j.server.requests] == ["json_schema"] + ["json_object"] * 3
    assert j.sleeps == []  # a format rejection is not a transient error: no backoff
    assert sum("does not accept response_format json_schema" in m for m in j.messages) == 1
    assert [r["event"] for r in j.journal()].count("format_rejected") == 1


def test_fallback_logged_once_under_concurrency(judge: Callable[..., Judge]) -> None:
    j = judge(js.reject_formats("json_schema"))
    results = j.grade(make_items([(i, i, i) for i in range(10)]), max_concurrency=4)
    assert all(r.grades is not None for r in results)
    assert sum("response_format" in m for m in j.messages) == 1
    # At most the requests in flight when the first rejection came back used json_schema.
    assert sum(r.mode == "json_schema" for r in j.server.requests) <= 4


def test_both_formats_rejected_falls_back_to_text_with_prose(
    judge: Callable[..., Judge],
) -> None:
    j = judge(js.reject_formats("json_schema", "json_object", then=js.prose))
    results = j.grade(make_items([(4, 5, 6), (7, 8, 9)]), max_concurrency=1)
    assert [r.grades for r in results] == [
        Grades(grammar=4, creativity=5, consistency=6),
        Grades(grammar=7, creativity=8, consistency=9),
    ]
    assert [r.mode for r in j.server.requests] == ["json_schema", "json_object", "text", "text"]
    assert "response_format" not in j.server.requests[-1].body
    assert sum("response_format" in m for m in j.messages) == 2


def test_a_400_that_is_not_about_the_format_stops(judge: Callable[..., Judge]) -> None:
    j = judge(lambda request: js.error(400, "The model `judge-test` does not exist"))
    with pytest.raises(JudgeStopped, match="HTTP 400.*does not exist"):
        j.grade(make_items([(1, 1, 1)]))
    assert j.server.count == 1


# --- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize("behaviour", [js.prose, js.fenced, js.thinking])
def test_prose_fences_and_think_blocks_are_parsed(
    judge: Callable[..., Judge], behaviour: js.Behaviour
) -> None:
    j = judge(behaviour)
    results = j.grade(make_items([(2, 4, 6), (9, 0, 1)]))
    assert [r.grades for r in results] == [
        Grades(grammar=2, creativity=4, consistency=6),
        Grades(grammar=9, creativity=0, consistency=1),
    ]
    assert all(r.attempts == 1 for r in results)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ('{"grammar": 12, "creativity": 3, "consistency": 4}', "less than or equal to 9"),
        ('{"grammar": 5, "creativity": -1, "consistency": 4}', "greater than or equal to 0"),
        ('{"grammar": 5, "creativity": 3}', "consistency: missing"),
        ('{"grammar": "seven", "creativity": 3, "consistency": 4}', "not an integer grade"),
        ('{"grammar": 7.5, "creativity": 3, "consistency": 4}', "not an integer grade"),
        ('{"grammar": "7.0", "creativity": 3, "consistency": 4}', "not an integer grade"),
        ("I would rather not grade this story.", "no JSON object"),
        ("", "empty reply"),
    ],
)
def test_invalid_grades_are_retried_then_recorded_as_failures(
    judge: Callable[..., Judge], reply: str, reason: str
) -> None:
    j = judge(js.content(reply))
    results = j.grade(make_items([(1, 1, 1), (2, 2, 2)]))
    for r in results:
        assert r.grades is None and r.attempts == 3
        assert r.failure is not None and reason in r.failure and "after 3 tries" in r.failure
    assert j.server.count == 6
    summary = aggregate(results)
    assert summary["grammar"] == {"mean": None, "stderr": None, "n": 0}
    assert summary["failures"] == 2 and summary["graded"] == 0


def test_invalid_reply_then_valid_one(judge: Callable[..., Judge]) -> None:
    j = judge(js.first_then(1, js.content('{"grammar": 10, "creativity": 1, "consistency": 1}')))
    [result] = j.grade(make_items([(3, 3, 3)]))
    assert result.grades == Grades(grammar=3, creativity=3, consistency=3)
    assert result.attempts == 2 and result.failure is None


def test_truncated_reply_says_so(judge: Callable[..., Judge]) -> None:
    j = judge(js.content('{"grammar": 7, "creat', finish_reason="length"))
    [result] = j.grade(make_items([(3, 3, 3)]), parse_attempts=1)
    assert result.failure is not None and "max_tokens=100" in result.failure


def test_parse_grades_accepts_and_rejects() -> None:
    expected = Grades(grammar=7, creativity=3, consistency=0)
    accepted = [
        '{"grammar": 7, "creativity": 3, "consistency": 0}',
        '{"grammar": "7", "creativity": " 3 ", "consistency": 0}',  # quoted integers
        '{"grammar": 7.0, "creativity": 3, "consistency": 0}',  # JSON's 7.0 is 7
        '{"grammar": 7, "creativity": 3, "consistency": 0, "explanation": "fine"}',  # extra key
        '{"grades": {"grammar": 7, "creativity": 3, "consistency": 0}}',  # nested
        'A: {"grammar": 7, "creativity": 3, "consistency": 0} B: '
        '{"consistency": 0, "creativity": 3, "grammar": 7}',  # the same object twice
    ]
    for text in accepted:
        assert parse_grades(text) == expected, text
    rejected = [
        '{"grammar": true, "creativity": 3, "consistency": 0}',
        '{"grammar": 7, "creativity": 3, "consistency": null}',
        '{"grammar": 7, "creativity": 3, "consistency": 0} or {"grammar": 6, "creativity": 3, '
        '"consistency": 0}',  # two different answers: ambiguous
        "[7, 3, 0]",
        None,
    ]
    for text in rejected:
        with pytest.raises(InvalidReply):
            parse_grades(text)


# --- transport retries ----------------------------------------------------------------------


def test_retry_after_seconds_is_honoured(judge: Callable[..., Judge]) -> None:
    j = judge(js.first_then(1, js.rate_limited("2")))
    results = j.grade(make_items([(1, 2, 3), (4, 5, 6), (7, 8, 9)]))
    assert all(r.grades is not None and r.attempts == 2 for r in results)
    assert j.sleeps == [2.0, 2.0, 2.0]
    errors = [r for r in j.journal() if r["event"] == "error"]
    assert len(errors) == 3 and {r["status"] for r in errors} == {429}


def test_retry_after_http_date_and_cap(judge: Callable[..., Judge]) -> None:
    j = judge(js.first_then(1, js.rate_limited(js.http_date(30))))
    j.grade(make_items([(1, 2, 3)]), backoff_max_s=60.0)
    assert len(j.sleeps) == 1 and 27.0 <= j.sleeps[0] <= 30.0

    capped = judge(js.first_then(1, js.rate_limited("3600")))
    capped.grade(make_items([(4, 5, 6)]), backoff_max_s=10.0)
    assert capped.sleeps == [10.0]


def test_server_errors_then_success(judge: Callable[..., Judge]) -> None:
    j = judge(js.first_then(2, js.server_error(500)))
    results = j.grade(make_items([(1, 2, 3), (4, 5, 6)]), max_concurrency=1)
    assert [r.attempts for r in results] == [3, 3]
    assert all(r.grades is not None for r in results)
    assert j.server.count == 6
    # Exponential backoff with full jitter: uniform in [0, base * 2^(k-1)].
    assert len(j.sleeps) == 4
    for delay, ceiling in zip(j.sleeps, [1.0, 2.0, 1.0, 2.0], strict=True):
        assert 0.0 <= delay <= ceiling


def test_server_errors_exhaust_attempts(judge: Callable[..., Judge]) -> None:
    j = judge(js.server_error(503))
    [result] = j.grade(make_items([(1, 2, 3)]), max_attempts=3)
    assert result.grades is None and result.attempts == 3 == j.server.count
    assert result.failure is not None and "no answer after 3 attempts: HTTP 503" in result.failure
    assert len(j.sleeps) == 2


def test_timeout_is_retried_then_recorded_as_failure(judge: Callable[..., Judge]) -> None:
    j = judge(js.hang(5.0))
    started = time.monotonic()
    [result] = j.grade(make_items([(1, 2, 3)]), timeout_s=0.5, max_attempts=2)
    elapsed = time.monotonic() - started
    assert result.grades is None and result.attempts == 2 == j.server.count
    assert result.failure is not None and "timed out after 0.5 s" in result.failure
    assert 0.9 < elapsed < 4.0
    assert len(j.sleeps) == 1


def test_timeout_then_success(judge: Callable[..., Judge]) -> None:
    j = judge(js.first_then(1, js.hang(5.0)))
    [result] = j.grade(make_items([(6, 6, 6)]), timeout_s=0.5)
    assert result.grades == Grades(grammar=6, creativity=6, consistency=6)
    assert result.attempts == 2


def test_connection_refused_is_retried_then_failure(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = JudgeSettings(
        base_url=f"http://127.0.0.1:{port}/v1", model="m", api_key=KEY, max_attempts=2
    )
    sleeps: list[float] = []
    messages: list[str] = []
    [result] = grade_completions(
        make_items([(1, 1, 1)]),
        settings,
        cache_dir=tmp_path / "cache",
        log_path=tmp_path / "log.jsonl",
        log=messages.append,
        sleep=sleeps.append,
    )
    assert result.failure is not None and "connection error" in result.failure
    assert result.attempts == 2 and len(sleeps) == 1
    assert KEY not in (tmp_path / "log.jsonl").read_text() and not any(KEY in m for m in messages)


# --- stopping -------------------------------------------------------------------------------


def test_401_stops_with_a_clear_message_and_no_key(judge: Callable[..., Judge]) -> None:
    j = judge(js.unauthorized)
    with pytest.raises(JudgeStopped) as info:
        j.grade(make_items([(1, 1, 1)] * 12), max_concurrency=4)
    message = str(info.value)
    assert "rejected the API key (HTTP 401)" in message
    assert "judge.api_key_env" in message
    assert KEY not in message and "[redacted]" in message  # the server echoed it; we did not
    assert info.value.__cause__ is None  # no chained openai error (its request has the headers)
    # Workers stopped: nothing beyond the requests already in flight.
    assert j.server.count <= 4
    assert "stopped" in [r["event"] for r in j.journal()]


@pytest.mark.parametrize(
    ("status", "hint"),
    [(403, "no permission for model 'judge-test'"), (404, "judge.base_url")],
)
def test_other_4xx_stop(judge: Callable[..., Judge], status: int, hint: str) -> None:
    j = judge(lambda request: js.error(status, "nope"))
    with pytest.raises(JudgeStopped, match=f"HTTP {status}") as info:
        j.grade(make_items([(1, 1, 1)]))
    assert hint in str(info.value) and "The server said: nope" in str(info.value)
    assert j.server.count == 1


def test_key_is_not_in_settings_repr() -> None:
    settings = JudgeSettings(base_url=None, model="gpt-4o", api_key=KEY)
    assert KEY not in repr(settings) and KEY not in str(settings)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="max_concurrency must be at least 1"):
        JudgeSettings(base_url=None, model="m", api_key="k", max_concurrency=0)


def test_messages_mark_the_split() -> None:
    system, user = build_messages("Lily saw a", " big dog.")
    assert system["role"] == "system" and "JSON" in system["content"]
    assert f"Lily saw a{SPLIT_MARK} big dog." in user["content"]


# --- prompts --------------------------------------------------------------------------------


def test_prompt_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("- |-\n  Once upon a time, there was a\n- 'Tom had a big '\n- Sue went\n")
    assert load_prompts("file", path=yaml_file) == [
        "Once upon a time, there was a",
        "Tom had a big",
        "Sue went",
    ]
    assert load_prompts("file", path=yaml_file, count=2) == [
        "Once upon a time, there was a",
        "Tom had a big",
    ]
    (tmp_path / "p.yml").write_text(yaml_file.read_text())
    assert len(load_prompts("file", path=tmp_path / "p.yml")) == 3
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps(["A dog", "A cat\nsaw"]))
    assert load_prompts("file", path=json_file) == ["A dog", "A cat\nsaw"]
    txt = tmp_path / "p.txt"
    txt.write_text("First prompt\nstill first\n\n  \nSecond one\n\n\n")
    assert load_prompts("file", path=txt) == ["First prompt\nstill first", "Second one"]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("a.yaml", "prompts: [a, b]\n", "expected a list of strings, got dict"),
        ("a.yaml", "- a\n- 3\n", "item 1 is int"),
        ("a.json", '["a", "  "]', "item 1 is an empty string"),
        ("a.json", "[]", "list of prompts is empty"),
        ("a.json", "[1,", "not valid JSON"),
        ("a.txt", "\n\n  \n", "is empty"),
        ("a.csv", "a,b\n", "unsupported extension"),
    ],
)
def test_prompt_file_errors_name_the_file(
    tmp_path: Path, name: str, text: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_prompts("file", path=path)
    assert str(path) in str(info.value)


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts("file", path=tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="needs a path"):
        load_prompts("file")


STORIES = [
    f"Story {i}. Once upon a time, there was a little {animal} named {name}. {name} liked to "
    f"play in the park with a red ball every day. One day, the ball rolled away and {name} "
    "was sad. Then a kind bird helped find it, and they played until the sun went down."
    for i, (animal, name) in enumerate(
        [("cat", "Tom"), ("dog", "Max"), ("fox", "Lily"), ("bear", "Ben"), ("duck", "Sue")] * 4
    )
] + ["Too short.", "Hi."]


def test_validation_prompts_are_cut_mid_sentence_and_deterministic() -> None:
    prompts = load_prompts("validation", validation_texts=STORIES, count=10, seed=3)
    assert len(prompts) == 10
    assert prompts == load_prompts("validation", validation_texts=STORIES, count=10, seed=3)
    assert prompts != load_prompts("validation", validation_texts=STORIES, count=10, seed=4)
    # A larger count only appends.
    assert load_prompts("validation", validation_texts=STORIES, count=15, seed=3)[:10] == prompts
    for prompt in prompts:
        story = next(s for s in STORIES if s.startswith(prompt))
        words, total = len(prompt.split()), len(story.split())
        assert 0.3 * total <= words <= 0.7 * total
        assert prompt[-1] not in ".!?"
        assert story[len(prompt)] == " "  # cut between words
    # Stories too short to cut are skipped: only 20 usable ones.
    assert len(load_prompts("validation", validation_texts=STORIES, count=50)) == 20


def test_cut_never_at_a_sentence_end() -> None:
    story = 'One. Two. Three. "Four!" Five? Six... Seven. Eight went home. Nine. Ten.'
    for seed in range(20):
        cut = cut_mid_sentence(story, np.random.default_rng(seed))
        # Words 4..8 of 12 are in range, and only "Eight" does not end a sentence.
        assert cut is not None and cut.endswith("Seven. Eight")
    assert cut_mid_sentence("One. Two. Three. Four. Five.", np.random.default_rng(0)) is None


def test_validation_needs_stories() -> None:
    with pytest.raises(ValueError, match="needs the validation stories"):
        load_prompts("validation")
    with pytest.raises(ValueError, match="long enough"):
        load_prompts("validation", validation_texts=["Hi.", "Yes."])


def _no_hub(*args: Any, **kwargs: Any) -> str:
    raise AssertionError("the hub must not be contacted")


def test_tinystories_copy_is_used_without_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub)
    (tmp_path / prompts_mod.COPY_NAME).write_text("- |-\n  Once upon a time\n- Tom saw a\n")
    assert load_prompts("tinystories", cache_dir=tmp_path) == ["Once upon a time", "Tom saw a"]
    assert load_prompts("tinystories", cache_dir=tmp_path, count=1) == ["Once upon a time"]


def test_tinystories_download_is_copied_into_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hub_file = tmp_path / "hub" / "Evaluation prompts.yaml"
    hub_file.parent.mkdir()
    hub_file.write_text("- Once upon a time, there was a\n- Ben and Mia went to the\n")
    calls: list[dict[str, Any]] = []

    def fake_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(hub_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    run = tmp_path / "run"
    assert len(load_prompts("tinystories", cache_dir=run)) == 2
    assert calls == [
        {
            "repo_id": "roneneldan/TinyStories",
            "repo_type": "dataset",
            "filename": "Evaluation prompts.yaml",
        }
    ]
    assert (run / prompts_mod.COPY_NAME).read_bytes() == hub_file.read_bytes()
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub)
    assert len(load_prompts("tinystories", cache_dir=run)) == 2  # the copy, offline


def test_tinystories_unreachable_without_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    # The hub's settings are read at import, so the module constants are patched: a closed
    # port as endpoint, offline mode (no retries with backoff), an empty hub cache.
    monkeypatch.setattr(
        constants,
        "HUGGINGFACE_CO_URL_TEMPLATE",
        constants.HUGGINGFACE_CO_URL_TEMPLATE.replace(constants.ENDPOINT, closed),
    )
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    started = time.monotonic()
    with pytest.raises(PromptsUnavailable) as info:
        load_prompts("tinystories", cache_dir=tmp_path / "run")
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "judge.prompts: validation" in message and "judge.prompts: file" in message
    assert str(tmp_path / "run" / prompts_mod.COPY_NAME) in message
    assert isinstance(info.value, ValueError)
    assert not (tmp_path / "run").exists()
