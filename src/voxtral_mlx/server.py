"""The server: OpenAI-style transcriptions over HTTP and the realtime protocol over WebSocket.

One model is loaded once. Every MLX computation runs on one worker thread (the `Engine`):
MLX graph evaluation is not meant to be driven from several threads at once. Requests and
WebSocket connections are jobs that queue work for that thread, which serves them round-robin,
one bounded turn each (a few hundred ms of audio, or one flush or finish), so a long upload
cannot stall a live stream. The jobs whose next turns decode audio (new audio, a flush, an end)
take them together (`advance_together`): each decoder step takes a position of every one of
their sessions, at positions and delays of their own, so that each weight read serves all of
them.

Routes (`create_app`):
    POST /v1/audio/transcriptions   multipart `file`, `model`, `response_format`
                                    (json, text, srt, vtt, verbose_json), `timestamp_granularities[]`,
                                    `language`, and this server's `delay_ms`
    GET  /v1/models                 the one model served
    GET  /health                    status and the number of open sessions
    WS   /v1/realtime               vLLM's realtime protocol (see `_Connection`)

Needs the `server` extra (starlette, uvicorn, websockets, python-multipart).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from .audio import AudioError, load_audio
from .streaming import StreamingSession, advance_together
from .transcribe import Transcription, Voxtral, to_srt, to_vtt

log = logging.getLogger("voxtral_mlx.server")

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
# Keys of `session.update` that set the delay: ours, the tekken.json / vLLM name, Mistral's API name.
DELAY_KEYS = ("delay_ms", "transcription_delay_ms", "target_streaming_delay_ms")
# A WebSocket frame this many times the message limit is refused by the protocol layer (close 1009).
FRAME_LIMIT_FACTOR = 4
WS_TRY_AGAIN_LATER = 1013
WS_POLICY_VIOLATION = 1008


@dataclass
class ServerLimits:
    """Resource limits of one server.

    Attributes:
        max_sessions: WebSocket connections plus transcription requests served at once (4).
        max_upload_mb: largest uploaded file, in MB (100).
        max_audio_s: longest audio of one upload or one stream (between final commits), in
            seconds (4 hours).
        max_message_kb: largest WebSocket message, in KB (1024: about 24 s of base64 PCM16).
            Frames over 4 times this are refused by the protocol layer, which closes the
            connection (code 1009).
        max_rate: a stream may append audio this many times faster than real time (10) ...
        rate_burst_s: ... plus this many seconds ahead (30).
        max_backlog_s: audio received but not yet transcribed, per stream, in seconds (60).
        turn_ms: audio per scheduling turn while other sessions wait (320).
        solo_turn_ms: audio per turn when no other session waits (2560).
    """

    max_sessions: int = 4
    max_upload_mb: float = 100.0
    max_audio_s: float = 4 * 3600.0
    max_message_kb: float = 1024.0
    max_rate: float = 10.0
    rate_burst_s: float = 30.0
    max_backlog_s: float = 60.0
    turn_ms: float = 320.0
    solo_turn_ms: float = 2560.0

    def __post_init__(self):
        for name in ("max_sessions", "max_upload_mb", "max_audio_s", "max_message_kb", "max_rate",
                     "turn_ms", "solo_turn_ms"):
            value = getattr(self, name)
            if isinstance(value, bool) or not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        for name in ("rate_burst_s", "max_backlog_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be 0 or more, not {getattr(self, name)!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def max_message_bytes(self) -> int:
        return int(self.max_message_kb * 1024)


class ServerBusy(RuntimeError):
    """All session slots are taken."""


# The engine: one worker thread, jobs served round-robin.


class Job:
    """One transcription request or WebSocket connection, as the worker thread sees it.

    The event loop appends operations (`Engine.submit`); the worker runs them in order and
    reports through `emit`, called on the worker thread with realtime-protocol events.
    """

    def __init__(self, emit: Callable[[dict], None], keep_result: bool = False):
        self.id = uuid.uuid4().hex
        self.emit = emit
        self.keep_result = keep_result
        self.result: Transcription | None = None
        self.ops: collections.deque = collections.deque()
        self.backlog = 0  # samples queued, not yet fed
        self.scheduled = False  # in the ready queue or being run
        self.cancelled = False
        self.ended = False  # its last event is sent
        self._emitting = threading.Lock()
        self.session: StreamingSession | None = None
        self.delay_ms: int | None = None
        self._utterance = ""
        self._tokens_done = 0
        self._audio_done = 0.0
        self._first_utterance = True

    def _send(self, event: dict, last: bool = False):
        """Emit `event`, unless the job is closed or has had its `last` event (the shutdown's
        error: the turn being computed then adds nothing after it)."""
        with self._emitting:
            if not (self.cancelled or self.ended):
                self.ended = last
                self.emit(event)


class Engine:
    """Runs every model computation on one thread, fairly across jobs.

    Args:
        model: the loaded model.
        limits: session count and turn sizes (default `ServerLimits()`).
    """

    def __init__(self, model: Voxtral, limits: ServerLimits | None = None):
        self.model = model
        self.limits = limits or ServerLimits()
        sr = model.sample_rate
        self._turn = max(1, round(self.limits.turn_ms * sr / 1000))
        self._solo_turn = max(self._turn, round(self.limits.solo_turn_ms * sr / 1000))
        self._cond = threading.Condition()
        self._ready: collections.deque[Job] = collections.deque()
        self._jobs: set[Job] = set()
        self._stopping = False
        self._ending = False  # `end_all`: no more work is taken
        self._thread: threading.Thread | None = None

    @property
    def sessions(self) -> int:
        """Open jobs, closing ones included until the worker has freed them."""
        with self._cond:
            return len(self._jobs)

    def start(self):
        if self._thread is None:
            self._stopping = self._ending = False
            self._thread = threading.Thread(target=self._run, name="voxtral-mlx-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0):
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None
                with self._cond:  # closed jobs the worker did not come to
                    self._jobs = {job for job in self._jobs if not job.cancelled}

    def end_all(self, message: str = "the server is shutting down") -> int:
        """Drop every job's queued work and tell each (an `error`, code `server_shutting_down`),
        so that no request waits for audio that will not be decoded; returns how many were open.
        The turn being computed finishes; jobs still close through `close`."""
        with self._cond:
            self._ending = True
            ended = [job for job in self._jobs if not job.cancelled]
            for job in ended:
                job.ops = collections.deque(o for o in job.ops if o[0] == "close")
                job.backlog = 0
        for job in ended:
            job._send({"type": "error", "error": message, "code": "server_shutting_down"}, last=True)
        return len(ended)

    def open(self, emit: Callable[[dict], None], keep_result: bool = False) -> Job:
        """A new job, or `ServerBusy` when `max_sessions` are open."""
        with self._cond:
            if self._ending:
                raise ServerBusy("the server is shutting down")
            if len(self._jobs) >= self.limits.max_sessions:
                raise ServerBusy(f"the server is busy: all {self.limits.max_sessions} sessions are in use; "
                                 "try again later")
            job = Job(emit, keep_result)
            self._jobs.add(job)
            return job

    def submit(self, job: Job, *ops: tuple):
        """Queue operations: ("start", delay_ms), ("audio", samples), ("flush",), ("finish",)."""
        with self._cond:
            if job.cancelled or self._ending:
                return
            for op in ops:
                job.ops.append(op)
                if op[0] == "audio":
                    job.backlog += op[1].size
            self._schedule(job)

    def backlog_samples(self, job: Job) -> int:
        with self._cond:
            return job.backlog

    def close(self, job: Job):
        """Drop a job's queued work and free its session (on the worker thread); idempotent."""
        with self._cond:
            if job.cancelled:
                return
            job.cancelled = True
            job.ops.clear()
            job.backlog = 0
            job.ops.append(("close",))
            self._schedule(job)

    def _schedule(self, job: Job):
        if not job.scheduled:
            job.scheduled = True
            self._ready.append(job)
            self._cond.notify()

    def _run(self):
        while True:
            with self._cond:
                while not self._ready and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._ready.popleft()
                if not job.ops:  # emptied by `end_all` while it waited
                    job.scheduled = False
                    continue
                turns = [(job, self._take_turn(job, self._turn if self._ready else self._solo_turn))]
                if turns[0][1][0] in DECODED and job.session is not None:
                    # The other streams whose next turn decodes audio decode with this one, as one batch.
                    for other in [j for j in self._ready if j.ops and j.ops[0][0] in DECODED and j.session is not None]:
                        self._ready.remove(other)
                        turns.append((other, self._take_turn(other, self._turn)))
            try:
                if len(turns) == 1:
                    self._execute(*turns[0])
                else:
                    self._decode_together(turns)
            except Exception as e:  # the worker outlives any one job's failure (a batch's is each of its jobs')
                log.exception("transcription failed")
                for job, _ in turns:
                    job.session = None
                    with self._cond:
                        job.ops = collections.deque(o for o in job.ops if o[0] == "close")
                        job.backlog = 0
                    job._send({"type": "error", "error": f"transcription failed: {type(e).__name__}: {e}",
                               "code": "processing_error"})
            with self._cond:
                for job, _ in turns:
                    if job.ops:
                        self._ready.append(job)
                    else:
                        job.scheduled = False

    def _take_turn(self, job: Job, limit: int) -> tuple:
        """The next operation; consecutive audio is merged up to `limit` samples."""
        op = job.ops.popleft()
        if op[0] != "audio":
            return op
        pieces, n = [op[1]], op[1].size
        while job.ops and job.ops[0][0] == "audio" and n < limit:
            pieces.append(job.ops.popleft()[1])
            n += pieces[-1].size
        if n > limit:
            rest = pieces[-1][pieces[-1].size - (n - limit):]
            pieces[-1] = pieces[-1][: pieces[-1].size - rest.size]
            job.ops.appendleft(("audio", rest))
            n = limit
        job.backlog -= n
        return ("audio", pieces[0] if len(pieces) == 1 else np.concatenate(pieces))

    def _execute(self, job: Job, op: tuple):
        kind = op[0]
        if kind == "close":
            job.session = None
            with self._cond:
                self._jobs.discard(job)
            return
        if kind == "start":
            job.delay_ms = op[1]
            self._new_session(job)
            return
        if kind == "audio":
            if job.session is None:  # a failure dropped the stream: start again on the next audio
                self._new_session(job)
            self._delta(job, job.session.feed(op[1]))
            return
        session = job.session
        if kind == "flush":
            if session is not None and session.audio_seconds > job._audio_done:
                self._delta(job, session.flush())
                job._send(self._done(job))
        elif kind == "finish":
            if session is None:
                job._send({"type": "transcription.done", "text": "", "usage": _usage(0, 0)})
                return
            self._delta(job, session.finish())
            self._finished(job)

    def _decode_together(self, turns: list[tuple[Job, tuple]]):
        """Turns of several streams (audio, flush, finish), their decoder steps as one batch
        (`advance_together`), each with the events its own turn gives."""
        # A flush with nothing new since the last utterance ended does nothing, and says nothing.
        turns = [(job, op) for job, op in turns if op[0] != "flush" or job.session.audio_seconds > job._audio_done]
        texts = advance_together([job.session for job, _ in turns],
                                 [("feed", op[1]) if op[0] == "audio" else op for _, op in turns])
        for (job, op), text in zip(turns, texts):
            self._delta(job, text)
            if op[0] == "flush":
                job._send(self._done(job))
            elif op[0] == "finish":
                self._finished(job)

    def _finished(self, job: Job):
        """The events of a finished stream, whose session is freed before the client hears of it."""
        if job.keep_result:
            job.result = Transcription.from_session(job.session)
        done = self._done(job)
        job.session = None
        job._send(done)

    def _new_session(self, job: Job):
        # Audio that comes faster than it is decoded (an upload, a stream catching up) is decoded
        # speculatively where that gives the same tokens at about a step's cost (`default_speculate`).
        job.session = self.model.stream(delay_ms=job.delay_ms, speculate=self.model.default_speculate)
        job._utterance, job._tokens_done, job._audio_done, job._first_utterance = "", 0, 0.0, True

    def _delta(self, job: Job, text: str):
        if text:
            job._utterance += text
            job._send({"type": "transcription.delta", "delta": text})

    def _done(self, job: Job) -> dict:
        """The `transcription.done` event of the utterance that just ended."""
        session = job.session
        prompt = len(session.prompt) if job._first_utterance else 0
        completion = len(session.tokens) - job._tokens_done
        text, job._utterance = job._utterance, ""
        job._tokens_done, job._audio_done, job._first_utterance = len(session.tokens), session.audio_seconds, False
        return {"type": "transcription.done", "text": text, "usage": _usage(prompt, completion)}


# Operations whose turns decode audio: several streams' are decoded together.
DECODED = ("audio", "flush", "finish")


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _bridge(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> Callable[[dict], None]:
    """An `emit` for the worker thread that hands events to a queue of the event loop."""

    def emit(event: dict):
        with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
            loop.call_soon_threadsafe(queue.put_nowait, event)

    return emit


# HTTP: errors, auth and body limits.


def _error(status: int, message: str, code: str | None = None, param: str | None = None,
           kind: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """An error in OpenAI's shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


def _bearer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
    return None


LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


def _hostname(value: str) -> str:
    """The host of a Host header value or an origin: 'http://[::1]:8000' -> '::1'."""
    host = value.split("://", 1)[-1].split("/", 1)[0]
    if host.startswith("["):
        return host[1:].split("]", 1)[0].lower()
    return host.rsplit(":", 1)[0].lower() if host.count(":") == 1 else host.lower()


class _Guard:
    """ASGI middleware: where requests may come from, the bearer token, and the request body limit.

    Browsers send any page's requests to localhost, and a rebound DNS name can point at it:
    requests whose Host is not an allowed name (when `allowed_hosts` is set) and browser
    requests whose Origin is neither this machine nor in `allow_origins` are refused. Pages of
    the origins let in may read the responses (CORS: `Access-Control-Allow-Origin` on every
    response to them, and preflight `OPTIONS` requests answered before the key is asked for,
    as browsers send no credentials with them).
    """

    def __init__(self, app, api_key: str | None, max_upload: int, allowed_hosts: frozenset | None = LOOPBACK_NAMES,
                 allow_origins: tuple[str, ...] = ()):
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.allow_origins = {o.rstrip("/").lower() for o in allow_origins}
        # Digests of equal length: the comparison time says nothing about the key, not even its length.
        self.key_digest = None if api_key is None else hashlib.sha256(api_key.encode()).digest()
        self.max_upload = max_upload
        # The body may exceed the file by its multipart framing and other fields; the file is checked exactly.
        self.max_body = max_upload + 64 * 1024

    def authorized(self, scope) -> bool:
        if self.key_digest is None:
            return True
        token = _bearer(scope.get("headers", []))
        given = hashlib.sha256(token if token is not None else b"").digest()
        return hmac.compare_digest(given, self.key_digest) and token is not None

    def refusal(self, scope) -> str | None:
        headers = {k.lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = headers.get(b"host")
        if self.allowed_hosts is not None and host is not None and _hostname(host) not in self.allowed_hosts:
            return f"host {host!r} is not allowed: this server answers requests to {', '.join(sorted(self.allowed_hosts))}"
        origin = headers.get(b"origin")
        if origin is not None and "*" not in self.allow_origins and origin.rstrip("/").lower() not in \
                self.allow_origins and _hostname(origin) not in LOOPBACK_NAMES:
            return f"origin {origin!r} is not allowed: start the server with --allow-origin {origin} to let its pages in"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        refused = self.refusal(scope)
        if refused is not None:
            denied = _error(403, refused, code="forbidden")
            if scope["type"] == "http":
                return await denied(scope, receive, send)
            ws = WebSocket(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                return await ws.send_denial_response(denied)
            return await ws.close(WS_POLICY_VIOLATION, refused[:120])
        origin = dict(scope.get("headers", [])).get(b"origin")
        if scope["type"] == "http" and origin is not None:
            send = self._cors(send, origin)
            requested = dict(scope["headers"]).get(b"access-control-request-method")
            if scope["method"] == "OPTIONS" and requested is not None:
                asked = dict(scope["headers"]).get(b"access-control-request-headers", b"").decode("latin-1")
                return await Response(status_code=204, headers={
                    "Access-Control-Allow-Methods": "GET, POST",
                    "Access-Control-Allow-Headers": asked or "Authorization, Content-Type",
                    "Access-Control-Max-Age": "600"})(scope, receive, send)
        if not self.authorized(scope):
            denied = _error(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
            if scope["type"] == "http":
                return await denied(scope, receive, send)
            ws = WebSocket(scope, receive, send)
            if "websocket.http.response" in scope.get("extensions", {}):
                return await ws.send_denial_response(denied)
            return await ws.close(WS_POLICY_VIOLATION, "missing or wrong API key")
        if scope["type"] == "http":
            length = dict(scope.get("headers", [])).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                return await _too_large(self.max_upload)(scope, receive, send)
            receive = self._counting(receive)
        await self.app(scope, receive, send)

    @staticmethod
    def _cors(send, origin: bytes):
        """`send` with the headers that let the page of `origin` (already let in) read the response."""

        async def with_cors(message):
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []),
                                                 (b"access-control-allow-origin", origin), (b"vary", b"Origin")])
            await send(message)

        return with_cors

    def _counting(self, receive):
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge
            return message

        return counted


def _too_large(limit: int) -> JSONResponse:
    return _error(413, f"the request is larger than this server's limit of {limit / 1e6:g} MB",
                  code="request_too_large")


# HTTP routes.


def _form_value(form, name: str, default: str | None = None) -> str | None:
    value = form.get(name, default)
    if isinstance(value, UploadFile):
        raise ValueError(f"{name} must be a form field, not a file")
    return value


def _decode_upload(file, filename: str, sample_rate: int, max_seconds: float) -> np.ndarray:
    suffix = os.path.splitext(filename)[1]
    suffix = suffix if suffix[1:].isalnum() and len(suffix) <= 8 else ""
    with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
        file.seek(0)
        shutil.copyfileobj(file, tmp)
        tmp.flush()
        _check_duration(tmp.name, filename, max_seconds)
        try:
            samples = load_audio(tmp.name, sample_rate)
        except AudioError as e:
            raise AudioError(str(e).replace(tmp.name, filename)) from None
    if samples.size > max_seconds * sample_rate:
        raise _AudioTooLong(filename, samples.size / sample_rate, max_seconds)
    return samples


class _AudioTooLong(Exception):
    def __init__(self, name: str, seconds: float, limit: float):
        super().__init__(f"{name}: {seconds:.0f} s of audio is longer than this server's limit of {limit:.0f} s")


def _check_duration(path: str, name: str, max_seconds: float):
    """Refuse long audio before decoding it, where libsndfile can tell its length from the header."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:
        return
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise _AudioTooLong(name, info.frames / info.samplerate, max_seconds)


def verbose_json(result: Transcription, n_special: int, granularities: list[str],
                 language: str | None) -> dict[str, Any]:
    """OpenAI's `verbose_json` body. Segments carry whisper's fields: `avg_logprob` is the mean
    log probability of their text tokens, `compression_ratio` that of zlib on their text;
    `no_speech_prob` is not something this model estimates (0). Words have no leading space."""
    body: dict[str, Any] = {"task": "transcribe", "language": language or "unknown",
                            "duration": result.duration, "text": result.text.strip()}
    if "word" in granularities:
        body["words"] = [{"word": w.text.strip(), "start": w.start, "end": w.end} for w in result.words]
    if "segment" in granularities or not granularities:
        segments = []
        for i, s in enumerate(result.segments):
            records = [result.token_records[k] for k in s.span if result.token_records[k].id >= n_special]
            logprobs = [math.log(max(r.probability, 1e-30)) for r in records]
            raw = s.text.encode("utf-8")
            segments.append({
                "id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                "tokens": [r.id for r in records], "temperature": 0.0,
                "avg_logprob": sum(logprobs) / len(logprobs) if logprobs else 0.0,
                "compression_ratio": len(raw) / len(zlib.compress(raw)) if raw else 0.0,
                "no_speech_prob": 0.0,
            })
        body["segments"] = segments
    body["usage"] = {"type": "duration", "seconds": result.duration}
    return body


class _Server:
    """The routes, around one engine."""

    def __init__(self, model: Voxtral, model_id: str, limits: ServerLimits, delay_ms: int | None):
        self.model = model
        self.model_id = model_id
        self.limits = limits
        self.delay_ms = round(model.audio.delay_tokens(delay_ms) * model.audio.token_ms)
        self.engine = Engine(model, limits)
        self.created = int(time.time())

    def check_delay(self, value, name: str = "delay_ms") -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number of milliseconds, not {value!r}")
        self.model.audio.delay_tokens(value)
        return value

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "sessions": self.engine.sessions,
                             "max_sessions": self.limits.max_sessions})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "mistralai"}]})

    async def transcriptions(self, request: Request) -> Response:
        try:
            form = await request.form(max_files=1, max_fields=64, max_part_size=64 * 1024)
        except _BodyTooLarge:
            return _too_large(self.limits.max_upload_bytes)
        except ClientDisconnect:
            return Response(status_code=499)
        except HTTPException as e:
            return _error(400, f"expected a multipart/form-data body with an audio file ({e.detail})")
        except (MultiPartException, KeyError, ValueError) as e:
            return _error(400, f"expected a multipart/form-data body with an audio file ({e})")
        try:
            return await self._transcribe_form(request, form)
        finally:
            await form.close()

    async def _transcribe_form(self, request: Request, form) -> Response:
        try:
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                return _error(400, "an audio file is required: send it as the multipart field 'file'",
                              param="file")
            if upload.size is not None and upload.size > self.limits.max_upload_bytes:
                return _too_large(self.limits.max_upload_bytes)
            fmt = _form_value(form, "response_format", "json")
            if fmt not in RESPONSE_FORMATS:
                return _error(400, f"response_format must be one of {', '.join(RESPONSE_FORMATS)}, not {fmt!r}",
                              param="response_format")
            granularities = [g for key in ("timestamp_granularities[]", "timestamp_granularities")
                             for g in form.getlist(key)]
            for g in granularities:
                if g not in GRANULARITIES:
                    return _error(400, f"timestamp_granularities must be word or segment, not {g!r}",
                                  param="timestamp_granularities")
            if _form_value(form, "stream", "false").lower() not in ("false", "0", ""):
                return _error(400, "streaming responses are not supported here; use the WebSocket /v1/realtime",
                              param="stream")
            delay = _form_value(form, "delay_ms")
            try:
                delay_ms = self.delay_ms if delay is None else self.check_delay(
                    int(delay) if delay.strip().lstrip("-").isdigit() else delay)
            except ValueError as e:
                return _error(400, f"delay_ms: {e}", param="delay_ms")
            language = _form_value(form, "language")
        except ValueError as e:
            return _error(400, str(e))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        try:
            job = self.engine.open(_bridge(loop, queue), keep_result=True)
        except ServerBusy as e:
            return _error(429, str(e), code="too_many_sessions", kind="rate_limit_error")
        try:
            name = upload.filename or "file"
            try:
                samples = await asyncio.to_thread(_decode_upload, upload.file, name, self.model.sample_rate,
                                                  self.limits.max_audio_s)
            except AudioError as e:
                return _error(400, str(e), code="invalid_audio", param="file")
            except _AudioTooLong as e:
                return _error(413, str(e), code="audio_too_long", param="file")
            self.engine.submit(job, ("start", delay_ms), ("audio", samples), ("finish",))
            event = await _wait_unless_disconnected(request, self._final_event(queue))
            if event is None:
                return Response(status_code=499)
            if event["type"] == "error":
                status = 503 if event["code"] == "server_shutting_down" else 500
                return _error(status, event["error"], code=event["code"], kind="server_error")
            return self._render(job.result, fmt, granularities, language)
        finally:
            self.engine.close(job)

    @staticmethod
    async def _final_event(queue: asyncio.Queue) -> dict:
        while True:
            event = await queue.get()
            if event["type"] in ("transcription.done", "error"):
                return event

    def _render(self, result: Transcription, fmt: str, granularities: list[str], language: str | None) -> Response:
        if fmt == "json":
            return JSONResponse({"text": result.text.strip(),
                                 "usage": {"type": "duration", "seconds": result.duration}})
        if fmt == "verbose_json":
            return JSONResponse(verbose_json(result, self.model.tokenizer.n_special, granularities, language))
        if fmt == "text":
            return PlainTextResponse(result.text.strip() + "\n")
        if fmt == "srt":
            return PlainTextResponse(to_srt(result))
        return PlainTextResponse(to_vtt(result), media_type="text/vtt")

    async def realtime(self, ws: WebSocket):
        await _Connection(self, ws).run()


async def _wait_unless_disconnected(request: Request, awaitable) -> Any:
    """The awaitable's result, or None (and the awaitable cancelled) if the client goes away first."""
    task = asyncio.ensure_future(awaitable)

    async def watch():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    return None


# WebSocket: the realtime protocol.


class _ProtocolError(Exception):
    def __init__(self, message: str, code: str = "invalid_request"):
        super().__init__(message)
        self.code = code


class _Connection:
    """One `/v1/realtime` connection: vLLM's realtime protocol for Voxtral Realtime.

    Client events: `session.update` (`model`, and the delay as `delay_ms`,
    `transcription_delay_ms` or `target_streaming_delay_ms`, at the top level or under
    `session`; only between streams), `input_audio_buffer.append` (`audio`: base64 PCM16
    16 kHz mono), `input_audio_buffer.commit` (`final`: false ends an utterance, as
    `StreamingSession.flush`; true ends the stream, as `finish`). Server events:
    `session.created`, `session.updated`, `transcription.delta` (`delta`),
    `transcription.done` (`text` of the utterance, `usage`), `error` (`error`, `code`).
    """

    def __init__(self, server: _Server, ws: WebSocket):
        self.server = server
        self.ws = ws
        self.limits = server.limits
        self.sample_rate = server.model.sample_rate
        self.delay_ms = server.delay_ms
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None
        self.streaming = False
        self.stream_start = 0.0
        self.stream_samples = 0

    async def run(self):
        await self.ws.accept()
        try:
            self.job = self.server.engine.open(_bridge(asyncio.get_running_loop(), self.queue))
        except ServerBusy as e:
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps({"type": "error", "error": str(e), "code": "too_many_sessions"}))
                await self.ws.close(WS_TRY_AGAIN_LATER, "too many sessions")
            return
        sender = asyncio.ensure_future(self._send_events())
        try:
            self._put({"type": "session.created", "id": f"sess-{self.job.id}", "created": int(time.time()),
                       "model": self.server.model_id, "delay_ms": self.delay_ms})
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    self._handle(message)
                except _ProtocolError as e:
                    self._put({"type": "error", "error": str(e), "code": e.code})
                except Exception as e:
                    log.exception("realtime event failed")
                    self._put({"type": "error", "error": f"internal error: {type(e).__name__}",
                               "code": "processing_error"})
        except Exception:  # a broken connection ends this session only
            log.debug("realtime connection ended", exc_info=True)
        finally:
            self.server.engine.close(self.job)
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender

    def _put(self, event: dict):
        self.queue.put_nowait(event)

    async def _send_events(self):
        while True:
            event = await self.queue.get()
            await self.ws.send_text(json.dumps(event, ensure_ascii=False))

    def _handle(self, message: dict):
        text = message.get("text")
        if text is None:
            raise _ProtocolError("binary frames are not part of this protocol: send JSON text events")
        if len(text) > self.limits.max_message_bytes:
            raise _ProtocolError(f"message of {len(text)} bytes is over this server's limit of "
                                 f"{self.limits.max_message_bytes}; send audio in smaller chunks",
                                 "message_too_large")
        try:
            event = json.loads(text)
        except (ValueError, RecursionError):
            raise _ProtocolError("invalid JSON", "invalid_json") from None
        if not isinstance(event, dict):
            raise _ProtocolError("an event must be a JSON object with a 'type'")
        kind = event.get("type")
        if kind == "input_audio_buffer.append":
            self._append(event)
        elif kind == "input_audio_buffer.commit":
            final = event.get("final", False)
            if not isinstance(final, bool):
                raise _ProtocolError(f"'final' must be true or false, not {final!r}")
            if final:
                self.streaming = False
                self.server.engine.submit(self.job, ("finish",))
            elif self.streaming:
                self.server.engine.submit(self.job, ("flush",))
        elif kind == "session.update":
            self._update(event)
        elif isinstance(kind, str):
            raise _ProtocolError(f"unknown event type {kind[:100]!r}", "unknown_event")
        else:
            raise _ProtocolError("an event must be a JSON object with a string 'type'")

    def _update(self, event: dict):
        settings = {**event, **event["session"]} if isinstance(event.get("session"), dict) else event
        model = settings.get("model")
        if model is not None and not isinstance(model, str):
            raise _ProtocolError(f"'model' must be a string, not {model!r}")
        keys = [k for k in DELAY_KEYS if k in settings]
        if keys:
            if self.streaming:
                raise _ProtocolError("the delay can change only between streams: before the first append or "
                                     "after a final commit")
            try:
                self.delay_ms = self.server.check_delay(settings[keys[0]], keys[0])
            except ValueError as e:
                raise _ProtocolError(str(e)) from None
        self._put({"type": "session.updated", "model": self.server.model_id, "delay_ms": self.delay_ms})

    def _append(self, event: dict):
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise _ProtocolError("'audio' must be a base64 string of PCM16 16 kHz mono samples", "invalid_audio")
        try:
            # Line breaks, as MIME encoders (base64.encodebytes) put every 76 characters, are no error.
            data = base64.b64decode(audio.replace("\r", "").replace("\n", ""), validate=True)
        except (binascii.Error, ValueError):
            raise _ProtocolError("'audio' is not valid base64", "invalid_audio") from None
        if not data or len(data) % 2:
            raise _ProtocolError(f"'audio' must hold whole 16-bit samples, got {len(data)} bytes", "invalid_audio")
        n = len(data) // 2
        now = time.monotonic()
        start = now if not self.streaming else self.stream_start
        sent = 0 if not self.streaming else self.stream_samples
        sr, limits = self.sample_rate, self.limits
        if sent + n > limits.max_audio_s * sr:
            raise _ProtocolError(f"this stream reached the server's limit of {limits.max_audio_s:.0f} s of audio; "
                                 "commit with final true and start a new one", "audio_limit_exceeded")
        if sent + n > (limits.rate_burst_s + limits.max_rate * (now - start)) * sr:
            raise _ProtocolError(f"audio is arriving faster than {limits.max_rate:g} times real time; "
                                 "this chunk was dropped", "rate_limit_exceeded")
        if self.server.engine.backlog_samples(self.job) + n > limits.max_backlog_s * sr:
            raise _ProtocolError(f"over {limits.max_backlog_s:g} s of audio are waiting to be transcribed; "
                                 "this chunk was dropped: send audio no faster than it is transcribed",
                                 "audio_backlog_full")
        samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        ops = [("audio", samples)]
        if not self.streaming:
            self.streaming, self.stream_start, self.stream_samples = True, now, 0
            ops.insert(0, ("start", self.delay_ms))
        self.stream_samples += n
        self.server.engine.submit(self.job, *ops)


def create_app(model: Voxtral, *, model_id: str = "voxtral-mlx", api_key: str | None = None,
               limits: ServerLimits | None = None, delay_ms: int | None = None,
               allowed_hosts: frozenset | None = LOOPBACK_NAMES, allow_origins: tuple[str, ...] = ()):
    """The ASGI application (Starlette) serving `model`.

    Args:
        model: a model from `voxtral_mlx.load`.
        model_id: the name `/v1/models` lists (requests may name any model: one is served).
        api_key: if set, every request needs the header `Authorization: Bearer <api_key>`.
        limits: session, size and rate limits (default `ServerLimits()`).
        delay_ms: the default transcription delay (default: the model's, 480).
        allowed_hosts: the host names requests may address (default: localhost's; None: any).
        allow_origins: web origins (or "*") whose browser pages may call the server, besides localhost's.

    The engine (`app.state.engine`) starts and stops with the application's lifespan.
    """
    limits = limits or ServerLimits()
    server = _Server(model, model_id, limits, delay_ms)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        model.prepare(server.delay_ms)  # before the first request: it is not slower than the others
        server.engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine.stop)

    async def http_error(request: Request, exc: HTTPException) -> Response:
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    app = Starlette(
        routes=[
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/audio/transcriptions", server.transcriptions, methods=["POST"]),
            WebSocketRoute("/v1/realtime", server.realtime),
        ],
        middleware=[Middleware(_Guard, api_key=api_key, max_upload=limits.max_upload_bytes,
                               allowed_hosts=allowed_hosts, allow_origins=tuple(allow_origins))],
        exception_handlers={HTTPException: http_error},
        lifespan=lifespan,
    )
    app.state.engine = server.engine
    return app


def uvicorn_server(model: Voxtral, *, api_key: str | None = None, limits: ServerLimits | None = None,
                   model_id: str = "voxtral-mlx", delay_ms: int | None = None, log_level: str = "warning",
                   allowed_hosts: frozenset | None = LOOPBACK_NAMES, allow_origins: tuple[str, ...] = ()):
    """A `uvicorn.Server` for `create_app(model, ...)`; run it with `.run(sockets=[listen(...)])`."""
    import uvicorn

    limits = limits or ServerLimits()
    app = create_app(model, model_id=model_id, api_key=api_key, limits=limits, delay_ms=delay_ms,
                     allowed_hosts=allowed_hosts, allow_origins=allow_origins)
    # Every log line on stderr, the access log included (uvicorn sends that one to stdout).
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"
    config = uvicorn.Config(app, log_level=log_level, log_config=log_config, lifespan="on",
                            ws_max_size=limits.max_message_bytes * FRAME_LIMIT_FACTOR)

    errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _QuietDenials) for f in errors.filters):
        errors.addFilter(_QuietDenials())

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            """Ctrl+C or SIGTERM: besides uvicorn's graceful shutdown, end the sessions' work at
            once, so that requests answer now rather than once their audio is decoded."""
            if not self.should_exit:  # on a thread: the signal may come while this one holds the engine's lock
                threading.Thread(target=_end_for_shutdown, args=(app.state.engine,), daemon=True).start()
            super().handle_exit(sig, frame)

    return Server(config)


class _QuietDenials(logging.Filter):
    """Drops the ERROR line uvicorn's WebSocket protocols log after each refused WebSocket (a 401
    or 403 sent as the handshake's denial response, as the ASGI spec allows): not an error here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."


def _end_for_shutdown(engine: Engine):
    """End the engine's sessions for a shutdown, saying so on stderr if there were any."""
    n = engine.end_all()
    if n:
        log.warning("voxtral-mlx: stopping: %d session%s ended", n, "s" * (n > 1))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket; port 0 picks a free one. A clear OSError if the address is unusable."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(model: Voxtral, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServerLimits | None = None, model_id: str = "voxtral-mlx", delay_ms: int | None = None,
          log_level: str = "warning", on_listening: Callable[[str], None] | None = None,
          allow_origins: tuple[str, ...] = ()):
    """Serve `model` until interrupted (Ctrl+C or SIGTERM); see `create_app` for the arguments.

    Binds to localhost by default, and then answers only requests addressed to localhost;
    `on_listening` is called with the base URL once bound.
    """
    loopback = host in LOOPBACK_NAMES or host.startswith("127.")
    server = uvicorn_server(model, api_key=api_key, limits=limits, model_id=model_id, delay_ms=delay_ms,
                            log_level=log_level, allowed_hosts=LOOPBACK_NAMES | {host} if loopback else None,
                            allow_origins=allow_origins)
    sock = listen(host, port)
    if on_listening is not None:
        bound = sock.getsockname()
        on_listening(f"http://{f'[{bound[0]}]' if ':' in bound[0] else bound[0]}:{bound[1]}")
    server.run(sockets=[sock])
