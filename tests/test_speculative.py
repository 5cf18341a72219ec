"""Speculative pad decoding: passes of K guessed positions give exactly the greedy tokens."""

import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import AUDIO, checkpoint, load_mlx, load_model, reference, speech, synthetic

import voxtral_mlx
from voxtral_mlx import cpu_kernels
from voxtral_mlx.cache import RingKVCache
from voxtral_mlx.convert import convert
from voxtral_mlx.streaming import StreamingSession


@pytest.fixture(scope="session")
def pads_dir(ckpt_root):
    """Small windows (encoder 24 frames, decoder 20 positions: both rings wrap), and the rows
    of this model's two most frequent tokens given to [STREAMING_PAD] and [STREAMING_WORD]:
    pad runs, word markers and text, as in speech."""
    return checkpoint(ckpt_root, embed_std=0.5, enc_window=24, dec_window=20, seed=1,
                      swap_rows=((32, 1267), (33, 1201)))


def same_records(got, expected):
    assert got.tokens == expected.tokens and got.text == expected.text
    a, b = got.token_records, expected.token_records
    assert [(r.id, r.time, r.text) for r in a] == [(r.id, r.time, r.text) for r in b]
    # A pass multiplies several rows at once: float32 rounding may differ in the last bits.
    np.testing.assert_allclose([r.probability for r in a], [r.probability for r in b], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("delay_ms", [80, 480, 2400])
def test_speculative_equals_greedy_with_both_rings_wrapping(pads_dir, delay_ms):
    model, ref = load_model(pads_dir), reference(pads_dir)
    for audio in (speech("jfk"), speech("night1968_5s")):
        greedy = model.transcribe(audio, delay_ms=delay_ms, alternatives=2)
        expected, margins = ref.transcribe(audio, delay_ms)
        assert greedy.tokens == expected and min(margins) > 1e-3  # no near-tie: the comparison means something
        for K in (2, 3, 8, 32):
            same_records(model.transcribe(audio, delay_ms=delay_ms, alternatives=2, speculate=K), greedy)


@pytest.mark.parametrize("name,seed", [("tiny", 0), ("tiny", 3), ("small_windows", 1), ("small_windows", 5),
                                       ("timed", 0)])
def test_speculative_equals_greedy_on_other_models(ckpt_root, name, seed):
    options = {"tiny": {}, "small_windows": dict(enc_window=24, dec_window=20),
               "timed": dict(embed_std=0.5, swap_rows=((32, 1032), (33, 1108)))}[name]
    model = load_model(checkpoint(ckpt_root, seed=seed, **options))
    for audio in (speech("night1968_5s"), synthetic(3.0, seed=seed)):
        for K in (4, 16):
            same_records(model.transcribe(audio, speculate=K), model.transcribe(audio))


def test_passes_keep_pad_runs_and_take_back_the_rest(pads_dir, monkeypatch):
    model = load_model(pads_dir)
    pad = model.tokenizer.pad
    audio = speech("jfk")
    greedy = model.transcribe(audio)
    assert 0.3 < sum(t == pad for t in greedy.tokens) / len(greedy.tokens) < 0.8  # a speech-like pad rate

    taken, calls = [], []
    real_rollback, real_decode = RingKVCache.rollback, model.net.decode
    monkeypatch.setattr(RingKVCache, "rollback", lambda self, n: (taken.append(n), real_rollback(self, n))[1])
    monkeypatch.setattr(model.net, "decode", lambda audio, tokens, *a, **kw: (calls.append(tokens.shape[-1]),
                                                                              real_decode(audio, tokens, *a, **kw))[1])
    K = 8
    result = model.transcribe(audio, speculate=K)
    assert result.tokens == greedy.tokens
    n_layers = len(model.net.layers)
    per_pass = taken[::n_layers]
    # Every layer takes back the same count, once per pass.
    assert taken == [n for n in per_pass for _ in range(n_layers)]
    passes = [n for n in calls[1:] if n > 1]
    assert len(per_pass) == len(passes) and all(2 <= n <= K for n in passes)
    assert any(n == 0 for n in per_pass) and any(n > 0 for n in per_pass)
    # After the prompt's prefill: what the passes kept and the single steps are every other token.
    kept = sum(n - back for n, back in zip(passes, per_pass))
    assert kept + calls[1:].count(1) == len(greedy.tokens) - 1
    assert len(calls) - 1 < 0.75 * (len(greedy.tokens) - 1)


def test_silence_is_pads_in_few_passes(ckpt_root, monkeypatch):
    # The pads model's own token on silence is 1055: given its row, [STREAMING_PAD] takes its place.
    model = load_model(checkpoint(ckpt_root, embed_std=0.5, enc_window=24, dec_window=20, seed=1,
                                  swap_rows=((32, 1055),)))
    silence = np.zeros(16000 * 4, np.float32)
    greedy = model.transcribe(silence)
    pad = model.tokenizer.pad
    assert sum(t == pad for t in greedy.tokens) >= 0.9 * len(greedy.tokens)
    calls, real = [], model.net.decode
    monkeypatch.setattr(model.net, "decode", lambda audio, tokens, *a, **kw: (calls.append(tokens.shape[-1]),
                                                                             real(audio, tokens, *a, **kw))[1])
    records = []
    model.transcribe(silence, speculate=16, on_token=records.append)
    assert [r.id for r in records] == greedy.tokens
    # The prompt's prefill past the tokens that hear only the left pad (the model keeps their
    # state from the first run), then passes of up to 16 that keep most of what they guess.
    L = len(model.stream().prompt)
    assert calls[0] == L - model.audio.pad_only_tokens == 8 and max(calls[1:]) == 16
    assert len(calls) - 1 <= len(greedy.tokens) / 4


def fed(session, audio, sizes, flush_at=3) -> str:
    """Feed in chunks of these sizes, in turn, with a flush after the `flush_at`-th; finish."""
    text, start, i = "", 0, 0
    while start < audio.size:
        text += session.feed(audio[start : start + sizes[i % len(sizes)]])
        start += sizes[i % len(sizes)]
        i += 1
        text += session.flush() if i == flush_at else ""
    return text + session.finish()


@pytest.mark.parametrize("sizes", [[1280 * 3], [1280 * 16 + 7], [4000, 160, 25000], [10**9]])
def test_streams_speculate_while_catching_up(pads_dir, sizes):
    model = load_model(pads_dir)
    audio = speech("jfk")
    session, plain = model.stream(delay_ms=160, speculate=6), model.stream(delay_ms=160)
    assert fed(session, audio, sizes) == fed(plain, audio, sizes)
    assert session.tokens == plain.tokens
    if sizes == [10**9]:  # one chunk, no flush: the offline run
        assert session.tokens == model.transcribe(audio, delay_ms=160).tokens


def test_rollback_keeps_attention_exact():
    """Random passes written then partly taken back: every query sees exactly its window."""
    rng = np.random.default_rng(0)
    window, spare = 6, 4
    cache = RingKVCache(window, step=4, spare=spare)
    history_k, history_v = [], []

    for _ in range(60):
        n = int(rng.integers(1, spare + 2))
        k, v, q = (rng.normal(size=(1, 2, n, 8)) for _ in range(3))
        mask = cache.make_mask(n)
        keys, values = cache.update_and_fetch(mx.array(k, mx.float32), mx.array(v, mx.float32))
        out = np.array(mx.fast.scaled_dot_product_attention(mx.array(q, mx.float32), keys, values, scale=0.5,
                                                            mask=mask))
        all_k = np.concatenate(history_k + [k], axis=2) if history_k else k
        all_v = np.concatenate(history_v + [v], axis=2) if history_v else v
        P = all_k.shape[2]
        for i in range(n):
            t = P - n + i
            lo = max(0, t - window + 1)
            s = np.einsum("bhd,bhkd->bhk", q[:, :, i], all_k[:, :, lo : t + 1]) * 0.5
            p = np.exp(s - s.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            np.testing.assert_allclose(out[:, :, i], np.einsum("bhk,bhkd->bhd", p, all_v[:, :, lo : t + 1]), atol=2e-5)
        back = int(rng.integers(0, min(n, spare + 1)))
        cache.rollback(back)
        keep = n - back
        history_k.append(k[:, :, :keep])
        history_v.append(v[:, :, :keep])
        assert cache.offset == sum(h.shape[2] for h in history_k)
    assert cache.keys.shape[2] == window + spare
    with pytest.raises(ValueError, match="cannot take back 5 positions: 4 spare slots"):
        cache.rollback(5)
    with pytest.raises(ValueError, match="0 spare slots"):
        RingKVCache(4).rollback(1)


def test_batches_of_several_decode_plainly_and_a_batch_of_one_speculates(pads_dir):
    model = load_model(pads_dir)
    audio = [speech("night1968_5s"), synthetic(1.0, seed=2)]
    batch = model.transcribe(audio, speculate=8)
    for x, got in zip(audio, batch):
        assert got.tokens == model.transcribe(x).tokens
    [one] = model.transcribe(audio[:1], speculate=8)
    same_records(one, model.transcribe(audio[0], speculate=8))


def test_bad_values(tiny_dir):
    model = load_model(tiny_dir)
    for bad in (-1, 33, 2.0, True, "4"):
        with pytest.raises(ValueError, match=r"speculate must be a whole number of positions from 0 \(off\) to 32"):
            model.stream(speculate=bad)
    assert model.stream(speculate=1).speculate == 0  # one position per pass is plain decoding


def test_cli_option(pads_dir):
    script = [str(Path(sys.executable).parent / "voxtral-mlx")]
    args = ["transcribe", str(AUDIO / "jfk.wav"), "-m", str(pads_dir)]
    plain = subprocess.run(script + args + ["--speculate", "0"], capture_output=True, text=True, timeout=120)
    fast = subprocess.run(script + args + ["--speculate", "8"], capture_output=True, text=True, timeout=120)
    assert plain.returncode == fast.returncode == 0 and plain.stdout == fast.stdout and plain.stdout.strip()
    bad = subprocess.run(script + args + ["--speculate", "40"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--speculate" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.skipif(cpu_kernels.library() is None, reason=f"the CPU kernels are not available: {cpu_kernels.reason}")
def test_transcribe_speculates_by_default_where_passes_run_on_the_row_kernels(pads_dir, tmp_path, monkeypatch):
    # A 4-bit model's products are row kernels (q_packed_t for any rows, or q_rows_t for up to
    # 32): a pass of 8 positions gives each the bits of its own step.
    path = convert(pads_dir, tmp_path / "q4", q_bits=4).path
    model = voxtral_mlx.load(path)
    assert model.default_speculate == 8
    passes = []
    real = StreamingSession._speculate
    monkeypatch.setattr(StreamingSession, "_speculate", lambda self, emb: (passes.append(emb.shape[1]), real(self, emb))[1])
    audio = speech("jfk")
    default = model.transcribe(audio)
    assert passes and max(passes) == 8
    passes.clear()
    same_records(default, model.transcribe(audio, speculate=0))
    assert passes == []
    script = [str(Path(sys.executable).parent / "voxtral-mlx"), "transcribe", str(AUDIO / "jfk.wav"), "-m", str(path)]
    runs = [subprocess.run(script + ["-v", *extra], capture_output=True, text=True, timeout=120)
            for extra in ([], ["--speculate", "0"])]
    assert [r.returncode for r in runs] == [0, 0] and runs[0].stdout == runs[1].stdout == default.text.strip() + "\n"
    line = "speculative pad decoding: up to 8 positions per decoder pass"
    assert line in runs[0].stderr and "speculative" not in runs[1].stderr
    # Off where a pass's products may sum otherwise than a step's: more rows than the row
    # kernels take (q_rows_t's, groups of 32; q_packed_t gives a row its bits for any rows),
    # MLX's graphs, a head that MKL multiplies (this model's 1314 rows).
    monkeypatch.setattr(cpu_kernels, "MAX_ROWS", 4)
    assert model.default_speculate == (8 if cpu_kernels.packed_kernel() else 0)
    assert voxtral_mlx.load(convert(pads_dir, tmp_path / "q4-32", q_bits=4, q_group_size=32).path).default_speculate == 0
    monkeypatch.undo()
    assert load_mlx(pads_dir).default_speculate == 0 == load_model(pads_dir).default_speculate
