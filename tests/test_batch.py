"""Batched files: several recordings decoded as one batch give each one's own transcription."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from conftest import AUDIO, load_model, reference, speech, synthetic

import voxtral_mlx
from voxtral_mlx import StreamingSession
from voxtral_mlx.cache import RingKVCache
from voxtral_mlx.transcribe import WRITERS


def clips() -> list[np.ndarray]:
    """Different lengths: 11 s, 5 s, a much shorter 0.7 s, and 6.25 s (not a whole token)."""
    return [speech("jfk"), speech("night1968_5s"), synthetic(0.7, seed=4), speech("night1968_15s")[:100_000]]


def spans(items):
    return [(x.start, x.end, x.text) for x in items]


def same_transcription(got, expected):
    """Equal tokens, text, times, words and segments; probabilities equal up to float32 rounding
    (a batch multiplies several rows at once, and its encoder passes end elsewhere)."""
    assert got.tokens == expected.tokens
    assert (got.text, got.delay_ms, got.duration) == (expected.text, expected.delay_ms, expected.duration)
    a, b = got.token_records, expected.token_records
    assert [(r.id, r.time, r.text) for r in a] == [(r.id, r.time, r.text) for r in b]
    np.testing.assert_allclose([r.probability for r in a], [r.probability for r in b], rtol=1e-4, atol=1e-6)
    assert spans(got.words) == spans(expected.words) and spans(got.segments) == spans(expected.segments)
    np.testing.assert_allclose([w.probability for w in got.words], [w.probability for w in expected.words],
                               rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_batch_equals_one_at_a_time_with_both_rings_wrapping(small_windows_dir, delay_ms):
    model, ref = load_model(small_windows_dir), reference(small_windows_dir)
    audio = clips()
    batch = model.transcribe(audio, delay_ms=delay_ms)
    assert isinstance(batch, list) and len(batch) == len(audio)
    for x, got in zip(audio, batch):
        alone = model.transcribe(x, delay_ms=delay_ms)
        same_transcription(got, alone)
        assert len(got.tokens) == -(-x.size // 1280) + 11
        # Float32 could not have flipped an argmax: the comparison means something.
        expected, margins = ref.transcribe(x, delay_ms)
        assert got.tokens == expected and min(margins) > 1e-3
    assert len({tuple(r.tokens[:12]) for r in batch}) == len(audio)  # the rows do differ


def test_batch_equals_one_at_a_time_at_full_windows(tiny_dir):
    model = load_model(tiny_dir)
    audio = clips()
    for x, got in zip(audio, model.transcribe(audio)):
        same_transcription(got, model.transcribe(x))
        assert len(set(got.tokens)) > 3


def test_each_ring_is_allocated_once_for_recordings_of_known_length(tiny_dir, monkeypatch):
    # Offline, the longest recording's positions are known: no ring grows 256 slots at a time,
    # copying what it holds at each step (jfk, 11 s: 187 decoder positions, 748 encoder frames).
    model = load_model(tiny_dir)
    sizes = {}
    real = RingKVCache._reserve

    def reserve(self, like, size):
        real(self, like, size)
        sizes.setdefault(self, set()).add(self.keys.shape[2])

    monkeypatch.setattr(RingKVCache, "_reserve", reserve)
    alone = model.transcribe(speech("jfk"))
    model.transcribe([speech("jfk"), speech("night1968_5s")])
    positions = len(alone.tokens) + len(model.stream().prompt) - 1
    frames = positions * model.net.args.downsample_factor
    assert frames > 512 and len(sizes) == 2 * (len(model.net.layers) + len(model.net.encoder.transformer.layers))
    for cache, allocated in sizes.items():
        assert allocated == {min(cache.capacity, frames if cache.window == model.net.encoder.window else positions)}


def test_words_segments_and_alternatives_per_file(timed_dir):
    model = load_model(timed_dir)
    audio = clips()
    batch = model.transcribe(audio, alternatives=3, pause_ms=400)
    for x, got in zip(audio, batch):
        alone = model.transcribe(x, alternatives=3, pause_ms=400)
        same_transcription(got, alone)
        for r, s in zip(got.token_records, alone.token_records):
            assert [a.id for a in r.alternatives] == [a.id for a in s.alternatives]
            np.testing.assert_allclose([a.probability for a in r.alternatives],
                                       [a.probability for a in s.alternatives], rtol=1e-4, atol=1e-6)
        for fmt in ("txt", "srt", "vtt", "tsv"):
            assert WRITERS[fmt](got) == WRITERS[fmt](alone)
    assert sum(len(r.segments) for r in batch) >= 4  # there are words and segments to compare


def test_a_batch_of_one_is_the_single_run(small_windows_dir):
    model = load_model(small_windows_dir)
    x = speech("night1968_5s")
    [got] = model.transcribe([x], alternatives=2)
    # The same computation: equal to the last bit.
    assert got == model.transcribe(x, alternatives=2)


def test_batches_of_batch_size_in_input_order(small_windows_dir, monkeypatch):
    model = load_model(small_windows_dir)
    audio = clips() + [synthetic(2.0, seed=9)]
    sizes, order, texts, records = [], [], {}, {}
    real = StreamingSession.lockstep.__func__

    def lockstep(cls, net, tokenizer, audio_args, n, **kw):
        sizes.append(n)
        return real(cls, net, tokenizer, audio_args, n, **kw)

    monkeypatch.setattr(StreamingSession, "lockstep", classmethod(lockstep))
    results = model.transcribe(audio, batch_size=2, on_result=lambda i, r: order.append((i, r)),
                               on_text=lambda i, t: texts.setdefault(i, []).append(t),
                               on_token=lambda i, r: records.setdefault(i, []).append(dataclasses.replace(r)))
    assert sizes == [2, 2, 1]
    # Within a batch the shorter file is done first; batches follow the input order.
    assert [i for i, _ in order] == [1, 0, 2, 3, 4]
    assert all(results[i] is r for i, r in order)
    for i, (x, got) in enumerate(zip(audio, results)):
        same_transcription(got, model.transcribe(x))
        assert "".join(texts.get(i, [])) == got.text
        assert records[i] == got.token_records
    assert model.transcribe(tuple(audio[:2]), batch_size=8) == model.transcribe(audio[:2])


def test_finished_files_leave_the_batch(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = [speech("night1968_5s"), synthetic(0.5), speech("jfk"), synthetic(1.0, seed=2)]
    events = []
    session = StreamingSession.lockstep(model.net, model.tokenizer, model.audio, len(audio),
                                        on_token=lambda i, r: events.append(("token", i)),
                                        on_end=lambda i: events.append(("end", i, session.caches.decoder[0].keys.shape[0])))
    session.finish_batch(audio)
    ends = [e for e in events if e[0] == "end"]
    assert [e[1] for e in ends] == [1, 3, 0, 2]
    # A file's last token is read one step after the next is queued: by then it has left.
    assert [e[2] for e in ends] == [3, 2, 1, 1]
    last_token = {i: max(k for k, e in enumerate(events) if e == ("token", i)) for i in range(4)}
    assert last_token[1] < last_token[3] < last_token[0] < last_token[2]
    assert session._rows == [2] and session._buf.shape[0] == 1
    assert [len(s.tokens) for s in session.streams] == [-(-x.size // 1280) + 11 for x in audio]


def test_one_read_and_one_async_eval_per_step_for_the_whole_batch(tiny_dir, monkeypatch):
    model = load_model(tiny_dir)
    audio = [synthetic(2.0), synthetic(1.0, seed=1), synthetic(3.0, seed=2)]
    calls = []
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append(len(a)), real(*a))[1])
    results = model.transcribe(audio)
    assert len(calls) == max(len(r.tokens) for r in results)


def test_bad_inputs(small_windows_dir, tmp_path):
    model = load_model(small_windows_dir)
    with pytest.raises(voxtral_mlx.AudioError, match=r"audio\[1\]: contains no samples"):
        model.transcribe([synthetic(1.0), np.zeros(0, np.float32)])
    with pytest.raises(voxtral_mlx.AudioError, match="no such file"):
        model.transcribe([synthetic(1.0), tmp_path / "nope.wav"])
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="batch_size"):
            model.transcribe([synthetic(1.0)], batch_size=bad)
    assert model.transcribe([]) == []
    session = StreamingSession.lockstep(model.net, model.tokenizer, model.audio, 2)
    with pytest.raises(ValueError, match="finish_batch"):
        session.feed(synthetic(1.0))
    with pytest.raises(ValueError, match="one recording per stream"):
        session.finish_batch([synthetic(1.0)])


def test_paths_and_arrays_at_other_rates(small_windows_dir, tmp_path):
    model = load_model(small_windows_dir)
    x = speech("night1968_5s")
    sf.write(tmp_path / "a.flac", x, 16000)
    y = synthetic(1.5, seed=3)
    y44 = np.interp(np.arange(int(y.size * 44100 / 16000)) * 16000 / 44100, np.arange(y.size), y).astype(np.float32)
    got = model.transcribe([tmp_path / "a.flac", str(AUDIO / "jfk.wav"), y44], sample_rate=44100)
    same_transcription(got[0], model.transcribe(tmp_path / "a.flac"))
    same_transcription(got[1], model.transcribe(AUDIO / "jfk.wav"))
    same_transcription(got[2], model.transcribe(y44, sample_rate=44100))


# The command line: several files are one batch; stdout and files are what they were.

SCRIPT = Path(sys.executable).parent / "voxtral-mlx"
JFK, NIGHT = AUDIO / "jfk.wav", AUDIO / "night1968_5s.wav"


def run(*args, stdin=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100", NO_COLOR="1")
    proc = subprocess.run([str(SCRIPT), *map(str, args)], stdin=stdin or subprocess.DEVNULL, capture_output=True,
                          env=env, timeout=120)
    proc.out, proc.err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def test_cli_prints_in_input_order_whatever_finishes_first(tmp_path, timed_dir):
    model = load_model(timed_dir)
    short = tmp_path / "short.wav"
    sf.write(short, speech("jfk")[:30000], 16000)
    files = [NIGHT, JFK, short, JFK.with_name("night1968_15s.wav")]
    texts = [model.transcribe(f).text.strip() for f in files]
    assert all(texts) and len(set(texts)) == 4
    proc = run("transcribe", *files, "-m", timed_dir, "-o", tmp_path / "out", "-f", "srt", "--verbose")
    assert proc.returncode == 0 and "Traceback" not in proc.err
    assert proc.out == "".join(t + "\n" for t in texts)
    assert proc.err.count("in a batch of 4") == 4
    for f in files:
        assert (tmp_path / "out" / f"{f.stem}.srt").read_text() == WRITERS["srt"](model.transcribe(f))
    for size in ("1", "3"):
        other = run("transcribe", *files, "-m", timed_dir, "--batch-size", size)
        assert (other.returncode, other.out, other.err) == (0, proc.out, "")


def test_cli_stdin_between_files_stays_a_live_stream(timed_dir, tmp_path):
    model = load_model(timed_dir)
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 100)
    with open(NIGHT, "rb") as f:
        proc = run("transcribe", JFK, bad, "-", NIGHT, JFK, "-m", timed_dir, "--batch-size", "2", stdin=f)
    jfk, night = model.transcribe(JFK).text.strip(), model.transcribe(NIGHT).text.strip()
    assert proc.returncode == 1
    assert proc.out == f"{jfk}\n{night}\n{night}\n{jfk}\n"
    assert proc.err.startswith(f"voxtral-mlx: error: {bad}: ") and proc.err.count("\n") == 1
    assert "--batch-size" in run("transcribe", "--help").out
    assert run("transcribe", JFK, "-m", timed_dir, "--batch-size", "0").returncode == 2
