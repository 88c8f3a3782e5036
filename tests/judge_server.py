"""A local OpenAI-compatible chat-completions server with scripted behaviours, for judge tests.

`JudgeServer` runs a real `http.server.ThreadingHTTPServer` on 127.0.0.1 (a free port) in a
background thread and answers `POST /v1/chat/completions` with whatever its behaviour returns.
It records every request (headers and JSON body) for assertions. A behaviour is a function of
the `Request` (which also says how many times the same user message has been seen, so "fail the
first two times" is per item, whatever the thread timing).

The grades of a normal reply come from a `GRADES=g,c,k` marker in the user message when there is
one (tests choose them and check the aggregation by hand), else from a hash of the message.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

CHAT_PATH = "/v1/chat/completions"
_MARKER = re.compile(r"GRADES=(-?\d+),(-?\d+),(-?\d+)")


@dataclass
class Request:
    """One request as the server received it."""

    number: int  # 1-based, over the server's life
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    seen: int  # how often this user message has arrived, this request included

    @property
    def mode(self) -> str:
        """The response_format type asked for: json_schema, json_object or text."""
        fmt = self.body.get("response_format")
        return fmt["type"] if isinstance(fmt, dict) else "text"

    @property
    def user_text(self) -> str:
        """The content of the last user message."""
        users = [m for m in self.body.get("messages", []) if m.get("role") == "user"]
        return users[-1]["content"] if users else ""


@dataclass
class Reply:
    """What the server answers."""

    status: int = 200
    body: Any = None  # dict/list: sent as JSON; str: sent as is
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0  # wait before answering (cut short when the server stops)


Behaviour = Callable[[Request], Reply]


def grades_for(text: str) -> dict[str, int]:
    """The grades a normal reply gives for a user message (marker, else a hash)."""
    match = _MARKER.search(text)
    if match:
        values = [int(v) for v in match.groups()]
    else:
        digest = hashlib.sha256(text.encode()).digest()
        values = [b % 10 for b in digest[:3]]
    return dict(zip(("grammar", "creativity", "consistency"), values, strict=True))


def chat_completion(content: str | None, finish_reason: str = "stop") -> dict[str, Any]:
    """A chat.completion response body with one choice."""
    return {
        "id": "chatcmpl-test",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "judge-test",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": finish_reason,
            }
        ],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }


def error(status: int, message: str, kind: str = "invalid_request_error") -> Reply:
    """An OpenAI-style error reply."""
    return Reply(status, {"error": {"message": message, "type": kind, "code": None}})


def grades_reply(request: Request, wrap: str = "{}") -> Reply:
    """A 200 reply whose content is the grades JSON, formatted into `wrap` at "{}"."""
    content = wrap.replace("{}", json.dumps(grades_for(request.user_text)))
    return Reply(body=chat_completion(content))


def normal(request: Request) -> Reply:
    """Bare JSON grades, whatever the response_format."""
    return grades_reply(request)


def prose(request: Request) -> Reply:
    """The grades inside a sentence."""
    return grades_reply(request, "Here is my assessment of the story: {} I hope this helps.")


def fenced(request: Request) -> Reply:
    """The grades in a ```json code fence```, with prose around."""
    return grades_reply(request, "Sure.\n```json\n{}\n```\nThe continuation is fine.")


def thinking(request: Request) -> Reply:
    """A reasoning model: a <think> block with a draft, then the answer."""
    return grades_reply(
        request, '<think>Maybe {"grammar": 1, "creativity": 1, "consistency": 1}?</think>\n{}'
    )


def reject_formats(*modes: str, status: int = 400, then: Behaviour = normal) -> Behaviour:
    """Reject the given response_format types the way vLLM/OpenAI-style servers do."""

    def behaviour(request: Request) -> Reply:
        if request.mode in modes:
            return error(
                status, f"response_format type '{request.mode}' is not supported by this server"
            )
        return then(request)

    return behaviour


def llama_cpp(request: Request) -> Reply:
    """llama.cpp's servers: an unknown response_format type is an HTTP 500."""
    if request.mode == "json_schema":
        return Reply(
            500,
            {
                "error": {
                    "code": 500,
                    "message": 'response_format type must be one of "text" or "json_object", '
                    "but got: json_schema",
                    "type": "server_error",
                }
            },
        )
    return normal(request)


def content(text: str | None, finish_reason: str = "stop") -> Behaviour:
    """Always the same reply content."""
    return lambda request: Reply(body=chat_completion(text, finish_reason))


def first_then(times: int, first: Behaviour, then: Behaviour = normal) -> Behaviour:
    """`first` for the first `times` arrivals of each user message, then `then`."""
    return lambda request: first(request) if request.seen <= times else then(request)


def rate_limited(retry_after: str) -> Behaviour:
    """A 429 with the given Retry-After header."""
    return lambda request: Reply(
        429,
        {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit"}},
        {"Retry-After": retry_after},
    )


def server_error(status: int = 500) -> Behaviour:
    """A transient server error."""
    return lambda request: error(status, "The server is overloaded", "server_error")


def hang(seconds: float) -> Behaviour:
    """Answer only after `seconds` (longer than the client's timeout)."""
    return lambda request: Reply(delay_s=seconds, body=chat_completion("{}"))


def unauthorized(request: Request) -> Reply:
    """A careless server that echoes the key it rejects."""
    key = request.headers.get("authorization", "").removeprefix("Bearer ")
    return error(401, f"Incorrect API key provided: {key}", "invalid_api_key")


def http_date(seconds_from_now: float) -> str:
    """An HTTP date (for Retry-After) `seconds_from_now` in the future."""
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds_from_now), usegmt=True)


class JudgeServer:
    """A running fake judge; use as a context manager."""

    def __init__(self, behaviour: Behaviour = normal):
        self.behaviour = behaviour
        self._requests: list[Request] = []
        self._seen: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        # A short poll interval: shutdown() waits up to one interval.
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def base_url(self) -> str:
        """The URL to give the openai client (ends in /v1)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[Request]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        """How many requests arrived."""
        with self._lock:
            return len(self._requests)

    def __enter__(self) -> JudgeServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()  # releases hanging handlers
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def _record(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> Request:
        with self._lock:
            probe = Request(0, path, headers, body, 0)
            seen = self._seen.get(probe.user_text, 0) + 1
            self._seen[probe.user_text] = seen
            request = Request(len(self._requests) + 1, path, headers, body, seen)
            self._requests.append(request)
            return request

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as real servers do

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet test output

            def do_POST(self) -> None:  # http.server calls do_<METHOD>
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"unparsed": raw.decode("utf-8", "replace")}
                headers = {k.lower(): v for k, v in self.headers.items()}
                request = server._record(self.path, headers, body)
                if self.path != CHAT_PATH:
                    reply = error(404, f"no route {self.path}")
                else:
                    reply = server.behaviour(request)
                if reply.delay_s and server._stopping.wait(reply.delay_s):
                    return
                payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                data = payload.encode()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

        return Handler
