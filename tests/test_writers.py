"""Output formats: golden text for each writer, and a JSON round trip."""

import json
import re

import pytest

from conftest import load_model, speech

from voxtral_mlx import FORMATS, Alternative, Segment, TokenRecord, Transcription, Word, write_outputs
from voxtral_mlx.transcribe import subtitle_cues, to_json, to_srt, to_tsv, to_txt, to_vtt


def made_up() -> Transcription:
    w = [Word(0.16, 0.4, " Ask", 0.9), Word(0.4, 1.2, " not <what> & -->", 0.5),
         Word(3661.5, 3662.08, " 中文\ttab", 0.25), Word(3662.08, 3662.16, "\n\nnext line", 1.0)]
    segments = [Segment(0.16, 1.2, " Ask not <what> & -->", w[:2]),
                Segment(3661.5, 3662.16, " 中文\ttab\n\nnext line", w[2:])]
    records = [TokenRecord(33, "[STREAMING_WORD]", 0.0, 0.75),
               TokenRecord(1100, " Ask", 0.08, 0.5,
                           [Alternative(1100, " Ask", 0.5), Alternative(32, "[STREAMING_PAD]", 0.25)])]
    text = "".join(s.text for s in segments)
    return Transcription(text=text, tokens=[r.id for r in records], delay_ms=480, duration=3663.0,
                         segments=segments, token_records=records)


def empty() -> Transcription:
    return Transcription(text="", tokens=[32] * 12, delay_ms=480, duration=0.0625,
                         token_records=[TokenRecord(32, "[STREAMING_PAD]", k * 80 / 1000, 0.99) for k in range(12)])


def test_srt():
    assert to_srt(made_up()) == (
        "1\n00:00:00,160 --> 00:00:01,200\nAsk not <what> & ->\n\n"
        "2\n01:01:01,500 --> 01:01:02,160\n中文\ttab\nnext line\n\n"
    )
    assert to_srt(empty()) == ""


def test_vtt():
    assert to_vtt(made_up()) == (
        "WEBVTT\n\n"
        "00:00:00.160 --> 00:00:01.200\nAsk not &lt;what&gt; &amp; --&gt;\n\n"
        "01:01:01.500 --> 01:01:02.160\n中文\ttab\nnext line\n\n"
    )
    assert to_vtt(empty()) == "WEBVTT\n\n"


def speech_segment() -> Transcription:
    text = " And so my fellow Americans, ask not what your country can do for you, ask what you can do"
    words = [Word(0.5 * i, 0.5 * i + 0.5, " " + w, 1.0) for i, w in enumerate(text.split())]
    words.append(Word(10.0, 10.4, " supercalifragilisticexpialidocious-antidisestablishmentarianism.", 1.0))
    segment = Segment(0.0, 10.4, "".join(w.text for w in words), words)
    return Transcription(text=segment.text, tokens=[], delay_ms=480, duration=11.0, segments=[segment])


def test_subtitle_lines_and_cues():
    result = speech_segment()
    # Lines of at most 42 characters, broken between words; cues of two lines, each from its
    # first word's start to its last word's end; a longer word has a line of its own.
    assert to_srt(result) == (
        "1\n00:00:00,000 --> 00:00:08,500\nAnd so my fellow Americans, ask not what\n"
        "your country can do for you, ask what you\n\n"
        "2\n00:00:08,500 --> 00:00:10,400\ncan do\n"
        "supercalifragilisticexpialidocious-antidisestablishmentarianism.\n\n")
    assert subtitle_cues(result, 20, 1)[:3] == [(0.0, 2.0, ["And so my fellow"]),
                                               (2.0, 3.5, ["Americans, ask not"]), (3.5, 5.0, ["what your country"])]
    assert [len(line) for _, _, lines in subtitle_cues(result, 20, 3) for line in lines] == [16, 18, 17, 19, 15, 64]
    assert to_vtt(result, 0, 0) == f"WEBVTT\n\n00:00:00.000 --> 00:00:10.400\n{result.text.strip()}\n\n"
    # Without a width, lines are where the text has newlines.
    assert subtitle_cues(made_up(), 0, 1) == [(0.16, 1.2, ["Ask not <what> & -->"]),
                                               (3661.5, 3662.08, ["中文\ttab"]), (3662.08, 3662.16, ["next line"])]
    assert subtitle_cues(empty(), 10, 1) == []


@pytest.mark.parametrize("value", [-1, 1.5, True, "42"])
def test_subtitle_limits_must_be_whole_numbers(tmp_path, value):
    for call in (lambda: to_srt(made_up(), max_line_width=value), lambda: to_vtt(made_up(), 42, value),
                 lambda: write_outputs(made_up(), tmp_path, "x", ["txt"], max_line_count=value)):
        with pytest.raises(ValueError, match=r"max_line_(width|count) must be a whole number, 0 \(no limit\) or "
                                             f"more, not {re.escape(repr(value))}"):
            call()
    assert list(tmp_path.iterdir()) == []


def test_tsv():
    assert to_tsv(made_up()) == (
        "start\tend\ttext\n"
        "160\t1200\tAsk not <what> & -->\n"
        "3661500\t3662160\t中文 tab next line\n"
    )
    assert to_tsv(empty()) == "start\tend\ttext\n"


def test_txt():
    assert to_txt(made_up()) == "Ask not <what> & -->\n中文\ttab next line\n"
    assert to_txt(empty()) == ""


def test_json():
    data = json.loads(to_json(made_up()))
    assert data["text"] == made_up().text and data["duration"] == 3663.0 and data["delay_ms"] == 480
    assert data["segments"][0] == {
        "id": 0, "start": 0.16, "end": 1.2, "text": " Ask not <what> & -->",
        "words": [{"word": " Ask", "start": 0.16, "end": 0.4, "probability": 0.9},
                  {"word": " not <what> & -->", "start": 0.4, "end": 1.2, "probability": 0.5}],
    }
    assert data["tokens"] == [
        {"id": 33, "text": "[STREAMING_WORD]", "time": 0.0, "probability": 0.75},
        {"id": 1100, "text": " Ask", "time": 0.08, "probability": 0.5,
         "alternatives": [{"id": 1100, "text": " Ask", "probability": 0.5},
                          {"id": 32, "text": "[STREAMING_PAD]", "probability": 0.25}]},
    ]
    assert "中文" in to_json(made_up())  # UTF-8, not \u escapes
    assert json.loads(to_json(empty()))["segments"] == []


def test_times_round_to_milliseconds_and_carry():
    seg = [Segment(59.9996, 360000.0004, " a", [Word(59.9996, 360000.0004, " a", 1.0)])]
    r = Transcription(text=" a", tokens=[], delay_ms=480, duration=1.0, segments=seg)
    assert to_srt(r) == "1\n00:01:00,000 --> 100:00:00,000\na\n\n"
    assert to_tsv(r) == "start\tend\ttext\n60000\t360000000\ta\n"


@pytest.mark.parametrize("result", [made_up(), empty()], ids=["made_up", "empty"])
def test_json_round_trip(tmp_path, result):
    (path,) = write_outputs(result, tmp_path / "new" / "dir", "x", ["json"])
    assert path == tmp_path / "new" / "dir" / "x.json"
    assert Transcription.from_dict(json.loads(path.read_text(encoding="utf-8"))) == result


def test_json_round_trip_of_a_real_run(tmp_path, timed_dir):
    result = load_model(timed_dir).transcribe(speech("night1968_5s"), alternatives=2)
    assert result.segments and result.token_records[0].alternatives
    write_outputs(result, tmp_path, "night", ["json"])
    back = Transcription.from_dict(json.loads((tmp_path / "night.json").read_text(encoding="utf-8")))
    assert back == result and back.words == result.words


def test_write_outputs_writes_every_format(tmp_path):
    result = made_up()
    paths = write_outputs(result, tmp_path, "talk")
    assert [p.name for p in paths] == [f"talk.{f}" for f in FORMATS] == [
        "talk.txt", "talk.json", "talk.srt", "talk.vtt", "talk.tsv"]
    assert (tmp_path / "talk.srt").read_bytes() == to_srt(result).encode("utf-8")
    write_outputs(speech_segment(), tmp_path, "narrow", ["srt", "vtt", "txt"], max_line_width=20, max_line_count=1)
    assert (tmp_path / "narrow.srt").read_text(encoding="utf-8") == to_srt(speech_segment(), 20, 1)
    assert (tmp_path / "narrow.vtt").read_text(encoding="utf-8") == to_vtt(speech_segment(), 20, 1)
    assert (tmp_path / "narrow.txt").read_text(encoding="utf-8") == to_txt(speech_segment())
    with pytest.raises(ValueError, match="unknown output format 'doc'"):
        write_outputs(result, tmp_path, "talk", ["doc"])
