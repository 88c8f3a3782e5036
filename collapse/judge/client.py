"""Grading completions with an OpenAI-compatible judge: structured output, retries and a cache.

One call of `grade_completions` grades a list of (prompt, completion) pairs with a pool of
threads sharing one `openai.OpenAI` client. The client's own retries are off; this module
retries transport failures (connection errors, timeouts, 429, 5xx) with exponential backoff and
full jitter, honouring Retry-After, and retries replies that do not parse into valid grades. An
item that still fails is recorded as a failure, never as a score. Any other 4xx stops the stage
with `JudgeStopped`.

Structured output is tried first (`response_format` json_schema). Servers without it (older
vLLM, llama.cpp, Ollama) are detected from their error and the call falls back to
`{"type": "json_object"}`, then to plain text with the JSON extracted from the reply.

Every successful reply is cached as a small JSON file keyed by what determines the grade (model,
instruction version, messages, temperature, max_tokens, response mode), so a rerun or a resumed
run sends no request twice. Every attempt is appended to a JSON-lines log. The API key never
reaches the cache, the log, the `log` callback or an exception message.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import re
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Annotated, Any
from urllib.parse import urlsplit, urlunsplit

import openai
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from collapse.errors import UserError
from collapse.judge.instruction import (
    CRITERIA,
    INSTRUCTION_VERSION,
    build_messages,
    response_format,
)
from collapse.store import atomic_write_json, now_iso, sha256_json

# Response modes, most constrained first: the order of the fallback.
MODES = ("json_schema", "json_object", "text")

# An error body that mentions one of these, in answer to a request with `response_format`,
# means the server does not support that format (vLLM, llama.cpp, Ollama and OpenAI all name
# the parameter or the schema in their message).
_FORMAT_WORDS = ("response_format", "json_schema", "json_object", "schema", "grammar")

# Statuses retried with backoff. 408 and 409 besides 429 and 5xx because the openai client
# retries them too: OpenAI uses 409 for a transient lock conflict.
_RETRY_STATUSES = frozenset({408, 409, 429})

# Keys shorter than this are placeholders for local servers ("EMPTY", "none"); redacting them
# would garble every log line that happens to contain the word.
_MIN_SECRET = 8
_REDACTED = "[redacted]"
# Sent when no key is configured: local servers ignore it, and the openai client refuses to
# start without one.
_NO_KEY = "no-key"

_THINK = re.compile(r"<think>.*?(</think>|$)", re.DOTALL)
_INT_TEXT = re.compile(r"\s*\d+\s*")


TOKEN_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True)
class JudgeSettings:
    """Where the judge is and how to talk to it."""

    base_url: str | None  # None: OPENAI_BASE_URL if set, else OpenAI's API
    model: str
    api_key: str = field(repr=False)  # never printed, logged or written
    temperature: float | None = 0.0  # None: not sent (reasoning models accept only the default)
    max_tokens: int = 100
    # OpenAI's reasoning models reject `max_tokens` and want `max_completion_tokens`.
    token_limit_param: str = "max_tokens"
    max_concurrency: int = 4
    timeout_s: float = 60.0
    max_attempts: int = 6  # transport-level attempts (connection errors, timeouts, 429, 5xx)
    parse_attempts: int = 3  # replies that do not parse into valid grades
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        problems = []
        if not self.model:
            problems.append("model must not be empty")
        for name in ("max_tokens", "max_concurrency", "max_attempts", "parse_attempts"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("timeout_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be positive")
        if self.backoff_base_s < 0:
            problems.append("backoff_base_s must not be negative")
        if self.temperature is not None and self.temperature < 0:
            problems.append("temperature must not be negative")
        if self.token_limit_param not in TOKEN_LIMIT_PARAMS:
            problems.append(f"token_limit_param must be one of {TOKEN_LIMIT_PARAMS}")
        if problems:
            raise ValueError("judge settings: " + "; ".join(problems))


def _as_grade(value: object) -> object:
    # JSON has one number type, so 7.0 is the integer 7; a string holding only digits ("7") is
    # accepted too, because judges without structured output (json_object or text mode) often
    # quote numbers and the meaning is unambiguous. Rejecting those would fail every item of
    # such a judge the same way, a systematic loss rather than noise. "7.0", "7/10", 7.5 or
    # true are not integer grades: the judge is not answering on the scale we asked for.
    if isinstance(value, bool):
        raise ValueError(f"a boolean is not a grade (got {value!r})")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value):
        return int(value)
    raise ValueError(f"not an integer grade (got {value!r})")


Grade = Annotated[int, BeforeValidator(_as_grade), Field(ge=0, le=9)]


class Grades(BaseModel):
    """One judgement: integers 0..9.

    Extra keys are ignored rather than forbidden: a judge without structured output may add
    an "explanation" or an age group, and the three grades are still unambiguous. Missing or
    out-of-range grades make the reply invalid.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    grammar: Grade
    creativity: Grade
    consistency: Grade


@dataclass
class GradeResult:
    """The outcome for one item: grades, or the reason there are none."""

    prompt_index: int
    completion_index: int
    grades: Grades | None
    failure: str | None  # why there are no grades; None when graded
    cached: bool  # grades from the cache (or from an identical item of the same call)
    attempts: int  # requests sent for this item in this call (0 when cached)


class JudgeStopped(UserError):
    """The judge refused the request in a way retrying cannot fix (401, 403, 404, other 4xx)."""


class InvalidReply(ValueError):
    """A judge reply that does not hold valid grades; the message says why."""


class _Cancelled(Exception):
    """A worker gave up because the stage is stopping."""


def cache_key(
    settings: JudgeSettings, messages: Sequence[Mapping[str, str]], response_mode: str
) -> str:
    """The cache key of one judge request.

    It covers what determines the grade: the model, the instruction version, the messages,
    temperature, max_tokens and the response mode (the constrained and free formats are
    different requests). It leaves out the base URL (the same model served elsewhere grades
    the same way) and the API key.

    Args:
        settings: the judge settings.
        messages: the chat messages (`build_messages`).
        response_mode: "json_schema", "json_object" or "text".

    Returns:
        Hex sha256.
    """
    return sha256_json(
        {
            "model": settings.model,
            "instruction_version": INSTRUCTION_VERSION,
            "messages": [dict(m) for m in messages],
            # Normalised: 0 and 0.0 must not give two keys.
            "temperature": None if settings.temperature is None else float(settings.temperature),
            "max_tokens": int(settings.max_tokens),
            "response_mode": response_mode,
        }
    )


def cache_path(cache_dir: Path, key: str) -> Path:
    """Where the cache entry of `key` lives: `cache_dir/<key[:2]>/<key>.json`."""
    return cache_dir / key[:2] / f"{key}.json"


def _grade_objects(value: Any) -> Iterator[dict[str, Any]]:
    # Objects holding at least one criterion, also when nested ({"grades": {...}}).
    if isinstance(value, dict):
        if any(name in value for name in CRITERIA):
            yield value
            return
        for inner in value.values():
            yield from _grade_objects(inner)
    elif isinstance(value, list):
        for inner in value:
            yield from _grade_objects(inner)


def _json_values(text: str) -> list[Any]:
    try:
        return [json.loads(text)]
    except json.JSONDecodeError:
        pass
    # Prose or code fences around the JSON: decode an object at every "{" not inside one
    # already decoded.
    decoder = json.JSONDecoder()
    values = []
    start = text.find("{")
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        values.append(value)
        start = text.find("{", end)
    return values


def parse_grades(text: str | None) -> Grades:
    """The grades in a judge reply.

    The reply may be bare JSON, or JSON inside prose or ```json code fences```; a reasoning
    model's <think> block is skipped. Extra keys are ignored.

    Args:
        text: the reply's message content.

    Returns:
        The grades.

    Raises:
        InvalidReply: no JSON object with the grades, several different ones, or a grade that
            is missing, not an integer or outside 0..9.
    """
    if text is None or not text.strip():
        raise InvalidReply("empty reply")
    candidates = [
        obj for value in _json_values(_THINK.sub("", text).strip()) for obj in _grade_objects(value)
    ]
    distinct = {json.dumps(obj, sort_keys=True): obj for obj in candidates}
    if not distinct:
        raise InvalidReply("no JSON object with grammar/creativity/consistency in the reply")
    if len(distinct) > 1:
        raise InvalidReply(f"the reply holds {len(distinct)} different grade objects")
    try:
        return Grades.model_validate(next(iter(distinct.values())))
    except ValidationError as exc:
        raise InvalidReply(_describe_validation(exc)) from None


def _describe_validation(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "reply"
        if error["type"] == "missing":
            parts.append(f"{where}: missing")
        else:
            message = error["msg"].removeprefix("Value error, ")
            if "(got" not in message:
                message += f" (got {error.get('input')!r})"
            parts.append(f"{where}: {message}")
    return "; ".join(parts)


def _redact(text: str, secret: str) -> str:
    if len(secret) < _MIN_SECRET:
        return text
    # Also the JSON-escaped form, for text that went through json.dumps.
    for form in {secret, json.dumps(secret)[1:-1]}:
        text = text.replace(form, _REDACTED)
    return text


def _endpoint(base_url: str | None) -> str:
    if base_url is None:
        return "the OpenAI API (or OPENAI_BASE_URL)"
    parts = urlsplit(base_url)
    # A URL can carry credentials (user:password@host); they are not ours to print.
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _error_text(exc: openai.APIError) -> str:
    # The server's message (not the request: its headers hold the key), short.
    body = exc.body
    if isinstance(body, Mapping):
        message = body.get("message", body)
    else:
        message = body if body is not None else exc.message
    text = message if isinstance(message, str) else json.dumps(message, default=str)
    return text[:500]


def _rejects_format(exc: openai.APIStatusError, mode: str) -> bool:
    if mode == "text":
        return False
    # 400/422: the usual answer to an unsupported parameter. 500: llama.cpp's servers answer
    # an unknown response_format type with an internal error; only a 500 that names the format
    # counts, any other 500 is an ordinary transient failure.
    if exc.status_code not in (400, 422, 500):
        return False
    text = f"{exc.message} {json.dumps(exc.body, default=str)}".lower()
    return any(word in text for word in _FORMAT_WORDS)


def _retry_after_s(headers: Mapping[str, str], now: datetime) -> float | None:
    # retry-after-ms is OpenAI's finer-grained variant; Retry-After is seconds or an HTTP date.
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000
            if math.isfinite(value):
                return max(0.0, value)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        value = float(raw)
        return max(0.0, value) if math.isfinite(value) else None
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


def _stop_message(exc: openai.APIStatusError, settings: JudgeSettings) -> str:
    status = exc.status_code
    where = _endpoint(settings.base_url)
    said = _error_text(exc)
    if status == 401:
        what = (
            f"the judge at {where} rejected the API key (HTTP 401): check the environment "
            "variable eval.judge.api_key_env names (or the Prefect Secret "
            "eval.judge.api_key_secret)"
        )
    elif status == 403:
        what = (
            f"the judge at {where} refused access (HTTP 403): the API key has no permission "
            f"for model {settings.model!r} (or this organisation/project); check the key and "
            "eval.judge.model"
        )
    elif status == 404:
        what = (
            f"the judge at {where} answered HTTP 404: check eval.judge.base_url (most servers "
            f"want it to end in /v1) and eval.judge.model ({settings.model!r})"
        )
    else:
        what = (
            f"the judge at {where} rejected the request (HTTP {status}): check "
            f"eval.judge.model ({settings.model!r}) and eval.judge.temperature, and that the "
            f"server accepts {settings.token_limit_param}={settings.max_tokens} (OpenAI's "
            "reasoning models want eval.judge.token_limit_param: max_completion_tokens and "
            "eval.judge.temperature: null)"
        )
    return _redact(f"{what}. The server said: {said}", settings.api_key)


class _Journal:
    """The JSON-lines log of every attempt, shared by the workers."""

    def __init__(self, path: Path, secret: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._secret = secret
        self._lock = threading.Lock()
        self._fh: IO[str] = open(path, "a", encoding="utf-8")  # closed by close()

    def write(self, **record: Any) -> None:
        record["time"] = now_iso()
        line = _redact(json.dumps(record, sort_keys=True, default=str), self._secret)
        with self._lock:
            self._fh.write(line + "\n")
            self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class _Mode:
    """The response mode in use, shared by the workers: it only ever moves down `MODES`."""

    def __init__(self, log: Callable[[str], None]):
        self._index = 0
        self._lock = threading.Lock()
        self._log = log

    @property
    def current(self) -> str:
        with self._lock:
            return MODES[self._index]

    def fall_back(self, rejected: str, reason: str) -> None:
        with self._lock:
            # Several workers may see the same rejection; only the first moves the mode (and
            # logs), the others find it already past the rejected one.
            if MODES[self._index] != rejected or self._index == len(MODES) - 1:
                return
            self._index += 1
            new = MODES[self._index]
        self._log(
            f"judge: the server does not accept response_format {rejected} ({reason}); "
            f"using {new} for the rest of this stage"
        )


@dataclass
class _Call:
    """What the workers of one `grade_completions` call share."""

    client: openai.OpenAI
    settings: JudgeSettings
    cache_dir: Path
    journal: _Journal
    mode: _Mode
    stop: threading.Event
    sleep: Callable[[float], None]
    rng: random.Random


def _read_cache(call: _Call, messages: list[dict[str, str]]) -> tuple[Grades, str, str] | None:
    # A grade obtained in any mode answers the same question, so all modes are looked up.
    for mode in MODES:
        key = cache_key(call.settings, messages, mode)
        path = cache_path(call.cache_dir, key)
        if not path.is_file():
            continue
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
            return Grades.model_validate(entry["grades"]), mode, key
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # A damaged entry is asked again (and overwritten), not trusted.
            call.journal.write(event="cache_invalid", key=key, error=f"{type(exc).__name__}")
    return None


def _request(call: _Call, messages: list[dict[str, str]], mode: str) -> Any:
    settings = call.settings
    kwargs: dict[str, Any] = {}
    fmt = response_format(mode)
    if fmt is not None:
        kwargs["response_format"] = fmt
    if settings.temperature is not None:
        kwargs["temperature"] = settings.temperature
    kwargs[settings.token_limit_param] = settings.max_tokens
    return call.client.chat.completions.create(
        model=settings.model,
        messages=messages,  # type: ignore[arg-type]
        **kwargs,
    )


def _backoff_s(call: _Call, failures: int, retry_after: float | None) -> float:
    settings = call.settings
    if retry_after is not None:
        return min(retry_after, settings.backoff_max_s)
    # Full jitter: spreads the retries of many workers hitting the same overloaded server.
    ceiling = min(settings.backoff_max_s, settings.backoff_base_s * 2 ** (failures - 1))
    return call.rng.uniform(0.0, ceiling)


def _invalid_reason(exc: InvalidReply, choice: Any, settings: JudgeSettings) -> str:
    reason = str(exc)
    if choice is not None and choice.finish_reason == "length":
        reason += f" (cut at {settings.token_limit_param}={settings.max_tokens})"
    refusal = getattr(choice.message, "refusal", None) if choice is not None else None
    if refusal:
        reason += f" (refusal: {refusal[:200]})"
    return reason


def _store(
    call: _Call, messages: list[dict[str, str]], mode: str, text: str, grades: Grades
) -> str:
    # Written before the result is returned: a run killed afterwards still has it.
    key = cache_key(call.settings, messages, mode)
    atomic_write_json(
        cache_path(call.cache_dir, key),
        {
            "key": key,
            "model": call.settings.model,
            "instruction_version": INSTRUCTION_VERSION,
            "mode": mode,
            "reply": _redact(text, call.settings.api_key),
            "grades": grades.model_dump(),
            "created": now_iso(),
        },
    )
    return key


def _grade_one(call: _Call, item: tuple[int, int, str, str]) -> GradeResult:
    prompt_index, completion_index, prompt, completion = item
    settings = call.settings
    ids = {"prompt_index": prompt_index, "completion_index": completion_index}
    messages = build_messages(prompt, completion)
    hit = _read_cache(call, messages)
    if hit is not None:
        grades, mode, key = hit
        call.journal.write(event="cached", mode=mode, key=key, **ids)
        return GradeResult(prompt_index, completion_index, grades, None, True, 0)

    attempts = transport_failures = invalid_replies = 0
    while True:
        if call.stop.is_set():
            raise _Cancelled
        mode = call.mode.current
        attempts += 1
        record = {"attempt": attempts, "mode": mode, **ids}
        try:
            reply = _request(call, messages, mode)
        except openai.APIStatusError as exc:
            status, said = exc.status_code, _error_text(exc)
            if _rejects_format(exc, mode):
                call.journal.write(event="format_rejected", status=status, error=said, **record)
                call.mode.fall_back(mode, f"HTTP {status}")
                continue
            if status not in _RETRY_STATUSES and status < 500:
                call.journal.write(event="stopped", status=status, error=said, **record)
                # Set here, not only by the main thread: this worker's next queued item must
                # see it before sending anything.
                call.stop.set()
                raise JudgeStopped(_stop_message(exc, settings)) from None
            error = f"HTTP {status}: {said}"
            retry_after = _retry_after_s(exc.response.headers, datetime.now(UTC))
        except openai.APIConnectionError as exc:  # APITimeoutError is a subclass
            status, retry_after = None, None
            if isinstance(exc, openai.APITimeoutError):
                error = f"timed out after {settings.timeout_s:g} s"
            else:
                cause = exc.__cause__
                error = f"connection error ({type(cause).__name__ if cause else exc.message})"
        except openai.APIResponseValidationError as exc:
            invalid_replies += 1
            error = f"malformed response: {_error_text(exc)}"
            failed = _invalid(
                call, item, invalid_replies, error, attempts, record, status=exc.status_code
            )
            if failed is not None:
                return failed
            continue
        else:
            choice = reply.choices[0] if reply.choices else None
            text = choice.message.content if choice is not None else None
            usage = reply.usage.model_dump() if reply.usage is not None else None
            finish = choice.finish_reason if choice is not None else None
            try:
                grades = parse_grades(text)
            except InvalidReply as exc:
                invalid_replies += 1
                error = _invalid_reason(exc, choice, settings)
                failed = _invalid(
                    call,
                    item,
                    invalid_replies,
                    error,
                    attempts,
                    record,
                    reply=text,
                    finish_reason=finish,
                    usage=usage,
                )
                if failed is not None:
                    return failed
                continue
            key = _store(call, messages, mode, text or "", grades)
            call.journal.write(
                event="reply",
                reply=text,
                grades=grades.model_dump(),
                key=key,
                finish_reason=finish,
                usage=usage,
                **record,
            )
            return GradeResult(prompt_index, completion_index, grades, None, False, attempts)

        # A transport failure: connection, timeout, 408/409/429 or 5xx.
        transport_failures += 1
        if transport_failures >= settings.max_attempts:
            call.journal.write(event="error", status=status, error=error, **record)
            return _failed(
                call, item, f"no answer after {transport_failures} attempts: {error}", attempts
            )
        delay = _backoff_s(call, transport_failures, retry_after)
        call.journal.write(
            event="error",
            status=status,
            error=error,
            retry_after_s=retry_after,
            sleep_s=delay,
            **record,
        )
        call.sleep(delay)


def _invalid(
    call: _Call,
    item: tuple[int, int, str, str],
    invalid_replies: int,
    error: str,
    attempts: int,
    record: dict[str, Any],
    **details: Any,
) -> GradeResult | None:
    """Log an invalid reply; the item's failure once `parse_attempts` replies were invalid."""
    call.journal.write(event="invalid", error=error, **details, **record)
    if invalid_replies < call.settings.parse_attempts:
        return None
    return _failed(call, item, f"invalid reply after {invalid_replies} tries: {error}", attempts)


def _failed(
    call: _Call, item: tuple[int, int, str, str], reason: str, attempts: int
) -> GradeResult:
    reason = _redact(reason, call.settings.api_key)
    call.journal.write(
        event="failure",
        prompt_index=item[0],
        completion_index=item[1],
        error=reason,
        attempts=attempts,
    )
    return GradeResult(item[0], item[1], None, reason, False, attempts)


def _run_pool(
    call: _Call, items: Sequence[tuple[int, int, str, str]], indices: list[int]
) -> list[GradeResult | None]:
    # The results of items[i] for i in `indices` (None elsewhere); re-raises the first error of
    # a worker after stopping the others.
    results: list[GradeResult | None] = [None] * len(items)
    stopped: Exception | None = None
    with ThreadPoolExecutor(
        max_workers=call.settings.max_concurrency, thread_name_prefix="judge"
    ) as pool:
        futures: dict[Future[GradeResult], int] = {
            pool.submit(_grade_one, call, items[i]): i for i in indices
        }

        def stop_all() -> None:
            call.stop.set()
            for other in futures:
                other.cancel()

        try:
            for future in as_completed(futures):
                if future.cancelled():
                    continue
                try:
                    results[futures[future]] = future.result()
                except _Cancelled:
                    continue
                except Exception as exc:  # JudgeStopped, or a bug: stop the others
                    if stopped is None:
                        stopped = exc
                        stop_all()
        except BaseException:
            # KeyboardInterrupt while waiting: the pool's exit would otherwise run every queued
            # item first.
            stop_all()
            raise
    # Raised after the pool has closed: the requests in flight have finished.
    if stopped is not None:
        raise stopped
    return results


def grade_completions(
    items: Sequence[tuple[int, int, str, str]],
    settings: JudgeSettings,
    *,
    cache_dir: Path,
    log_path: Path,
    log: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
) -> list[GradeResult]:
    """Grade completions with the judge, concurrently, reusing cached judgements.

    Identical (prompt, completion) pairs are asked once; the later ones reuse the grades.

    Args:
        items: (prompt_index, completion_index, prompt, completion) per completion.
        settings: the judge.
        cache_dir: the judgement cache (one JSON file per successful request).
        log_path: JSON-lines log; every attempt (raw reply or error, status, attempt, mode) is
            appended.
        log: receives the few human-readable messages (fallbacks, the summary).
        sleep: called with each backoff delay in seconds (tests pass a recorder).

    Returns:
        One result per item, in the order of `items`.

    Raises:
        JudgeStopped: a 4xx that retrying cannot fix (bad key, unknown model or URL). The other
            workers are stopped first: nothing is sent after it; requests in flight and
            backoff waits finish (successful replies are cached).
    """
    cache_dir = Path(cache_dir)
    secret = settings.api_key

    def safe_log(message: str) -> None:
        log(_redact(message, secret))

    # Identical pairs are graded once: the first occurrence is asked, the others copy it.
    first: dict[tuple[str, str], int] = {}
    for i, item in enumerate(items):
        first.setdefault((item[2], item[3]), i)

    with (
        contextlib.closing(_Journal(Path(log_path), secret)) as journal,
        openai.OpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key or _NO_KEY,
            # Our retries are the only ones, so every request is counted and logged.
            max_retries=0,
            timeout=settings.timeout_s,
        ) as client,
    ):
        call = _Call(
            client=client,
            settings=settings,
            cache_dir=cache_dir,
            journal=journal,
            mode=_Mode(safe_log),
            stop=threading.Event(),
            sleep=sleep,
            rng=random.Random(),
        )
        results = _run_pool(call, items, sorted(first.values()))

    final: list[GradeResult] = []
    for i, item in enumerate(items):
        result = results[i]
        if result is None:  # a repeat of an earlier pair
            source = results[first[(item[2], item[3])]]
            assert source is not None
            result = GradeResult(
                item[0], item[1], source.grades, source.failure, source.grades is not None, 0
            )
        final.append(result)

    summary = aggregate(final)
    message = (
        f"judge: {summary['graded']}/{summary['items']} graded "
        f"({summary['cached']} from cache, {summary['requests']} requests), "
        f"{summary['failures']} failed"
    )
    if summary["failure_reasons"]:
        message += f"; most common: {next(iter(summary['failure_reasons']))}"
    safe_log(message)
    return final


def aggregate(results: Sequence[GradeResult]) -> dict[str, Any]:
    """Summary statistics of a set of judgements.

    Failures are counted, never scored.

    Args:
        results: the results of `grade_completions`.

    Returns:
        Per criterion (`grammar`, `creativity`, `consistency`): `mean`, `stderr` (sample
        standard deviation / sqrt(n); None below 2 grades), `n` (None mean when n is 0). Also
        `items`, `graded`, `failures`, `failure_reasons` (up to 5 most common reasons with
        their counts), `requests` (sent in this call) and `cached`.
    """
    graded = [r.grades for r in results if r.grades is not None]
    summary: dict[str, Any] = {}
    for name in CRITERIA:
        values = [getattr(g, name) for g in graded]
        n = len(values)
        summary[name] = {
            "mean": sum(values) / n if n else None,
            "stderr": statistics.stdev(values) / math.sqrt(n) if n >= 2 else None,
            "n": n,
        }
    failures = Counter(r.failure for r in results if r.grades is None and r.failure)
    summary.update(
        items=len(results),
        graded=len(graded),
        failures=sum(1 for r in results if r.grades is None),
        failure_reasons=dict(failures.most_common(5)),
        requests=sum(r.attempts for r in results),
        cached=sum(1 for r in results if r.cached),
    )
    return summary
