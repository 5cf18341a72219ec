"""The server over loopback: real HTTP (httpx) and WebSocket (websockets) clients against
uvicorn serving the tiny model in a background thread, and the `serve` command itself."""

import base64
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from conftest import AUDIO, checkpoint, load_model, speech, synthetic

import voxtral_mlx
from voxtral_mlx.server import Engine, ServerLimits, listen, uvicorn_server
from voxtral_mlx.transcribe import to_srt, to_vtt

JFK = AUDIO / "jfk.wav"
TRANSCRIPTIONS = "/v1/audio/transcriptions"


class Running:
    """A server on a free loopback port, in a background thread."""

    def __init__(self, model, **options):
        self.server = uvicorn_server(model, model_id="tiny", **options)
        sock = listen("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/v1/realtime"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)

    def sessions(self, **headers) -> int:
        return httpx.get(self.url + "/health", headers=headers).json()["sessions"]

    def wait_idle(self, timeout: float = 10.0):
        deadline = time.monotonic() + timeout
        while self.sessions() != 0:
            assert time.monotonic() < deadline, "sessions were not freed"
            time.sleep(0.05)

    def close(self):
        self.server.should_exit = True
        self.thread.join(10)
        assert not self.thread.is_alive()


@contextlib.contextmanager
def running(model, **options):
    server = Running(model, **options)
    try:
        yield server
    finally:
        server.close()


def pcm16(samples: np.ndarray) -> bytes:
    return np.clip(np.round(samples * 32768), -32768, 32767).astype("<i2").tobytes()


def as_received(samples: np.ndarray) -> np.ndarray:
    """What the server decodes from `pcm16(samples)`."""
    return np.frombuffer(pcm16(samples), "<i2").astype(np.float32) / 32768


def append(data: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})


def commit(final: bool) -> str:
    return json.dumps({"type": "input_audio_buffer.commit", "final": final})


def send_audio(ws, samples: np.ndarray, sizes=(1, 7, 999, 3001, 1281)):
    """Append in chunks of odd numbers of samples."""
    data, start, i = pcm16(samples), 0, 0
    while start < len(data):
        n = 2 * sizes[i % len(sizes)]
        ws.send(append(data[start : start + n]))
        start += n
        i += 1


def events_until(ws, kind: str, timeout: float = 30.0) -> list[dict]:
    """Events up to and including the first of type `kind`."""
    out = []
    while True:
        out.append(json.loads(ws.recv(timeout=timeout)))
        if out[-1]["type"] == kind:
            return out


def stream(ws, samples: np.ndarray) -> tuple[str, dict]:
    """One stream: the joined deltas and the final transcription.done."""
    send_audio(ws, samples)
    ws.send(commit(True))
    events = events_until(ws, "transcription.done")
    assert {e["type"] for e in events} <= {"transcription.delta", "transcription.done"}, events
    return "".join(e["delta"] for e in events[:-1]), events[-1]


def post(server, path=JFK, headers=None, **fields) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(server.url + TRANSCRIPTIONS, files={"file": (Path(path).name, f.read(), "audio/wav")},
                          data={"model": "whisper-1", **fields}, headers=headers, timeout=60)


@pytest.fixture(scope="module")
def model(ckpt_root):
    # Smaller embeddings give varied text, several segments and words on jfk.
    return load_model(checkpoint(ckpt_root, embed_std=0.5))


@pytest.fixture(scope="module")
def jfk(model):
    """The library's results, computed before any server runs (one thread drives MLX at a time)."""
    result = model.transcribe(JFK)
    assert len(result.segments) >= 2 and len(result.words) >= 10 and len(result.text.strip()) > 20
    return result


@pytest.fixture(scope="module")
def server(model, jfk):
    with running(model) as s:
        yield s
    # Every test leaves no session behind.


@pytest.fixture(autouse=True)
def no_leaked_sessions(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


# Scheduling


def test_engine_serves_jobs_round_robin_in_bounded_turns_decoding_audio_turns_together(model, jfk, monkeypatch):
    engine = Engine(model, ServerLimits(turn_ms=320, solo_turn_ms=2560))
    turns, events, done = [], {"a": [], "b": []}, threading.Semaphore(0)
    execute, together = engine._execute, engine._decode_together

    def spy(job, op):
        turns.append([(job.name, op[0], op[1].size if op[0] == "audio" else None)])
        execute(job, op)

    def spy_together(pairs):
        turns.append([(job.name, op[0], op[1].size if op[0] == "audio" else None) for job, op in pairs])
        together(pairs)

    engine._execute, engine._decode_together = spy, spy_together
    rows = []
    real = model.net.decode_rows
    monkeypatch.setattr(model.net, "decode_rows", lambda *a: (rows.append(a[0].shape[0]), real(*a))[1])

    def emit(name):
        def on_event(event):
            events[name].append(event)
            if event["type"] == "transcription.done":
                done.release()
        return on_event

    a, b = engine.open(emit("a"), keep_result=True), engine.open(emit("b"))
    a.name, b.name = "a", "b"
    other = synthetic(3.0, seed=2)
    engine.submit(a, ("start", 480), ("audio", speech("jfk")), ("finish",))
    engine.submit(b, ("start", 240), *[("audio", c) for c in np.array_split(other, 7)], ("finish",))
    engine.start()
    try:
        assert done.acquire(timeout=30) and done.acquire(timeout=30)
    finally:
        engine.stop()
    assert a.result.tokens == jfk.tokens and a.result.text == jfk.text
    assert "".join(e.get("delta", "") for e in events["b"]) == model.transcribe(other, delay_ms=240).text
    # Each job's operations in turn; while both have audio to decode next (audio, a flush or the
    # end), their turns (at most 320 ms of audio each) are decoded together, each decoder step
    # taking a position of each.
    assert turns[:2] == [[("a", "start", None)], [("b", "start", None)]]
    last_b = max(i for i, t in enumerate(turns) if "b" in (name for name, _, _ in t))
    both = turns[2 : last_b + 1]
    assert [[name for name, _, _ in t] for t in both] == [["a", "b"]] * len(both)
    assert all(kind == "audio" and n <= 5120 for t in both for name, kind, n in t if name == "a")
    assert [kind for t in both for name, kind, _ in t if name == "b"] == ["audio"] * (len(both) - 1) + ["finish"]
    assert sum(n for t in both[:-1] for name, _, n in t if name == "b") == other.size
    assert rows and set(rows) == {2} and len(rows) >= other.size // 1280 - 12
    # Alone, a job gets longer turns (2.56 s).
    assert max(t[0][2] for t in turns[last_b + 1:] if t[0][1] == "audio") == 40960
    assert engine.sessions == 2
    engine.close(a)


def test_end_all_drops_queued_work_and_tells_each_job(model):
    engine = Engine(model)
    events = {"a": [], "b": []}
    a, b = engine.open(events["a"].append), engine.open(events["b"].append)
    # Queued, not yet run (the worker is not started): `end_all` empties them while they wait their turn.
    engine.submit(a, ("start", 480), ("audio", speech("jfk")), ("finish",))
    engine.submit(b, ("start", 480), ("audio", speech("jfk")))
    assert engine.end_all() == 2 and engine.backlog_samples(a) == 0
    shutting = {"type": "error", "error": "the server is shutting down", "code": "server_shutting_down"}
    assert events == {"a": [shutting], "b": [shutting]}
    engine.submit(b, ("audio", speech("jfk")), ("finish",))  # nothing more is taken
    assert engine.backlog_samples(b) == 0
    with pytest.raises(voxtral_mlx.server.ServerBusy, match="the server is shutting down"):
        engine.open(events["a"].append)
    engine.start()
    try:
        engine.close(a)
        engine.close(b)
        deadline = time.monotonic() + 10
        while engine.sessions:  # the worker skips the emptied jobs, then frees them
            assert time.monotonic() < deadline and engine._thread.is_alive()
            time.sleep(0.01)
    finally:
        engine.stop()
    assert events == {"a": [shutting], "b": [shutting]}


def test_the_left_pads_state_is_computed_before_the_first_request(ckpt_root):
    fresh = voxtral_mlx.load(checkpoint(ckpt_root, embed_std=0.5))  # not the shared model: a state of its own
    with running(fresh, delay_ms=80):
        one = fresh.net.snapshots.nbytes
        assert one > 0
    fresh.prepare(80)  # the server's delay: already there
    assert fresh.net.snapshots.nbytes == one
    fresh.prepare()
    assert fresh.net.snapshots.nbytes == 2 * one


# HTTP


def test_health_and_models(server):
    health = httpx.get(server.url + "/health").json()
    assert health == {"status": "ok", "model": "tiny", "sessions": 0, "max_sessions": 4}
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["object"] == "model"


def test_transcription_formats_equal_the_library(server, jfk):
    r = post(server)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"text": jfk.text.strip(), "usage": {"type": "duration", "seconds": jfk.duration}}
    assert post(server, response_format="text").text == jfk.text.strip() + "\n"
    assert post(server, response_format="srt").text == to_srt(jfk)
    vtt = post(server, response_format="vtt")
    assert vtt.text == to_vtt(jfk) and vtt.headers["content-type"].startswith("text/vtt")


def test_sessions_speculate_where_the_model_does_by_default(model, jfk, monkeypatch):
    # The server's sessions take `default_speculate` (off for this model, whose head MKL
    # multiplies); an upload, fed in turns, then decodes in passes of several positions, with
    # the same text.
    from voxtral_mlx import StreamingSession, Voxtral

    monkeypatch.setattr(Voxtral, "default_speculate", property(lambda self: 4))
    passes = []
    real = StreamingSession._speculate
    monkeypatch.setattr(StreamingSession, "_speculate", lambda self, emb: (passes.append(emb.shape[1]), real(self, emb))[1])
    with running(model) as server:
        r = post(server, response_format="verbose_json", timestamp_granularities=["word", "segment"])
    assert r.status_code == 200 and r.json()["text"] == jfk.text.strip()
    assert passes and max(passes) <= 4  # this model emits few pads: passes seldom grow past 2


def test_verbose_json_segments_and_words_equal_the_library(server, model, jfk):
    body = post(server, response_format="verbose_json",
                **{"timestamp_granularities[]": ["word", "segment"], "language": "en"}).json()
    assert (body["task"], body["language"], body["duration"], body["text"]) == (
        "transcribe", "en", jfk.duration, jfk.text.strip())
    assert body["words"] == [{"word": w.text.strip(), "start": w.start, "end": w.end} for w in jfk.words]
    assert [(s["id"], s["start"], s["end"], s["text"]) for s in body["segments"]] == [
        (i, s.start, s.end, s.text) for i, s in enumerate(jfk.segments)]
    for s, segment in zip(body["segments"], jfk.segments):
        # Text decoded in the right padding is timed at the end of the audio.
        records = [r for r in jfk.token_records if r.id >= model.tokenizer.n_special and (
            segment.start <= r.time < segment.end or r.time == segment.end == jfk.duration)]
        assert s["tokens"] == [r.id for r in records] and records
        assert s["avg_logprob"] == pytest.approx(np.mean([math.log(r.probability) for r in records]), abs=1e-3)
        assert s["temperature"] == 0.0 and s["compression_ratio"] > 0
    assert body["usage"] == {"type": "duration", "seconds": jfk.duration}
    # OpenAI's defaults: segments unless words alone are asked for.
    plain = post(server, response_format="verbose_json").json()
    assert plain["segments"] == body["segments"] and "words" not in plain and plain["language"] == "unknown"
    words = post(server, response_format="verbose_json", **{"timestamp_granularities[]": "word"}).json()
    assert words["words"] == body["words"] and "segments" not in words


def test_delay_field(server, model):
    text = model.transcribe(JFK, delay_ms=960).text
    assert text != model.transcribe(JFK).text
    assert post(server, delay_ms="960").json()["text"] == text.strip()


@pytest.mark.parametrize("fields,param", [
    ({"response_format": "xml"}, "response_format"),
    ({"timestamp_granularities[]": "sentence"}, "timestamp_granularities"),
    ({"delay_ms": "500"}, "delay_ms"),
    ({"delay_ms": "fast"}, "delay_ms"),
    ({"stream": "true"}, "stream"),
])
def test_bad_fields_are_400(server, fields, param):
    r = post(server, **fields)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_bad_requests_are_4xx_with_openai_errors(server, tmp_path):
    noise = tmp_path / "notes.wav"
    noise.write_bytes(os.urandom(5000))
    r = post(server, path=noise)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_audio"
    assert r.json()["error"]["message"].startswith("notes.wav: ")  # not the server's temporary path
    r = httpx.post(server.url + TRANSCRIPTIONS, data={"model": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "file"
    r = httpx.post(server.url + TRANSCRIPTIONS, content=b"{}", headers={"content-type": "application/json"})
    assert r.status_code == 400
    r = httpx.post(server.url + TRANSCRIPTIONS, content=b"--x\r\nbroken",
                   headers={"content-type": "multipart/form-data; boundary=x"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(server.url + TRANSCRIPTIONS).status_code == 405
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


# WebSocket


def test_stream_in_odd_chunks_equals_offline(server, jfk, model):
    with connect(server.ws_url) as ws:
        created = json.loads(ws.recv())
        assert created["type"] == "session.created" and created["id"].startswith("sess-")
        assert created["delay_ms"] == 480 and created["model"] == "tiny"
        ws.send(json.dumps({"type": "session.update", "model": "tiny"}))
        assert json.loads(ws.recv()) == {"type": "session.updated", "model": "tiny", "delay_ms": 480}
        ws.send(commit(False))  # vLLM's clients commit once before the audio: nothing to flush
        deltas, done = stream(ws, speech("jfk"))
        assert deltas == done["text"] == jfk.text
        L = 1 + 32 + 6
        assert done["usage"] == {"prompt_tokens": L, "completion_tokens": len(jfk.tokens),
                                 "total_tokens": L + len(jfk.tokens)}
        # The connection takes another stream, with a delay set between streams.
        ws.send(json.dumps({"type": "session.update", "session": {"target_streaming_delay_ms": 960}}))
        assert json.loads(ws.recv())["delay_ms"] == 960
        audio = as_received(synthetic(3.0, seed=4))
        deltas, done = stream(ws, audio)
        assert deltas == done["text"] == model.transcribe(audio, delay_ms=960).text
        assert done["text"] != model.transcribe(audio).text
        # Base64 broken into lines, as MIME encoders write it (base64.encodebytes), is the same audio.
        ws.send(json.dumps({"type": "session.update", "delay_ms": 480}))
        assert json.loads(ws.recv())["delay_ms"] == 480
        for i in range(0, 2 * 16000 * 3, 6400):
            chunk = pcm16(audio)[i : i + 6400]
            ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": base64.encodebytes(chunk).decode()}))
        ws.send(commit(True))
        events = events_until(ws, "transcription.done")
        assert events[-1]["text"] == model.transcribe(audio).text


def test_commit_not_final_flushes_like_session_flush(server, model):
    a1, a2 = speech("night1968_5s")[:50000], as_received(synthetic(2.0, seed=5))
    session = model.stream()
    text1 = session.feed(a1) + session.flush()
    n1 = len(session.tokens)
    text2 = session.feed(a2) + session.finish()
    assert text1.strip() and text2.strip()
    with connect(server.ws_url) as ws:
        ws.recv()
        send_audio(ws, a1)
        ws.send(commit(False))
        first = events_until(ws, "transcription.done")
        ws.send(commit(False))  # nothing new to flush: no event
        ws.send(json.dumps({"type": "session.update", "delay_ms": 960}))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and "between streams" in error["error"]
        deltas, second = stream(ws, a2)
    assert "".join(e["delta"] for e in first[:-1]) == first[-1]["text"] == text1
    assert first[-1]["usage"]["completion_tokens"] == n1 and first[-1]["usage"]["prompt_tokens"] == 39
    assert deltas == second["text"] == text2
    assert second["usage"] == {"prompt_tokens": 0, "completion_tokens": len(session.tokens) - n1,
                               "total_tokens": len(session.tokens) - n1}


def test_concurrent_sessions_are_each_correct(server, model, jfk):
    other = as_received(synthetic(6.0, seed=9))
    other_text = model.transcribe(other).text
    barrier, results = threading.Barrier(3), {}

    def ws_client(name, audio):
        with connect(server.ws_url) as ws:
            ws.recv()
            barrier.wait(timeout=10)
            results[name] = stream(ws, audio)

    def http_client():
        barrier.wait(timeout=10)
        results["http"] = post(server).json()["text"]

    threads = [threading.Thread(target=ws_client, args=("jfk", speech("jfk"))),
               threading.Thread(target=ws_client, args=("other", other)), threading.Thread(target=http_client)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["jfk"][0] == results["jfk"][1]["text"] == jfk.text
    assert results["other"][0] == results["other"][1]["text"] == other_text
    assert results["http"] == jfk.text.strip()


def test_session_limit(model):
    with running(model, limits=ServerLimits(max_sessions=2)) as server, \
            connect(server.ws_url) as a, connect(server.ws_url) as b:
        assert json.loads(a.recv())["type"] == json.loads(b.recv())["type"] == "session.created"
        assert server.sessions() == 2
        with connect(server.ws_url) as c:
            error = json.loads(c.recv())
            assert error["type"] == "error" and error["code"] == "too_many_sessions"
            with pytest.raises(ConnectionClosed) as closed:
                c.recv(timeout=10)
            assert closed.value.rcvd.code == 1013
        r = post(server)
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_sessions"
        b.close()
        deadline = time.monotonic() + 10
        while server.sessions() != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert post(server).status_code == 200
        assert server.sessions() == 1


def test_api_key_on_every_request(model):
    key = "s3cret-key"
    with running(model, api_key=key) as server:
        good = {"Authorization": f"Bearer {key}"}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {key}"},
                        {"Authorization": f"Bearer {key}x"}, {"Authorization": "Bearer"}):
            for r in (httpx.get(server.url + "/health", headers=headers),
                      httpx.get(server.url + "/v1/models", headers=headers), post(server, headers=headers)):
                assert r.status_code == 401, (headers, r.text)
                assert r.json()["error"]["code"] == "invalid_api_key"
                assert r.headers["www-authenticate"] == "Bearer"
            with pytest.raises(InvalidStatus) as denied:
                connect(server.ws_url, additional_headers=headers)
            assert denied.value.response.status_code == 401
        assert server.sessions(**good) == 0
        assert httpx.get(server.url + "/v1/models", headers=good).status_code == 200
        assert post(server, headers=good).status_code == 200
        with connect(server.ws_url, additional_headers=good) as ws:
            assert json.loads(ws.recv())["type"] == "session.created"


def test_other_sites_and_rebound_names_are_refused(model, server):
    # A page on another site (Origin) or a DNS name rebound to 127.0.0.1 (Host) gets nothing.
    for headers in ({"Origin": "https://evil.example"}, {"Host": "evil.example"},
                    {"Host": f"evil.example:{server.port}"}):
        for r in (httpx.get(server.url + "/health", headers=headers), post(server, headers=headers)):
            assert r.status_code == 403, (headers, r.text)
            assert r.json()["error"]["code"] == "forbidden"
    with pytest.raises(InvalidStatus) as denied:
        connect(server.ws_url, origin="https://evil.example")
    assert denied.value.response.status_code == 403
    rebound = socket.create_connection(("127.0.0.1", server.port))
    with pytest.raises(InvalidStatus) as denied:
        connect(f"ws://evil.example:{server.port}/v1/realtime", sock=rebound)
    assert denied.value.response.status_code == 403
    for headers in ({"Origin": f"http://localhost:{server.port}"}, {"Origin": "http://127.0.0.1:3000"},
                    {"Host": f"localhost:{server.port}"}, {"Host": f"[::1]:{server.port}"}):
        assert httpx.get(server.url + "/health", headers=headers).status_code == 200, headers
    with connect(server.ws_url, origin="http://localhost") as ws:
        assert json.loads(ws.recv())["type"] == "session.created"


def test_allowed_origins_and_any_host(model):
    with running(model, allow_origins=("https://app.example",), allowed_hosts=None) as server:
        assert httpx.get(server.url + "/health", headers={"Origin": "https://app.example"}).status_code == 200
        assert httpx.get(server.url + "/health", headers={"Host": "voxtral.lan"}).status_code == 200
        r = httpx.get(server.url + "/health", headers={"Origin": "https://other.example"})
        assert r.status_code == 403 and "--allow-origin https://other.example" in r.json()["error"]["message"]


def test_pages_of_origins_let_in_may_read_the_responses(model, jfk):
    app = "https://app.example"
    with running(model, api_key="k", allow_origins=(app,)) as server:
        # The preflight a browser sends before a request with a key: answered without the key.
        r = httpx.options(server.url + TRANSCRIPTIONS, headers={
            "Origin": app, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type"})
        assert r.status_code == 204 and r.content == b""
        assert r.headers["access-control-allow-origin"] == app and r.headers["vary"] == "Origin"
        assert r.headers["access-control-allow-methods"] == "GET, POST"
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"
        key = {"Authorization": "Bearer k"}
        for origin in (app, f"http://localhost:{server.port}"):
            r = post(server, headers={**key, "Origin": origin})
            assert r.status_code == 200 and r.json()["text"] == jfk.text.strip()
            assert r.headers["access-control-allow-origin"] == origin
        r = httpx.get(server.url + "/health", headers={"Origin": app})  # errors are readable too
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app
        # Other sites get neither an answer to their preflight nor the header; requests without an
        # Origin (not from a browser) get no header.
        for method in ("OPTIONS", "GET"):
            r = httpx.request(method, server.url + "/health", headers={
                **key, "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
            assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
        r = httpx.get(server.url + "/health", headers=key)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
        assert httpx.options(server.url + "/health", headers=key).status_code == 405  # not a preflight


def test_refused_websockets_log_no_error(model):
    import logging

    with running(model, api_key="k") as server:
        with pytest.raises(InvalidStatus):
            connect(server.ws_url)
        noise = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                                  "ASGI callable returned without completing handshake.", None, None)
        other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", None,
                                  None)
        assert not logging.getLogger("uvicorn.error").filter(noise)
        assert logging.getLogger("uvicorn.error").filter(other)


def test_ctrl_c_answers_the_requests_in_flight_at_once(model, tmp_path):
    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.tile(speech("jfk"), 16), 16000, subtype="PCM_16")  # 3 minutes: far from done
    server = Running(model, limits=ServerLimits(turn_ms=80, solo_turn_ms=80))
    engine, answer = server.server.config.app.state.engine, {}
    upload = threading.Thread(target=lambda: answer.setdefault("r", post(server, long)))
    upload.start()
    deadline = time.monotonic() + 20
    while engine.sessions == 0 or engine.backlog_samples(next(iter(engine._jobs))) == 0:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with connect(server.ws_url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        ws.send(append(pcm16(speech("jfk")[:16000])))
        stopped = time.monotonic()
        server.server.handle_exit(signal.SIGINT, None)
        upload.join(10)
        assert not upload.is_alive() and time.monotonic() - stopped < 5
        r = answer["r"]
        assert r.status_code == 503 and r.json()["error"] == {
            "message": "the server is shutting down", "type": "server_error", "param": None,
            "code": "server_shutting_down"}
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(ws.recv(timeout=10)))
        assert {"type": "error", "error": "the server is shutting down", "code": "server_shutting_down"} in events
        assert closed.value.rcvd.code == 1012
    server.thread.join(10)
    assert not server.thread.is_alive() and engine.sessions == 0


def test_ctrl_c_closes_a_websocket_that_is_still_sending_with_an_error_and_1012(model):
    # A live client sends audio up to the moment the server stops: the error is its session's last
    # event (deltas of the turn being decoded came after it in about half the runs), then 1012.
    server = Running(model)
    engine = server.server.config.app.state.engine
    chunk = append(pcm16(speech("jfk")[:1600]))
    with connect(server.ws_url) as ws:
        assert json.loads(ws.recv())["type"] == "session.created"
        stop, sent = threading.Event(), []

        def keep_sending():
            with contextlib.suppress(ConnectionClosed):
                while not stop.is_set():
                    ws.send(chunk)
                    sent.append(time.monotonic())
                    time.sleep(0.01)

        sender = threading.Thread(target=keep_sending)
        sender.start()
        deadline = time.monotonic() + 20
        while engine.sessions == 0 or len(sent) < 20:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        stopped = time.monotonic()
        server.server.handle_exit(signal.SIGINT, None)
        events = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                events.append(json.loads(ws.recv(timeout=10)))
        stop.set()
        sender.join(10)
        assert sent[-1] > stopped  # it was sending as the server stopped
        assert events[-1] == {"type": "error", "error": "the server is shutting down", "code": "server_shutting_down"}
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    server.thread.join(10)
    assert not server.thread.is_alive() and engine.sessions == 0


def test_upload_and_duration_limits(model):
    with running(model, limits=ServerLimits(max_upload_mb=0.2, max_audio_s=5.0)) as server:
        r = post(server)  # jfk.wav is 352 kB
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        # A body without Content-Length is counted as it arrives.
        head = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        chunks = iter([head] + [b"\0" * 100_000] * 4)
        r = httpx.post(server.url + TRANSCRIPTIONS, content=chunks,
                       headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413
        short = Path(AUDIO / "night1968_5s.wav")
        assert short.stat().st_size < 200_000
        r = post(server, path=short)
        assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"


def test_stream_limits_drop_the_chunk_and_keep_the_stream(model):
    audio = speech("jfk")
    limits = ServerLimits(max_rate=2.0, rate_burst_s=1.0, max_audio_s=3.0, max_backlog_s=100)
    with running(model, limits=limits) as server, connect(server.ws_url) as ws:
        ws.recv()
        ws.send(append(pcm16(audio[:6400])))  # 0.4 s
        ws.send(append(pcm16(audio[6400:32000])))  # 1.6 s more at once: over 1 s + 2 x real time
        error = json.loads(ws.recv(timeout=10))
        assert error["code"] == "rate_limit_exceeded"
        time.sleep(1.0)
        ws.send(append(pcm16(audio[6400:32000])))  # allowed now: 1 s + 2 x 1 s
        ws.send(append(pcm16(audio[32000:51200])))  # 1.2 s more: over the 3 s of one stream
        error = json.loads(ws.recv(timeout=10))
        assert error["code"] == "audio_limit_exceeded"
        ws.send(commit(True))
        done = events_until(ws, "transcription.done")[-1]
        assert done["text"] == model.transcribe(audio[:32000]).text
    with running(model, limits=ServerLimits(max_backlog_s=0.5)) as server, connect(server.ws_url) as ws:
        ws.recv()
        ws.send(append(pcm16(audio[:16000])))
        assert json.loads(ws.recv(timeout=10))["code"] == "audio_backlog_full"


def test_malformed_messages_leave_the_server_healthy(server, model, jfk):
    huge = append(b"\0" * 900_000)  # 1.2 MB of JSON: over the 1 MiB message limit
    cases = [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        ("[" * 100_000 + "]" * 100_000, "invalid_json"),
        ("[1, 2]", "invalid_request"),
        ("42", "invalid_request"),
        ('"input_audio_buffer.append"', "invalid_request"),
        ("null", "invalid_request"),
        ("{}", "invalid_request"),
        ('{"type": 7}', "invalid_request"),
        ('{"type": "response.create"}', "unknown_event"),
        ('{"type": "input_audio_buffer.append"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": 12}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": ["AAAA"]}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "not base64!"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAA"}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "éé=="}', "invalid_audio"),
        ('{"type": "input_audio_buffer.append", "audio": "AAAA"}', "invalid_audio"),  # 3 bytes
        ('{"type": "input_audio_buffer.append", "audio": ""}', "invalid_audio"),
        ('{"type": "input_audio_buffer.commit", "final": "yes"}', "invalid_request"),
        ('{"type": "input_audio_buffer.commit", "final": 1}', "invalid_request"),
        ('{"type": "session.update", "delay_ms": 500}', "invalid_request"),
        ('{"type": "session.update", "delay_ms": "480"}', "invalid_request"),
        ('{"type": "session.update", "transcription_delay_ms": true}', "invalid_request"),
        ('{"type": "session.update", "delay_ms": 1e308}', "invalid_request"),
        ('{"type": "session.update", "model": 3}', "invalid_request"),
        (huge, "message_too_large"),
        (b"\x00\x01binary", "invalid_request"),
    ]
    rng = np.random.default_rng(0)
    valid = append(pcm16(speech("jfk")[:60]))
    with connect(server.ws_url, max_size=None) as ws:
        ws.recv()
        for message, code in cases:
            ws.send(message)
            event = json.loads(ws.recv(timeout=10))
            assert (event["type"], event["code"]) == ("error", code), (message[:60], event)
            assert isinstance(event["error"], str) and event["error"]
        for _ in range(100):  # random corruptions of a valid event: errors or harmless, never a crash
            data = bytearray(valid.encode())
            for i in rng.integers(0, len(data), 3):
                data[i] = rng.integers(0, 128)
            ws.send(data.decode("ascii"))
        ws.send(json.dumps({"type": "session.update"}))
        while json.loads(ws.recv(timeout=10))["type"] != "session.updated":
            pass
        ws.send(commit(True))  # ends whatever the corruptions started
        events_until(ws, "transcription.done")
        # The connection still transcribes correctly.
        deltas, done = stream(ws, speech("jfk"))
        assert deltas == done["text"] == jfk.text
    # Abrupt ends: mid-stream without a close frame, a frame over the protocol limit, a half upload.
    with contextlib.suppress(OSError, ConnectionClosed), connect(server.ws_url) as ws:
        ws.recv()
        send_audio(ws, speech("jfk")[:64000])
        ws.socket.shutdown(socket.SHUT_RDWR)
        ws.socket.close()
    with connect(server.ws_url, max_size=None) as ws:
        ws.recv()
        ws.send(append(b"\0" * 3_500_000))  # 4.7 MB: over 4 x the message limit
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"POST " + TRANSCRIPTIONS.encode() + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 300000\r\n"
                    b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\nContent-Disposition: form-data; "
                    b'name="file"; filename="a.wav"\r\n\r\n' + b"\0" * 20000)
    with socket.create_connection(("127.0.0.1", server.port)) as raw:
        raw.sendall(b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        raw.recv(100)
    server.wait_idle()
    assert post(server).json()["text"] == jfk.text.strip()
    with connect(server.ws_url) as ws:
        ws.recv()
        assert stream(ws, speech("jfk"))[1]["text"] == jfk.text


def test_disconnect_during_a_long_upload_frees_the_session(model, tmp_path, monkeypatch):
    import soundfile as sf

    long = tmp_path / "long.wav"
    sf.write(long, np.tile(speech("jfk"), 16), 16000, subtype="PCM_16")  # 3 minutes: 2200 turns of 80 ms
    with running(model, limits=ServerLimits(turn_ms=80, solo_turn_ms=80)) as server:
        engine, ops = server.server.config.app.state.engine, []
        execute = engine._execute

        def spy(job, op):
            ops.append((op[0], job.session is not None))
            execute(job, op)

        monkeypatch.setattr(engine, "_execute", spy)
        body = long.read_bytes()
        with socket.create_connection(("127.0.0.1", server.port)) as raw:
            boundary = b"b0undary"
            part = (b"--" + boundary + b'\r\nContent-Disposition: form-data; name="file"; filename="long.wav"\r\n\r\n'
                    + body + b"\r\n--" + boundary + b"--\r\n")
            raw.sendall(b"POST " + TRANSCRIPTIONS.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: "
                        + str(len(part)).encode() + b"\r\nContent-Type: multipart/form-data; boundary="
                        + boundary + b"\r\n\r\n" + part)
            deadline = time.monotonic() + 10
            while ("audio", True) not in ops:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        # The client left while its audio was being transcribed: the job is dropped, not finished.
        server.wait_idle()
        assert ("close", True) in ops and "finish" not in {k for k, _ in ops}


# The command


def test_serve_command(model, jfk, ckpt_root):
    path = checkpoint(ckpt_root, embed_std=0.5)
    script = Path(sys.executable).parent / "voxtral-mlx"
    env = dict(os.environ, HF_HUB_OFFLINE="1", VOXTRAL_MLX_API_KEY="k")
    proc = subprocess.Popen([str(script), "serve", "--model", str(path), "--port", "0"], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        assert line.startswith(f"voxtral-mlx: serving {path} on http://127.0.0.1:"), line
        url = line.split(" on ")[1].split()[0]
        assert httpx.get(url + "/health").status_code == 401
        with open(JFK, "rb") as f:
            r = httpx.post(url + TRANSCRIPTIONS, files={"file": ("jfk.wav", f.read())},
                           headers={"Authorization": "Bearer k"}, timeout=60)
        assert r.json()["text"] == jfk.text.strip()
        # A local model is named by its directory, not its path on the server.
        models = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k"}).json()
        assert [m["id"] for m in models["data"]] == [path.name]
        proc.send_signal(signal.SIGINT)
        code, err = proc.wait(timeout=20), proc.stderr.read()
        assert code == 0, err.decode(errors="replace")[-4000:]  # (what the server said, should it fail)
        assert proc.stdout.read() == b"" and b"Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    taken = listen("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    for args, message in [(["--model", str(path), "--port", port], f"cannot listen on 127.0.0.1:{port}: "),
                          (["--model", "/no/such/model"], "/no/such/model: no such model directory"),
                          (["--model", str(path), "--delay-ms", "500"], "--delay-ms: ")]:
        done = subprocess.run([str(script), "serve", *args], env=env, capture_output=True, timeout=60)
        err = done.stderr.decode()
        assert done.returncode == 1 and err.startswith("voxtral-mlx: error: " + message), err
        assert err.count("\n") == 1
    taken.close()


# A thread that ran the model, ending while the interpreter finalizes (as the server's worker can
# after Ctrl+C): its sleep wakes during the last collection, which a finalizer in a cycle holds
# open. With MLX's compiled activations (`mlx.nn.gelu`, `silu`), the thread's end freed what it
# compiled, which takes the GIL, and the process aborted ("terminate called without an active
# exception", exit 134) every time.
THREAD_ENDING_AT_EXIT = """
import sys, threading, time
import numpy as np
import voxtral_mlx

model = voxtral_mlx.load(sys.argv[1])
done = threading.Event()

def work():
    model.transcribe(np.zeros(16000, np.float32))
    done.set()
    time.sleep(0.5)

threading.Thread(target=work, daemon=True).start()
done.wait()

class SlowToFree:
    def __del__(self, sleep=time.sleep):
        sleep(1.5)

kept = SlowToFree()
kept.cycle = kept
del kept
"""


def run_script(source: str, model_dir: Path, tmp_path: Path, kernels: str) -> subprocess.CompletedProcess:
    """`source` run by Python with the model's path as its argument, the CPU kernels on or off."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, VOXTRAL_MLX_CPU_KERNELS="auto" if kernels == "on" else "off")
    return subprocess.run([sys.executable, str(script), str(model_dir)], env=env, capture_output=True, timeout=300)


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_a_thread_that_ran_the_model_may_end_as_the_process_exits(tiny_dir, tmp_path, kernels):
    done = run_script(THREAD_ENDING_AT_EXIT, tiny_dir, tmp_path, kernels)
    assert (done.returncode, done.stderr.decode()) == (0, "")


# Every path through the model, counting calls of `mx.compile`d functions (patched in before
# `mlx.nn` defines its activations): a thread that called one aborts at exit as above.
COMPILED_CALLS = """
import sys
import mlx.core as mx
calls = []
compile = mx.compile

def counted(fun=None, **kw):
    def wrap(f):
        compiled = compile(f, **kw)
        return lambda *a, **k: calls.append(f.__name__) or compiled(*a, **k)
    return wrap if fun is None else wrap(fun)

mx.compile = counted
import numpy as np
import voxtral_mlx

x = np.sin(np.arange(24000) / 7).astype(np.float32)
for dtype in ("float32", "bfloat16"):
    model = voxtral_mlx.load(sys.argv[1], dtype=dtype)
    model.transcribe(x)
    model.transcribe([x, x[:9000]])
    with model.stream() as s:
        s.feed(x[:5000]); s.flush(); s.feed(x[5000:])
    s.finish()
print(len(calls), sorted(set(calls)))
"""


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_nothing_the_model_runs_is_compiled(tiny_dir, tmp_path, kernels):
    done = run_script(COMPILED_CALLS, tiny_dir, tmp_path, kernels)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert done.stdout.decode() == "0 []\n"


def test_server_libraries_are_optional():
    code = ("import sys; sys.modules['starlette'] = sys.modules['python_multipart'] = None\n"
            "import voxtral_mlx, voxtral_mlx.cli\n"
            "assert not any(m.startswith(('uvicorn', 'websockets', 'multipart', 'python_multipart')) "
            "for m in sys.modules if sys.modules[m] is not None)\n"
            "sys.argv = ['voxtral-mlx', 'serve']; voxtral_mlx.cli.main()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 1
    assert done.stderr.decode() == ("voxtral-mlx: error: the server needs starlette, python-multipart: "
                                    "pip install 'voxtral-mlx[server]'\n")
