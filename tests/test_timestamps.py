"""Token records, words and segments: known token streams give known times; real runs agree
with the reference probabilities and with streaming (MODEL.md section 7)."""

import dataclasses
import math
import re

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_model, reference, speech, synthetic

from voxtral_mlx import Timeline, Transcription
from voxtral_mlx.tokenizer import Tekken

PAD, WORD, EOS = 32, 33, 2


@pytest.fixture(scope="module")
def tok(tiny_dir) -> Tekken:
    return Tekken.from_file(tiny_dir / "tekken.json")


@pytest.fixture(scope="module")
def ids(tok):
    by_bytes = {tok.token_bytes(i): i for i in range(tok.n_special, tok.vocab_size)}

    def ids(*pieces):
        return [p if isinstance(p, int) else by_bytes[p.encode() if isinstance(p, str) else p] for p in pieces]
    return ids


def timeline(tok, tokens, pause_ms=None, probabilities=None):
    return Timeline.from_tokens(tokens, tok, 80.0, probabilities=probabilities, pause_ms=pause_ms)


def spans(items):
    return [(x.start, x.end, x.text) for x in items]


def test_markers_and_pads_give_word_and_segment_times(tok, ids):
    tokens = ids(PAD, PAD, WORD, " ask", PAD,           # 0-4
                 WORD, " not", PAD, PAD,                # 5-8
                 WORD, " what", ".", PAD, PAD, PAD,     # 9-14
                 WORD, " the", PAD)                     # 15-17
    probabilities = [0.5] * 10 + [0.9, 0.7] + [0.5] * 6
    t = timeline(tok, tokens, probabilities=probabilities)
    # A word ends where the next one starts; the last of a segment where its text stops.
    assert spans(t.words) == [(0.16, 0.4, " ask"), (0.4, 0.72, " not"), (0.72, 0.96, " what."), (1.2, 1.36, " the")]
    assert spans(t.segments) == [(0.16, 0.96, " ask not what."), (1.2, 1.36, " the")]
    assert t.segments[0].words == t.words[:3] and t.segments[1].words == t.words[3:]
    assert t.words[2].probability == pytest.approx(0.8)
    assert [r.time for r in t.records] == [k * 80 / 1000 for k in range(len(tokens))]
    assert [r.id for r in t.records] == tokens
    assert t.records[2].text == "[STREAMING_WORD]" and t.records[3].text == " ask"
    assert t.text == " ask not what. the"


def test_a_pause_longer_than_the_threshold_ends_a_segment(tok, ids):
    five, six = [PAD] * 5, [PAD] * 6
    tokens = ids(" ask", *five, " not", *six, "ask", PAD)
    t = timeline(tok, tokens, pause_ms=400)
    # 5 pads = 400 ms is not longer than 400 ms; 6 pads are. Text after a pause starts a word.
    assert spans(t.segments) == [(0.0, 0.56, " ask not"), (1.04, 1.12, "ask")]
    assert spans(t.words) == [(0.0, 0.48, " ask"), (0.48, 0.56, " not"), (1.04, 1.12, "ask")]
    assert len(timeline(tok, tokens, pause_ms=480).segments) == 1
    assert len(timeline(tok, tokens).segments) == 1  # default 1000 ms
    assert len(timeline(tok, ids(" ask", PAD, " not"), pause_ms=0).segments) == 2
    assert len(timeline(tok, ids(" ask", " not"), pause_ms=0).segments) == 1


def test_word_boundaries_from_markers_and_leading_spaces(tok, ids):
    tokens = ids(WORD, "h", "e", PAD, "l", "l", "o", " world", PAD, WORD, PAD, " so", " my", " fellow", PAD)
    t = timeline(tok, tokens)
    # Text without a marker or a space continues its word, pads or not; a marker may start a
    # group of words, each later one starting at its own token.
    assert spans(t.words) == [(0.0, 0.56, "hello"), (0.56, 0.72, " world"), (0.72, 0.96, " so"),
                              (0.96, 1.04, " my"), (1.04, 1.12, " fellow")]
    assert spans(t.segments) == [(0.0, 1.12, "hello world so my fellow")]


def test_first_marker_since_text_starts_the_word(tok, ids):
    t = timeline(tok, ids(" ask", PAD, WORD, PAD, WORD, "not", PAD))
    assert spans(t.words) == [(0.0, 0.16, " ask"), (0.16, 0.48, "not")]
    # A marker that no text follows starts nothing; the word before ends where its text stops.
    t = timeline(tok, ids(" ask", PAD, PAD, WORD, PAD))
    assert spans(t.words) == [(0.0, 0.08, " ask")] and spans(t.segments) == [(0.0, 0.08, " ask")]


def test_trailing_space_and_whitespace_tokens(tok, ids):
    t = timeline(tok, ids(" the", ". ", "the", PAD, " ", PAD, "the", PAD))
    # ". " ends a sentence and a word; " " alone makes no word: it leads the next one.
    assert spans(t.words) == [(0.0, 0.16, " the. "), (0.16, 0.32, "the"), (0.32, 0.56, " the")]
    assert spans(t.segments) == [(0.0, 0.16, " the. "), (0.16, 0.56, "the the")]


@pytest.mark.parametrize("end", ["?", "!!", ".", "?\"", ".)", "。", "！"])
def test_sentence_ends(tok, ids, end):
    pieces = ["!!"] if end == "!!" else [bytes([b]) for b in end.encode()]  # one byte per token
    t = timeline(tok, ids(" ask", *pieces, " not"))
    assert [s.text for s in t.segments] == [" ask" + end, " not"]


def test_eos_ends_the_segment_and_text_after_it_is_kept(tok, ids):
    t = timeline(tok, ids(WORD, " ask", PAD, EOS, PAD, WORD, "not", " you", PAD))
    assert spans(t.segments) == [(0.0, 0.16, " ask"), (0.4, 0.64, "not you")]
    assert spans(t.words)[1:] == [(0.4, 0.56, "not"), (0.56, 0.64, " you")]


def test_characters_split_across_tokens_belong_to_the_word_that_completes_them(tok, ids):
    euro = "\u20ac".encode()
    t = timeline(tok, ids(" ask", euro[:2], PAD, WORD, euro[2:], " not", b"\xf0\x9f"))
    assert [w.text for w in t.words] == [" ask", "\u20ac", " not\ufffd"]
    assert "".join(w.text for w in t.words) == t.text == tok.decode(t.records[i].id for i in range(7))


def test_padding_is_left_out_of_the_times(tok, ids):
    t = Timeline(tok, 80.0)
    t.skip(0.3, 0.34)  # a flush's padding: from mid-token 3 to the grid's 0.64 s
    t.skip(0.64, 0.16)  # continues it, to 0.8 s
    t.skip(1.2, math.inf)  # the end of the audio: 0.3 + 0.4 s
    tokens = ids(WORD, " ask", PAD, PAD, " not", PAD, PAD, PAD,   # 0-7: " not" decoded in the padding
                 PAD, PAD, " what", PAD, PAD, PAD, " you", PAD, PAD)  # 8-16: " you" after the end
    for token in tokens:
        t.push(token, 0.5)
    t.close()
    grid = [round(k * 0.08, 6) for k in range(len(tokens))]
    # In the padding: the end of the audio before it; after it: 0.5 s earlier.
    expected = [g if g < 0.3 else 0.3 if g < 0.8 else round(g - 0.5, 6) if g < 1.2 else 0.7 for g in grid]
    assert [r.time for r in t.records] == expected
    assert expected[:5] == [0.0, 0.08, 0.16, 0.24, 0.3] and expected[10:] == [0.3, 0.38, 0.46, 0.54, 0.62, 0.7, 0.7]
    # " ask" ends where " not" starts; " not" ends (token 5) in the padding, " you" after the end.
    assert spans(t.words) == [(0.0, 0.3, " ask"), (0.3, 0.3, " not"), (0.3, 0.62, " what"), (0.62, 0.7, " you")]
    assert [s.span for s in t.segments] == [range(0, 15)]
    assert max(r.time for r in t.records) == 0.7
    with pytest.raises(ValueError, match="a skipped stretch needs a start and length of 0 or more, not -1, 1"):
        t.skip(-1, 1)


def test_segment_spans_are_the_indices_of_their_tokens(tok, ids):
    t = timeline(tok, ids(PAD, WORD, " ask", " not", ". ", PAD, " ", EOS, WORD, " what", PAD, PAD, " ", EOS))
    assert [(s.text, s.span) for s in t.segments] == [(" ask not. ", range(1, 5)), (" what", range(8, 12))]


def test_empty_and_silent_streams(tok):
    for tokens in ([], [PAD] * 30, [WORD, PAD, WORD, PAD, EOS]):
        t = timeline(tok, tokens)
        assert t.words == [] and t.segments == [] and t.text == "" and len(t.records) == len(tokens)


@pytest.mark.parametrize("pause", [-1, float("nan"), "600", True])
def test_pause_must_be_a_number_not_negative(tok, pause):
    with pytest.raises(ValueError, match=re.escape(f"pause_ms must be 0 or more, not {pause!r}")):
        Timeline(tok, 80.0, pause_ms=pause)


@pytest.mark.parametrize("delay", ["480", 500, float("nan"), [480]])
def test_a_delay_of_another_type_is_a_clear_error(tiny_dir, delay):
    with pytest.raises(ValueError, match=re.escape(f"a delay of {delay!r} ms is not one the model was trained for; "
                                                   "use 80..1200 in steps of 80, or 2400")):
        load_model(tiny_dir).stream(delay_ms=delay)


def check_timeline(result, token_s=0.08, ends=()):
    """`ends`: where audio ended before padding (flush), besides the end of the recording."""
    words, segments = result.words, result.segments
    ends = {*ends, result.duration}
    assert words and segments
    for w in words:
        # A word decoded in padding is at the end of the audio before it.
        assert 0 <= w.start <= w.end <= result.duration and w.text.strip() and 0 < w.probability <= 1
        assert w.start < w.end or w.end in ends
    for a, b in zip(words, words[1:]):
        assert a.end <= b.start
    for a, b in zip(segments, segments[1:]):
        assert a.end <= b.start
    for s in segments:
        assert (s.start, s.end) == (s.words[0].start, s.words[-1].end)
        assert s.text == "".join(w.text for w in s.words)
    assert "".join(s.text for s in segments) == result.text
    records = result.token_records
    assert [r.id for r in records] == result.tokens
    if not ends - {result.duration}:
        assert [r.time for r in records] == [min(k * 80 / 1000, result.duration) for k in range(len(records))]
    # Every word starts at a marker or at a text token, and ends where audio ended or at a token
    # boundary (of the grid that starts at 0, or after a flush, at the end of the audio before it).
    starts = {r.time for r in records if r.id == 33 or r.id >= 1000}
    assert all(w.start in starts for w in words)
    assert all(w.end in ends or any(round((w.end - e) / token_s, 6) == round((w.end - e) / token_s)
                                    for e in {0, *ends}) for w in words)


@pytest.mark.parametrize("name", ["jfk", "night1968_5s"])
def test_real_runs_give_monotone_non_overlapping_times(timed_dir, name):
    result = load_model(timed_dir).transcribe(speech(name), pause_ms=400)
    check_timeline(result)
    tokens = result.tokens
    if name == "jfk":
        # The fixture makes the model emit what the rules are about.
        assert tokens.count(32) > 10 and tokens.count(33) > 3 and sum(t >= 1000 for t in tokens) > 30
        assert len(result.segments) >= 2 and len(result.words) > 10
        default = load_model(timed_dir).transcribe(speech(name))
        check_timeline(default)
        assert default.tokens == tokens and len(default.segments) <= len(result.segments)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_probabilities_and_alternatives_match_the_reference_softmax(timed_dir):
    audio = speech("jfk")[:40000]
    ref = reference(timed_dir)
    expected, margins = ref.transcribe(audio)
    embeds = ref.audio_embeddings(audio, 480)
    prompt = ref.prompt(480)
    # Logits of every generated position, from the reference with the generated tokens fed back.
    logits = ref.decoder_logits(embeds, prompt + expected[:-1], 480)[len(prompt) - 1 :]
    probs = softmax(logits)
    k = 5
    result = load_model(timed_dir).transcribe(audio, alternatives=k)
    assert result.tokens == expected and min(margins) > 1e-3
    for i, r in enumerate(result.token_records):
        assert r.probability == pytest.approx(probs[i, r.id], abs=2e-4)
        top = [a.id for a in r.alternatives]
        assert len(top) == k and top[0] == r.id and len(set(top)) == k
        alt = np.array([a.probability for a in r.alternatives])
        assert np.all(np.diff(alt) <= 1e-7)
        np.testing.assert_allclose(alt, probs[i, top], atol=2e-4)
        order = np.sort(probs[i])[::-1]
        np.testing.assert_allclose(alt, order[:k], atol=2e-4)  # these are the k most probable
        rest = 1.0 - probs[i, top].sum()
        assert alt.sum() + rest == pytest.approx(1.0, abs=1e-3) and alt.sum() <= 1 + 1e-5
        assert r.alternatives[0].text == r.text


def test_alternatives_only_when_asked_and_tokens_unchanged(small_windows_dir):
    model = load_model(small_windows_dir)
    audio = speech("night1968_5s")
    expected, margins = reference(small_windows_dir).transcribe(audio, 480)
    plain = model.transcribe(audio)
    assert plain.tokens == expected and min(margins) > 1e-3
    assert all(r.alternatives is None for r in plain.token_records)
    assert all("alternatives" not in t for t in plain.to_dict()["tokens"])
    asked = model.transcribe(audio, alternatives=3)
    assert asked.tokens == expected and asked.text == plain.text
    assert all(len(r.alternatives) == 3 for r in asked.token_records)
    assert [r.probability for r in asked.token_records] == [r.probability for r in plain.token_records]
    whole = model.transcribe(audio[:8000], alternatives=10**9)  # capped at the vocabulary
    assert len(whole.token_records[0].alternatives) == model.net.args.decoder.vocab_size
    assert sum(a.probability for a in whole.token_records[0].alternatives) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="alternatives"):
        model.stream(alternatives=-1)


def test_one_async_eval_per_decoded_token(tiny_dir, monkeypatch):
    model = load_model(tiny_dir)
    calls = []
    real = mx.async_eval
    monkeypatch.setattr(mx, "async_eval", lambda *a: (calls.append(len(a)), real(*a))[1])
    result = model.transcribe(synthetic(2.0), alternatives=2)
    assert len(calls) == len(result.tokens) and set(calls) == {2}


def same_records(a, b):
    """Equal ids, times, texts; probabilities equal up to float32 rounding of other chunkings."""
    assert [(r.id, r.time, r.text) for r in a] == [(r.id, r.time, r.text) for r in b]
    np.testing.assert_allclose([r.probability for r in a], [r.probability for r in b], rtol=1e-4, atol=1e-6)


def same_words(a, b):
    assert spans(a) == spans(b)
    np.testing.assert_allclose([w.probability for w in a], [w.probability for w in b], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("size", [1280, 999, 4000])
def test_streaming_records_equal_offline_and_are_final_when_given(timed_dir, size):
    model = load_model(timed_dir)
    audio = speech("jfk")
    offline = model.transcribe(audio, pause_ms=400)
    got = {"token": [], "word": [], "segment": []}
    snap = dataclasses.replace
    session = model.stream(pause_ms=400, on_token=lambda r: got["token"].append(snap(r)),
                           on_word=lambda w: got["word"].append(snap(w)),
                           on_segment=lambda s: got["segment"].append(snap(s, words=list(s.words))))
    seen_words = []
    for start in range(0, audio.size, size):
        session.feed(audio[start : start + size])
        new = session.words[len(seen_words):]
        seen_words += [snap(w) for w in new]
        if start + size >= audio.size * 0.6 and not got["segment"]:
            pytest.fail("no segment was final before the end of the audio")
    words_before_finish = len(session.words)
    session.finish()
    assert session.tokens == offline.tokens and session.text == offline.text
    same_records(session.token_records, offline.token_records)
    same_records(got["token"], offline.token_records)
    same_words(session.words, offline.words)
    same_words(got["word"], offline.words)
    same_words(seen_words, offline.words[: len(seen_words)])  # final when given: never changed later
    assert 0 < words_before_finish < len(offline.words) + 1
    assert [(s.start, s.end, s.text) for s in got["segment"]] == spans(offline.segments)
    assert [spans(s.words) for s in got["segment"]] == [spans(s.words) for s in offline.segments]


def test_flush_ends_the_segment(timed_dir):
    model = load_model(timed_dir)
    a1, a2 = speech("jfk")[:60000], speech("night1968_5s")
    session = model.stream(pause_ms=math.inf)
    session.feed(a1)
    session.flush()
    first, n_flushed = list(session.segments), len(session.tokens)
    assert first and sum(len(s.words) for s in first) == len(session.words)  # nothing left open
    session.feed(a2)
    session.finish()
    check_timeline(Transcription.from_session(session), ends=[a1.size / 16000])
    assert session.segments[: len(first)] == first and len(session.segments) > len(first)
    # Later words are made of later tokens only; their times go on from the end of a1: the
    # flush's padding (a1 to a whole token, then the delay's 6 and 11 more) is left out.
    assert first[-1].end <= 3.75 <= session.segments[len(first)].start
    assert n_flushed == 47 + 10  # (the rest of the padding's tokens come with the next audio)
    gap_end, end = 3.76 + 17 * 0.08, 3.75 + a2.size / 16000
    expected = [g if g < 3.75 else 3.75 if g < gap_end else g - (gap_end - 3.75) for g in
                (k * 0.08 for k in range(len(session.tokens)))]
    assert [r.time for r in session.token_records] == pytest.approx([min(t, end) for t in expected], abs=1e-9)
    assert session.token_records[-1].time == end and session.segments[-1].end <= end
