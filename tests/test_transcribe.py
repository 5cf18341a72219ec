"""Whole transcriptions: greedy tokens equal the float64 reference exactly."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_mlx, load_model, reference, speech, synthetic

import voxtral_mlx

CASES = [("jfk", None), ("night1968_5s", None), ("synthetic", 4.0), ("silence", 2.0)]


def audio_for(name, seconds):
    if name == "synthetic":
        return synthetic(seconds)
    if name == "silence":
        return np.zeros(int(seconds * 16000), np.float32)
    return speech(name)


def assert_same_tokens(got, expected, margins):
    assert len(got) == len(expected)
    assert got == expected, f"first difference at {next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)}"
    # The comparison means something only if float32 could not have flipped an argmax.
    assert min(margins) > 1e-3


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
@pytest.mark.parametrize("name,seconds", CASES)
def test_tokens_match_reference_with_both_windows_exceeded(small_windows_dir, name, seconds, delay_ms):
    audio = audio_for(name, seconds)
    expected, margins = reference(small_windows_dir).transcribe(audio, delay_ms)
    result = load_model(small_windows_dir).transcribe(audio, delay_ms=delay_ms)
    assert_same_tokens(result.tokens, expected, margins)
    assert len(result.tokens) == -(-audio.size // 1280) + 11
    assert result.delay_ms == delay_ms
    assert result.text == reference(small_windows_dir).text(expected)


@pytest.mark.parametrize("name,seconds", CASES[:3])
def test_tokens_match_reference_at_full_windows(tiny_dir, name, seconds):
    audio = audio_for(name, seconds)
    expected, margins = reference(tiny_dir).transcribe(audio)
    result = load_model(tiny_dir).transcribe(audio)
    assert_same_tokens(result.tokens, expected, margins)
    assert len(set(result.tokens)) > 3  # the tokens follow the audio


def test_audio_longer_than_one_encoder_pass(small_windows_dir):
    # 15 s is 188 tokens: more than one encoder pass of 128 tokens.
    audio = speech("night1968_15s")
    expected, margins = reference(small_windows_dir).transcribe(audio, 480)
    result = load_model(small_windows_dir).transcribe(audio)
    assert_same_tokens(result.tokens, expected, margins)


def test_eos_is_fed_back_and_decoding_continues(ckpt_root):
    from conftest import checkpoint

    path = checkpoint(ckpt_root, seed=3)
    model, ref = load_mlx(path), type(reference(path))(path)  # its embedding is edited below
    audio = synthetic(4.0, seed=3)
    plain = ref.transcribe(audio)[0]
    common = max(set(plain), key=plain.count)
    # EOS takes over the most frequent token's embedding, slightly larger, so it wins there.
    eos = model.tokenizer.eos
    emb = model.net.embedding_module.tok_embeddings
    emb.weight[eos] = emb.weight[common] * 1.05
    ref.embed[eos] = np.array(emb.weight[eos], np.float64)
    expected, margins = ref.transcribe(audio)
    result = model.transcribe(audio)
    assert expected.count(eos) >= 2 and expected.index(eos) < len(expected) - 5
    assert_same_tokens(result.tokens, expected, margins)
    session = model.stream()
    for start in range(0, audio.size, 999):  # and inside a stream
        session.feed(audio[start : start + 999])
    session.finish()
    assert session.tokens == expected


def test_delay_option_is_validated(tiny_dir):
    model = load_model(tiny_dir)
    for bad in (0, 40, 100, 1280, 1300, 2000, 4800, 480.5, -80):
        with pytest.raises(ValueError, match="80..1200 in steps of 80, or 2400"):
            model.transcribe(np.zeros(1600, np.float32), delay_ms=bad)
    assert model.stream().delay_ms == 480
    assert model.stream(delay_ms=1200).delay_ms == 1200
