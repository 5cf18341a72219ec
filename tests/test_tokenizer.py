"""Tekken: special ids by name, bytes of text ids, streaming UTF-8, and the `tokenizers` encoder."""

import base64
import json
import re
import shutil

import numpy as np
import pytest

import voxtral_mlx
from voxtral_mlx.config import ConfigError
from voxtral_mlx.tokenizer import Tekken

NAMED = {"bos": ("<s>", 1), "eos": ("</s>", 2), "pad": ("[STREAMING_PAD]", 32), "word": ("[STREAMING_WORD]", 33)}


@pytest.fixture(scope="module")
def tekken_json(tiny_dir) -> dict:
    return json.loads((tiny_dir / "tekken.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tek(tiny_dir) -> Tekken:
    return Tekken.from_file(tiny_dir / "tekken.json")


def tid(tek: Tekken, token: bytes | str) -> int:
    """The one text id whose bytes are `token`."""
    b = token.encode("utf-8") if isinstance(token, str) else token
    ids = [i for i in range(tek.n_special, tek.vocab_size) if tek.token_bytes(i) == b]
    assert len(ids) == 1, (token, ids)
    return ids[0]


def write_tekken(tmp_path, data: dict):
    path = tmp_path / "tekken.json"
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return path


# Ids.

def test_special_ids_are_found_by_name(tek):
    assert {k: getattr(tek, k) for k in NAMED} == {k: i for k, (_, i) in NAMED.items()}
    assert tek.n_special == 1000
    assert tek.special_id("[TRANSCRIBE]") == 34
    with pytest.raises(ConfigError, match=r"^tekken\.json has no special token '\[NOPE\]'$"):
        tek.special_id("[NOPE]")


def test_special_ids_follow_the_file(tmp_path, tekken_json):
    data = json.loads(json.dumps(tekken_json))
    moved = {"<s>": 40, "</s>": 41, "[STREAMING_PAD]": 42, "[STREAMING_WORD]": 43}
    for s in data["special_tokens"]:
        if s["token_str"] in moved:
            s["token_str"] = f"<SPECIAL_{s['rank']}>"
    for s in data["special_tokens"]:
        for name, rank in moved.items():
            if s["rank"] == rank:
                s["token_str"] = name
    t = Tekken.from_file(write_tekken(tmp_path, data))
    assert (t.bos, t.eos, t.pad, t.word) == (40, 41, 42, 43)


def test_control_tokens_have_no_bytes(tek):
    assert all(tek.token_bytes(i) == b"" for i in range(tek.n_special))


def test_only_the_first_default_vocab_size_entries_are_text(tek, tekken_json):
    n_valid = tekken_json["config"]["default_vocab_size"] - 1000
    vocab = sorted(tekken_json["vocab"], key=lambda v: v["rank"])
    assert len(vocab) > n_valid  # the tiny file has entries past the limit, as the real one does
    assert tek.vocab_size == n_valid + 1000
    expected = [base64.b64decode(v["token_bytes"]) for v in vocab[:n_valid]]
    assert [tek.token_bytes(1000 + r) for r in range(n_valid)] == expected
    with pytest.raises(IndexError):
        tek.token_bytes(tek.vocab_size)
    # The `tokenizers` view has the same id space: nothing past the limit.
    assert tek.hf.get_vocab_size() == tek.vocab_size
    assert max(tek.hf.get_vocab().values()) == tek.vocab_size - 1
    assert tek.hf.token_to_id("\u0120zebra") is None  # " zebra", an entry past the limit
    ids = tek.encode(" zebra quartz")
    assert all(1000 <= i < tek.vocab_size for i in ids) and tek.decode(ids) == " zebra quartz"


def test_vocab_is_ordered_by_rank_not_by_position(tmp_path, tek, tekken_json):
    data = json.loads(json.dumps(tekken_json))
    data["vocab"].reverse()
    data["special_tokens"].reverse()
    t = Tekken.from_file(write_tekken(tmp_path, data))
    assert (t.bos, t.eos, t.pad, t.word) == (1, 2, 32, 33)
    assert [t.token_bytes(i) for i in range(t.vocab_size)] == [tek.token_bytes(i) for i in range(tek.vocab_size)]


def test_decode(tek):
    ids = [tek.word, tid(tek, " ask"), tid(tek, " not"), tek.pad, tek.pad, tek.word, tid(tek, " what"),
           tek.eos, tid(tek, b"\xe2\x82"), 1000 + 0xAC, tek.bos]
    assert tek.decode(ids) == " ask not what€"
    assert tek.decode([]) == ""
    assert tek.decode([tek.pad, tek.word, tek.eos]) == ""
    assert tek.decode(np.array([1000 + ord("h"), 1000 + ord("i")])) == "hi"
    # A character that never completes is one replacement character.
    assert tek.decode([tid(tek, " the"), tid(tek, "\U0001F600".encode()[:2])]) == " the\ufffd"


# Streaming text.

def stream(tek, ids):
    s = tek.text_stream()
    return [s.push(i) for i in ids], s.end()


def test_text_stream_holds_back_a_split_character(tek):
    ids = [tid(tek, " the"), tid(tek, b"\xe2\x82"), tek.pad, tek.word, 1000 + 0xAC, tid(tek, " hello")]
    pieces, tail = stream(tek, ids)
    assert pieces == [" the", "", "", "", "€", " hello"]
    assert tail == ""


@pytest.mark.parametrize("char,cut", [("\U0001F600", 2), ("中", 1)])
def test_text_stream_completes_each_kind_of_split(tek, char, cut):
    b = char.encode()
    first = tid(tek, b[:cut]) if cut > 1 else 1000 + b[0]
    pieces, tail = stream(tek, [first, tid(tek, b[cut:]), tid(tek, "ed")])
    assert pieces == ["", char, "ed"] and tail == ""


def test_text_stream_flushes_an_incomplete_tail_at_the_end(tek):
    s = tek.text_stream()
    assert s.push(tid(tek, " you")) == " you"
    assert s.push(tid(tek, "\U0001F600".encode()[:2])) == ""
    assert s.push(tek.eos) == ""
    assert s.end() == "\ufffd"


def test_text_stream_broken_character_does_not_swallow_the_next(tek):
    s = tek.text_stream()
    assert s.push(tid(tek, b"\xe2\x82")) == ""
    assert s.push(tid(tek, " can")) == "\ufffd can"
    assert s.end() == ""


def test_text_stream_equals_decode_on_random_ids(tek):
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, tek.vocab_size, 60).tolist()
        pieces, tail = stream(tek, ids)
        full = tek.decode(ids)
        assert "".join(pieces) + tail == full
        # What was emitted is final: every prefix of the stream is a prefix of the whole text.
        assert all(full.startswith("".join(pieces[: i + 1])) for i in range(len(pieces)))


# The `tokenizers` encoder.

TEXTS = [
    "ask not what your country can do for you",
    " hello world, and my fellow Americans!!",
    "café über naïve",
    "中文 and 中",
    "\U0001F600 so \U0001F600\U0001F600",
    "Ünïcödé €5 zebra?\nline two\ttab  ",
]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_round_trip(tek, text):
    ids = tek.encode(text)
    assert ids and all(1000 <= i < tek.vocab_size for i in ids)
    assert tek.decode(ids) == text
    assert tek.hf.decode(ids) == text


def test_encode_uses_merged_tokens(tek):
    # The tiny vocabulary is not BPE-trained: only its two-byte tokens have a merge path.
    for token in ["th", "ed", " a", "é", "ü"]:
        assert tek.encode(token) == [tid(tek, token)]
    assert tek.encode("ed the") == [tid(tek, "ed"), 1000 + ord(" "), tid(tek, "th"), 1000 + ord("e")]
    assert tek.encode("hi") == [1000 + ord("h"), 1000 + ord("i")]


def test_hf_decode_equals_tekken_decode(tek):
    rng = np.random.default_rng(1)
    for _ in range(50):
        ids = rng.integers(0, tek.vocab_size, 30).tolist()
        assert tek.hf.decode(ids) == tek.decode(ids)


def test_encode_never_produces_control_ids(tek):
    text = "say <s> and [STREAMING_PAD] x"
    ids = tek.encode(text)
    assert all(i >= 1000 for i in ids)
    assert tek.decode(ids) == text


# Bad files.

@pytest.mark.parametrize("name", [n for n, _ in NAMED.values()])
def test_missing_special_token_is_named(tmp_path, tekken_json, name):
    data = json.loads(json.dumps(tekken_json))
    for s in data["special_tokens"]:
        if s["token_str"] == name:
            s["token_str"] = f"<SPECIAL_{s['rank']}>"
    with pytest.raises(ConfigError, match=f"^{re.escape(f'tekken.json has no special token {name!r}')}$"):
        Tekken.from_file(write_tekken(tmp_path, data))


def test_missing_special_token_fails_loading(tmp_path, tiny_dir, tekken_json):
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = json.loads(json.dumps(tekken_json))
    data["special_tokens"] = [s for s in data["special_tokens"] if s["token_str"] != "[STREAMING_WORD]"]
    write_tekken(model, data)
    with pytest.raises(ConfigError, match=r"^tekken\.json has no special token '\[STREAMING_WORD\]'$"):
        voxtral_mlx.load(model, dtype="float32")


def test_not_a_tekken_file(tmp_path, tekken_json):
    path = tmp_path / "tekken.json"
    path.write_text("{", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"^cannot read {re.escape(str(path))}: "):
        Tekken.from_file(path)
    data = {k: v for k, v in tekken_json.items() if k != "config"}
    message = f"{path} is not a Tekken tokenizer file (KeyError: 'config')"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Tekken.from_file(write_tekken(tmp_path, data))
    with pytest.raises(ConfigError, match=r"^cannot read .*nope\.json: "):
        Tekken.from_file(tmp_path / "nope.json")
