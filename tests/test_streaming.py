"""Streaming: any chunking gives exactly the offline tokens (MODEL.md section 8)."""

import re

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_mlx, load_model, reference, speech, synthetic

import voxtral_mlx
from voxtral_mlx.config import AudioArgs


def stream_tokens(model, audio, sizes, delay_ms=None, **kw):
    session = model.stream(delay_ms=delay_ms, **kw)
    text, start, i = "", 0, 0
    while start < audio.size:
        n = sizes[i % len(sizes)]
        text += session.feed(audio[start : start + n])
        start += n
        i += 1
    text += session.finish()
    return session.tokens, text


def random_sizes(seed, high=5000):
    return list(np.random.default_rng(seed).integers(1, high, 200))


@pytest.mark.parametrize("sizes", [[7], [159], [160], [161], [399], [1280], [1281], [4000], [10**9],
                                   random_sizes(0), random_sizes(1, 300)],
                         ids=lambda s: f"random{len(set(s))}" if len(s) > 1 else str(s[0]))
@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_any_chunking_equals_offline_with_both_rings_wrapping(small_windows_dir, sizes, delay_ms):
    model = load_model(small_windows_dir)
    audio = speech("night1968_5s")
    offline = model.transcribe(audio, delay_ms=delay_ms)
    tokens, text = stream_tokens(model, audio, sizes, delay_ms)
    assert tokens == offline.tokens
    assert text == offline.text
    assert min(reference(small_windows_dir).transcribe(audio, delay_ms)[1]) > 1e-3


def test_one_sample_at_a_time(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = synthetic(1.5)
    expected, margins = reference(small_windows_dir).transcribe(audio, 480)
    tokens, _ = stream_tokens(model, audio, [1])
    assert tokens == expected and min(margins) > 1e-3


def test_real_speech_at_full_windows_in_random_chunks(tiny_dir):
    model = load_model(tiny_dir)
    audio = speech("jfk")
    tokens, text = stream_tokens(model, audio, random_sizes(7))
    offline = model.transcribe(audio)
    assert tokens == offline.tokens and text == offline.text


def test_tokens_come_out_as_soon_as_their_audio_is_in(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = speech("jfk")
    session = model.stream()
    pieces = []
    for k, start in enumerate(range(0, audio.size, 1280), start=1):
        pieces.append(session.feed(audio[start : start + 1280]))
        if start + 1280 <= audio.size:
            # Token t needs its 1280 samples plus 40 of look-ahead, and comes n_delay tokens late.
            assert len(session.tokens) == max(0, k - 1 - session.n_delay)
    pieces.append(session.finish())
    assert len(session.tokens) == -(-audio.size // 1280) + 11
    assert "".join(pieces) == model.transcribe(audio).text
    assert sum(p != "" for p in pieces[:-1]) > 10


def test_flush_continues_on_the_same_timeline(small_windows_dir):
    model = load_model(small_windows_dir)
    a1, a2 = speech("night1968_5s")[:50000], synthetic(2.0, seed=5)
    session = model.stream()
    text1 = session.feed(a1) + session.flush()
    after_flush = list(session.tokens)
    text2 = session.feed(a2) + session.finish()
    pad = np.zeros(-a1.size % 1280 + (session.n_delay + 11) * 1280, np.float32)
    offline = model.transcribe(np.concatenate([a1, pad, a2]))
    assert session.tokens == offline.tokens
    assert text1 + text2 == offline.text
    # Everything up to the padding's last token is out after flush().
    assert after_flush == offline.tokens[: -(-a1.size // 1280) + 10]
    assert text1 == model.tokenizer.decode(after_flush)


def test_flush_then_finish_equals_finish(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = speech("night1968_5s")
    session = model.stream()
    session.feed(audio)
    session.flush()
    assert session.flush() == ""  # nothing new to flush
    session.finish()
    assert session.tokens == model.transcribe(audio).tokens


def test_session_lifecycle(tiny_dir):
    model = load_model(tiny_dir)
    with model.stream() as session:
        session.feed(np.zeros(100, np.float32))
    assert session.finished and len(session.tokens) == 12
    with pytest.raises(voxtral_mlx.SessionClosed, match="start a new one"):
        session.feed(np.zeros(10, np.float32))
    empty = model.stream()
    assert empty.finish() == "" and empty.tokens == []
    with pytest.raises(voxtral_mlx.AudioError, match="1-D"):
        model.stream().feed(np.zeros((2, 2, 2), np.float32))


def test_finish_after_the_with_block_returns_its_text(tiny_dir):
    model = load_model(tiny_dir)
    audio = speech("jfk")[: 3 * 16000]
    offline = model.transcribe(audio)
    with model.stream() as session:
        fed = session.feed(audio)
    assert session.finished and session.tokens == offline.tokens
    rest = session.finish()  # the text that leaving the block decoded, as the README's example prints it
    assert rest and fed + rest == offline.text
    assert session.finish() == ""  # given once
    with model.stream() as again:
        again.feed(audio)
        assert again.finish() == rest  # inside the block, as before
    assert again.finish() == ""


@pytest.mark.parametrize("interval", [-1, float("inf"), float("nan"), "80"])
def test_bad_interval_is_refused(tiny_dir, interval):
    with pytest.raises(ValueError, match=re.escape(f"interval_ms must be a number of milliseconds from 0, "
                                                   f"not {interval!r}")):
        load_model(tiny_dir).stream(interval_ms=interval)


def test_interval_batches_work_without_changing_tokens(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = speech("night1968_5s")
    session = model.stream(interval_ms=800)
    counts = []
    for i in range(0, audio.size, 1280):
        session.feed(audio[i : i + 1280])
        counts.append(len(session.tokens))
    session.finish()
    assert session.tokens == model.transcribe(audio).tokens
    # The model runs only once ten tokens of audio are ready: tokens arrive in batches of 10.
    steps = [b - a for a, b in zip(counts, counts[1:]) if b != a]
    assert steps and all(s >= 10 for s in steps[1:])


def without_left_pad_state(model, audio, monkeypatch, **kw):
    """`transcribe` computing every token, those that hear only the left pad included."""
    with monkeypatch.context() as m:
        m.setattr(AudioArgs, "pad_only_tokens", property(lambda self: 0))
        return model.transcribe(audio, **kw)


def test_sessions_start_from_the_left_pads_state_computed_once(small_windows_dir, monkeypatch):
    # The first 31 tokens hear only the left pad: a model computes their state once per delay
    # and every new session copies it, here with both rings past their windows (24 encoder
    # frames, 20 decoder positions) by then.
    model = load_mlx(small_windows_dir)
    audio = speech("night1968_5s")
    mel_frames, real = [], model.net.encode
    monkeypatch.setattr(model.net, "encode", lambda mel, caches: (mel_frames.append(mel.shape[-2]),
                                                                  real(mel, caches))[1])
    whole = without_left_pad_state(model, audio, monkeypatch)
    assert model.net.snapshots.nbytes == 0
    n, everything = model.audio.pad_only_tokens, sum(mel_frames)
    assert n == 31
    for run in range(3):
        mel_frames.clear()
        got = model.transcribe(audio, delay_ms=80 if run == 2 else None)
        # The first run encodes the pad's tokens alone (then keeps their state); the second copies it.
        assert mel_frames[0] == 8 * n if run != 1 else sum(mel_frames) == everything - 8 * n
        if run < 2:
            assert got.tokens == whole.tokens and got.text == whole.text
            np.testing.assert_allclose([r.probability for r in got.token_records],
                                       [r.probability for r in whole.token_records], rtol=1e-5)
    expected, margins = reference(small_windows_dir).transcribe(audio, 80)
    assert got.tokens == expected and min(margins) > 1e-3
    # One state per delay: the caches' (two layers each) and the conv stem's, one batch row.
    per_delay = model.net.snapshots.nbytes / 2
    enc, dec = model.net.args.encoder, model.net.args.decoder
    assert per_delay == 4 * (2 * 2 * 24 * enc.n_kv_heads * enc.head_dim + 2 * 2 * 20 * dec.n_kv_heads * dec.head_dim
                             + 2 * enc.audio_encoding_args.num_mel_bins + enc.dim)


def test_prepare_computes_the_left_pads_state_before_any_audio(small_windows_dir, monkeypatch):
    # What live captions do before they listen: a session's audio then encodes only what it
    # heard, and the tokens are those of an unprepared model.
    n = 31
    runs = []
    for prepared in (False, True):
        model = load_mlx(small_windows_dir)
        mel_frames, real = [], model.net.encode
        monkeypatch.setattr(model.net, "encode", lambda mel, caches, real=real, frames=mel_frames:
                            (frames.append(mel.shape[-2]), real(mel, caches))[1])
        if prepared:
            model.prepare()
            assert mel_frames == [8 * n] and model.net.snapshots.nbytes > 0
            one = model.net.snapshots.nbytes
            model.prepare()  # kept: nothing computed again
            assert len(mel_frames) == 1
            mel_frames.clear()
        runs.append((model.transcribe(speech("night1968_5s")).tokens, list(mel_frames)))
    (want, unprepared), (got, frames) = runs
    assert got == want and unprepared[0] == 8 * n and frames == unprepared[1:]
    model.prepare(delay_ms=80)  # another delay: another state
    assert model.net.snapshots.nbytes == 2 * one


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e6


def test_thirty_minutes_in_bounded_memory_equal_offline(small_windows_dir):
    model = load_model(small_windows_dir)
    minute = 60 * 16000
    base = synthetic(7.3, seed=2)
    audio = np.concatenate([np.roll(base, i * 977)[:4000] for i in range(30 * minute // 4000)])
    session = model.stream()
    rss, cached = [], []
    for start in range(0, audio.size, 4000):
        session.feed(audio[start : start + 4000])
        cached.append(mx.get_cache_memory())
        if (start + 4000) % minute == 0:
            rss.append(rss_mb())
    session.finish()
    assert len(rss) == 30
    # MLX's buffer cache is emptied every 10 s of audio and at the end: it holds no more than
    # the activations of those 10 s (about 4 MB at this size), and nothing once finished.
    assert max(cached) < 8 * 2**20 and mx.get_cache_memory() == 0
    # Bound: after the first minute, resident memory grows by less than 16 MB over 29 minutes
    # (the tokens, their records and the words take about 5 MB); the rings hold exactly their windows.
    assert max(rss[1:]) - rss[0] < 16, rss
    # (the encoder's plus the spare slots of a chunk, on the CPU kernels' path)
    assert all(c.window == 24 and c.keys.shape[2] == 24 + c.spare for c in session.caches.encoder)
    assert all(c.keys.shape[2] == 20 for c in session.caches.decoder)
    assert session._buf.size < 2 * 1280
    offline = model.transcribe(audio)
    assert len(session.tokens) == 30 * minute // 1280 + 11
    assert session.tokens == offline.tokens


def fed_alone(model, audio, size, delay_ms):
    session = model.stream(delay_ms=delay_ms)
    for start in range(0, audio.size, size):
        session.feed(audio[start : start + size])
    session.finish()
    return session


@pytest.mark.parametrize("graphs", [False, True], ids=["host", "mlx-graphs"])
def test_sessions_fed_together_decode_as_one_batch_with_their_own_tokens(small_windows_dir, graphs, monkeypatch):
    # Three sessions at delays of their own, started at different times, fed chunks of their own
    # sizes; one speculates. Rings of the small windows wrap.
    model = load_model(small_windows_dir)
    if graphs:
        monkeypatch.setattr(voxtral_mlx.host, "fits", lambda *a: False)
    clips = [speech("jfk"), speech("night1968_5s"), synthetic(4.0, seed=3)]
    sizes, delays = [3000, 2000, 2560], [480, 240, 960]
    alone = [fed_alone(model, x, n, d) for x, n, d in zip(clips, sizes, delays)]
    sessions = [model.stream(delay_ms=d, speculate=8 * (i == 0)) for i, d in enumerate(delays)]
    text = [sessions[0].feed(clips[0][:20000]), "", ""]  # the first is 1.25 s ahead
    at = [20000, 0, 0]
    rows = []
    real = model.net.decode_rows
    monkeypatch.setattr(model.net, "decode_rows", lambda *a: (rows.append(a[0].shape[0]), real(*a))[1])
    while any(a < x.size for a, x in zip(at, clips)):
        turn = [i for i in range(3) if at[i] < clips[i].size]
        got = voxtral_mlx.feed_together([sessions[i] for i in turn], [clips[i][at[i] : at[i] + sizes[i]] for i in turn])
        for i, t in zip(turn, got):
            text[i] += t
            at[i] += sizes[i]
    for i, s in enumerate(sessions):
        text[i] += s.finish()
        assert s.tokens == alone[i].tokens and text[i] == alone[i].text, i
        assert [(r.id, r.time) for r in s.token_records] == [(r.id, r.time) for r in alone[i].token_records]
        got, want = [r.probability for r in s.token_records], [r.probability for r in alone[i].token_records]
        if graphs or i == 0:  # (the first is fed in other chunks than alone, and speculates)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
        else:
            assert got == want  # the bits of each session's own steps
    # Steps of three sessions, and of two while one is in its prompt or done.
    assert set(rows) == {2, 3} and rows.count(3) > 20 and sum(rows) > 0.5 * sum(len(s.tokens) for s in sessions)


def test_sessions_fed_together_are_checked_before_any_is_fed(tiny_dir, small_windows_dir):
    model = load_model(tiny_dir)
    a, b = model.stream(), model.stream()
    a.feed(synthetic(0.5))
    n = a.audio_seconds
    with pytest.raises(ValueError, match="feed_together takes one chunk per session, got 1 for 2"):
        voxtral_mlx.feed_together([a, b], [synthetic(0.2)])
    with pytest.raises(ValueError, match="feed_together takes each session once"):
        voxtral_mlx.feed_together([a, a], [synthetic(0.2)] * 2)
    with pytest.raises(ValueError, match="feed_together takes sessions of one model"):
        voxtral_mlx.feed_together([a, load_model(small_windows_dir).stream()], [synthetic(0.2)] * 2)
    with pytest.raises(voxtral_mlx.AudioError, match=r"chunks\[1\]"):
        voxtral_mlx.feed_together([a, b], [synthetic(0.2), np.array([0.1, np.nan], np.float32)])
    lockstep = voxtral_mlx.StreamingSession.lockstep(model.net, model.tokenizer, model.audio, 2)
    with pytest.raises(ValueError, match="a session of several streams is fed by finish_batch"):
        voxtral_mlx.feed_together([a, lockstep], [synthetic(0.2)] * 2)
    b.finish()
    with pytest.raises(voxtral_mlx.SessionClosed):
        voxtral_mlx.feed_together([a, b], [synthetic(0.2)] * 2)
    assert a.audio_seconds == n and not a.finished  # nothing was fed
    assert voxtral_mlx.feed_together([], []) == []


def test_flushes_and_ends_decode_together_with_other_sessions_audio(small_windows_dir, monkeypatch):
    model = load_model(small_windows_dir)
    a_audio, b_audio = speech("jfk")[:96000], speech("night1968_5s")
    # a: six turns of audio, a flush, two more, a flush (with b's end), one with nothing new to
    # flush, its end; b: audio, then its end, then ends of a finished session. Alone, the same calls.
    a_ops = [("feed", a_audio[i * 12000 : (i + 1) * 12000]) for i in range(6)] + [("flush",)] + [
        ("feed", a_audio[i * 12000 : (i + 1) * 12000]) for i in range(6, 8)] + [("flush",), ("flush",), ("finish",)]
    b_ops = [("feed", b_audio[i * 8000 : (i + 1) * 8000]) for i in range(9)] + [("finish",)] * 3
    alone = []
    for ops in (a_ops, b_ops):
        session, text = model.stream(delay_ms=480), []
        for op in ops:
            text.append(getattr(session, op[0])(*op[1:]))
        alone.append((session, text))
    a, b = model.stream(delay_ms=480), model.stream(delay_ms=480)
    rows = []
    real = model.net.decode_rows
    monkeypatch.setattr(model.net, "decode_rows", lambda *x: (rows.append(x[0].shape[0]), real(*x))[1])
    texts = [[], []]
    for turn, (op_a, op_b) in enumerate(zip(a_ops, b_ops)):
        before = len(rows)
        got = voxtral_mlx.streaming.advance_together([a, b], [op_a, op_b])
        texts[0].append(got[0])
        texts[1].append(got[1])
        if turn == 6:  # a's flush (17 tokens of padding), with b's audio (6 tokens)
            assert len(rows) - before == 6
        if turn == 9:  # a's flush with b's end (17 tokens of padding each)
            assert len(rows) - before >= 16
        if turn == 11:  # a's end after its flush (a token) beside a finished session
            assert len(rows) == before
    for session, text, (want, want_text) in zip((a, b), texts, alone):
        assert session.tokens == want.tokens and text == want_text and session.finished
        assert [(w.start, w.end, w.text) for w in session.words] == [(w.start, w.end, w.text) for w in want.words]
        assert [r.probability for r in session.token_records] == pytest.approx(
            [r.probability for r in want.token_records], rel=1e-4, abs=1e-6)
    assert texts[0][10] == "" and texts[1][10:] == ["", ""]  # nothing new to flush; finished already
    with pytest.raises(ValueError, match="advance_together takes one operation per session: feed, flush or finish"):
        voxtral_mlx.streaming.advance_together([a], [("close",)])


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_sessions_advanced_together_in_random_turns_keep_their_own_results(small_windows_dir, seed):
    # Two to four sessions at random delays, speculating or not, starting late, idle some turns,
    # fed chunks of 0 samples to 20000, flushed at random (twice in a row too) and finished
    # (twice, sometimes): the same tokens, text, times and words as each alone.
    model = load_model(small_windows_dir)
    rng = np.random.default_rng(seed)
    clips = [speech("jfk")[:60000], speech("night1968_5s")[:50000], synthetic(3.0, seed=3),
             np.zeros(20000, np.float32), synthetic(0.3, seed=5)]
    plans = []
    for _ in range(rng.integers(2, 5)):
        clip, ops, at = clips[rng.integers(len(clips))], [None] * int(rng.integers(0, 3)), 0
        while at < clip.size:
            r = rng.random()
            if r < 0.15:
                ops.append(("flush",) if r < 0.1 else None)
            else:
                n = int(rng.choice([0, 1, 7, 1280, 1281, 3000, 8000, 20000]))
                ops.append(("feed", clip[at : at + n]))
                at += n
        ops += [("finish",)] * int(rng.integers(1, 3))
        plans.append((int(rng.choice([80, 480, 960, 2400])), int(rng.choice([0, 4, 8])), ops))
    alone = []
    for delay, speculate, ops in plans:
        session = model.stream(delay_ms=delay, speculate=speculate)
        alone.append((session, "".join(getattr(session, op[0])(*op[1:]) for op in ops if op)))
    sessions = [model.stream(delay_ms=delay, speculate=speculate) for delay, speculate, _ in plans]
    texts = [""] * len(plans)
    for turn in range(max(len(ops) for *_, ops in plans)):
        now = [i for i, (*_, ops) in enumerate(plans) if turn < len(ops) and ops[turn]]
        got = voxtral_mlx.streaming.advance_together([sessions[i] for i in now], [plans[i][2][turn] for i in now])
        for i, text in zip(now, got):
            texts[i] += text
    assert len({delay for delay, *_ in plans}) > 1 and any(op and op[0] == "flush" for *_, ops in plans for op in ops)
    for session, text, (want, want_text) in zip(sessions, texts, alone):
        assert session.finished and session.tokens == want.tokens and text == want_text
        assert [(r.id, r.time) for r in session.token_records] == [(r.id, r.time) for r in want.token_records]
        assert [(w.start, w.end, w.text) for w in session.words] == [(w.start, w.end, w.text) for w in want.words]
        # (a speculating session's passes alone take several positions, together one: other bits)
        np.testing.assert_allclose([r.probability for r in session.token_records],
                                   [r.probability for r in want.token_records], rtol=1e-4, atol=1e-6)
