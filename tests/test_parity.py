"""Every seam of the network against the float64 numpy reference of MODEL.md."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import load_model, reference, speech, synthetic

from voxtral_mlx.audio import LogMel, mel_filters


def padded(ref, seconds=None, name="jfk", delay_ms=480):
    audio = speech(name) if seconds is None else synthetic(seconds)
    return ref.pad(audio, delay_ms)


def test_mel_filters_match_reference(tiny_dir):
    np.testing.assert_allclose(mel_filters(16000, 400, 128), reference(tiny_dir).mel_filters(), atol=1e-12)


@pytest.mark.parametrize("name", ["jfk", "night1968_5s"])
def test_log_mel_matches_reference(tiny_dir, name):
    ref, model = reference(tiny_dir), load_model(tiny_dir)
    x = padded(ref, name=name)
    expected = ref.log_mel(x)
    half = model.audio.window_size // 2
    # Zero extension at both ends equals the reference's reflect padding: the pads are silence.
    span = np.concatenate([np.zeros(half), x, np.zeros(model.audio.look_ahead)]).astype(np.float32)
    got = np.array(LogMel(model.audio)(mx.array(span)))
    assert got.shape == expected.shape == (x.size // 160, 128)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert np.all(got[:100] == -0.625)


def run_encoder(model, mel, chunks):
    caches = model.net.make_cache()
    frames, start = [], 0
    for c in chunks:
        x = model.net.encoder(mx.array(mel[start : start + c], mx.float32)[None], caches.stem, caches.encoder)
        frames.append(np.array(x[0]))
        start += c
    return np.concatenate(frames)


@pytest.mark.parametrize("chunks", ["whole", "tokens", "mixed"])
def test_encoder_matches_reference_past_its_window(small_windows_dir, chunks):
    ref, model = reference(small_windows_dir), load_model(small_windows_dir)
    mel = ref.log_mel(padded(ref, name="night1968_5s"))
    expected = ref.encoder(mel)
    assert expected.shape[0] > 4 * model.net.encoder.window
    T = mel.shape[0]
    sizes = {"whole": [T], "tokens": [8] * (T // 8), "mixed": [16, 8, 64, 8, 200, 24, T - 320]}[chunks]
    got = run_encoder(model, mel, sizes)
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


def test_conv_stem_matches_reference(tiny_dir):
    ref, model = reference(tiny_dir), load_model(tiny_dir)
    mel = ref.log_mel(padded(ref, seconds=2.0))
    stem = model.net.encoder.make_stem_state(mx.float32)
    x = mx.array(mel, mx.float32)[None]
    for i, conv in enumerate(model.net.encoder.conv_layers):
        x = conv(mx.concatenate([stem.tails[i], x], axis=1))
    expected = ref.conv_stem(mel)
    np.testing.assert_allclose(np.array(x[0]), expected, atol=1e-4 * np.abs(expected).max())


def test_adapter_matches_reference(tiny_dir):
    ref, model = reference(tiny_dir), load_model(tiny_dir)
    mel = ref.log_mel(padded(ref, seconds=3.0))
    expected = ref.adapter(ref.encoder(mel))
    got = np.array(model.net.encode(mx.array(mel, mx.float32), model.net.make_cache()))
    np.testing.assert_allclose(got, expected, atol=2e-3 * np.abs(expected).max())


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_decoder_logits_cached_match_reference_past_the_window(small_windows_dir, delay_ms):
    ref, model = reference(small_windows_dir), load_model(small_windows_dir)
    rng = np.random.default_rng(delay_ms)
    n = 50
    assert n > model.net.args.decoder.sliding_window
    embeds = rng.normal(size=(n, model.net.args.decoder.dim))
    tokens = rng.integers(0, model.net.args.decoder.vocab_size, n)
    expected = ref.decoder_logits(embeds, tokens, delay_ms)
    caches = model.net.make_cache()
    scales = model.net.ffn_scales(model.audio.delay_tokens(delay_ms))
    got, start = [], 0
    for c in [7, 1, 1, 12, 1, 1, 1, 26]:  # a prefill, steps, a chunk longer than the window
        logits = model.net.decode(mx.array(embeds[start : start + c], mx.float32),
                                  mx.array(tokens[start : start + c]), caches, scales)
        got.append((start + c - 1, np.array(logits)))
        start += c
    for pos, logits in got:
        np.testing.assert_allclose(logits, expected[pos], atol=1e-3 * np.abs(expected[pos]).max())
