"""Sanity tests of the tiny checkpoint fixture and of the float64 numpy reference."""

import base64
import json
import math

import numpy as np
import pytest

from reference import E, P, Reference, attention, read_safetensors, rope
from tiny_checkpoint import to_bf16_bits, write_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def ref(ckpt):
    return Reference(ckpt)


def noise(n, seed=0, amp=0.1):
    return amp * np.random.default_rng(seed).standard_normal(n)


# ----- fixture ------------------------------------------------------------------------


def test_params_layout(ckpt):
    p = json.loads((ckpt / "params.json").read_text())
    tek = json.loads((ckpt / "tekken.json").read_text(encoding="utf-8"))
    for k in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
              "norm_eps", "rope_theta", "sliding_window", "tied_embeddings",
              "ada_rms_norm_t_cond", "ada_rms_norm_t_cond_dim", "model_max_length"):
        assert k in p, k
    ea = p["multimodal"]["whisper_model_args"]["encoder_args"]
    assert ea["n_kv_heads"] == ea["n_heads"] and ea["use_biases"] and ea["causal"]
    assert ea["audio_encoding_args"]["global_log_mel_max"] == 1.5
    assert p["multimodal"]["whisper_model_args"]["downsample_args"]["downsample_factor"] == 4
    cfg = tek["config"]
    assert cfg["default_num_special_tokens"] == 1000
    assert p["vocab_size"] == cfg["default_vocab_size"]
    assert cfg["num_vocab_tokens"] == len(tek["vocab"]) > cfg["default_vocab_size"] - 1000
    assert [v["rank"] for v in tek["vocab"]] == list(range(len(tek["vocab"])))
    raw = [base64.b64decode(v["token_bytes"]) for v in tek["vocab"]]
    assert raw[:256] == [bytes([b]) for b in range(256)]
    assert len(set(raw)) == len(raw)
    for v, b in zip(tek["vocab"], raw):
        try:
            assert v["token_str"] == b.decode("utf-8")
        except UnicodeDecodeError:
            assert v["token_str"] is None
    sp = {s["rank"]: s["token_str"] for s in tek["special_tokens"]}
    assert len(sp) == 1000 and sp[1] == "<s>" and sp[2] == "</s>"
    assert sp[32] == "[STREAMING_PAD]" and sp[33] == "[STREAMING_WORD]"
    assert tek["audio"]["transcription_delay_ms"] == 480
    assert tek["audio"]["streaming_n_left_pad_tokens"] == 32


def test_official_tensor_names(ckpt):
    names = set(read_safetensors(ckpt / "consolidated.safetensors"))
    # 2 encoder layers x 13 + 4 conv + 1 norm, adapter 2, embedding 1, 2 decoder layers x 11 + 1
    assert len(names) == 2 * 13 + 5 + 3 + 2 * 11 + 1
    assert E + "transformer.layers.1.attention.wq.bias" in names
    assert E + "transformer.layers.1.attention.wk.bias" not in names
    assert P + "tok_embeddings.weight" in names
    assert "layers.1.ada_rms_norm_t_cond.2.weight" in names
    assert not any(n.startswith("layers.") and n.endswith(".bias") for n in names)


def test_bf16_rounding_is_nearest_even():
    x = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-8 + 2**-20, -2.5, 0.0], np.float32)
    back = (to_bf16_bits(x).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(back, [1.0, 1.0, 1 + 2**-6, 1 + 2**-7, -2.5, 0.0])


def test_safetensors_roundtrip(tmp_path):
    extra = np.array([[1.0, 1 + 2**-8], [3.14159, -1e-3]], np.float32)
    d = write_checkpoint(tmp_path, extra_tensors={"extra.thing": extra})
    w = read_safetensors(d / "consolidated.safetensors")
    want = (to_bf16_bits(extra).astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(w["extra.thing"], want)
    for name, arr in w.items():
        assert arr.dtype == np.float64
        bits = arr.astype(np.float32).view(np.uint32)
        assert not np.any(bits & 0xFFFF), name  # exactly bf16 values

    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(d / "consolidated.safetensors"), framework="numpy") as f:
        assert set(f.keys()) == set(w)
        assert f.metadata() == {"format": "pt"}


def test_safetensors_loads_in_mlx(ckpt):
    mx = pytest.importorskip("mlx.core")
    ours = read_safetensors(ckpt / "consolidated.safetensors")
    theirs = mx.load(str(ckpt / "consolidated.safetensors"))
    assert set(theirs) == set(ours)
    for name, arr in theirs.items():
        assert arr.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(arr.astype(mx.float32)), ours[name], name)


def test_fixture_is_deterministic(tmp_path):
    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    for f in ("params.json", "tekken.json", "consolidated.safetensors"):
        assert (a / f).read_bytes() == (b / f).read_bytes()


def test_bad_checkpoints_rejected(tmp_path):
    with pytest.raises(KeyError, match="layers.0.attention.wk.weight"):
        Reference(write_checkpoint(tmp_path / "a", drop_tensors=["layers.0.attention.wk.weight"]))
    name = E + "transformer.layers.1.attention.wo.weight"
    with pytest.raises(ValueError, match="wo.weight"):
        Reference(write_checkpoint(tmp_path / "b", reshape_tensors={name: (64, 32)}))


# ----- geometry -----------------------------------------------------------------------


def test_delays(ref):
    assert ref.n_left == 32 and ref.default_delay_ms == 480
    assert len(ref.prompt(480)) == 39
    assert ref.prompt(480) == [1] + [32] * 38
    assert ref.n_delay(80) == 1 and ref.n_delay(1200) == 15 and ref.n_delay(2400) == 30
    for bad in (0, 40, 79, 81, 1280, 1600, 2320, 2480, -80, 480.5):
        with pytest.raises(ValueError):
            ref.n_delay(bad)
        with pytest.raises(ValueError):
            ref.prompt(bad)
    with pytest.raises(ValueError):
        ref.transcribe(np.zeros(100), delay_ms=500)


@pytest.mark.parametrize("n", [0, 1, 1279, 1280, 1281, 16000])
def test_pad_geometry(ref, n):
    a = noise(n) + 1.0
    p = ref.pad(a, 480)
    assert p.dtype == np.float64 and len(p) % 1280 == 0
    assert len(p) == 32 * 1280 + math.ceil(n / 1280) * 1280 + (6 + 11) * 1280
    np.testing.assert_array_equal(p[32 * 1280:32 * 1280 + n], a)
    assert not p[:32 * 1280].any() and not p[32 * 1280 + n:].any()


# ----- front end ----------------------------------------------------------------------


def test_mel_bank_is_slaney(ref):
    f = ref.mel_filters()
    assert f.shape == (201, 128) and f.dtype == np.float64
    assert (f >= 0).all() and (f.max(axis=0) > 0).all()
    centers = ref.mel_centers_hz
    # Slaney scale: linear below 1 kHz (200/3 Hz per mel), logarithmic above
    assert np.allclose(np.diff(centers[:10]), np.diff(centers[:10])[0])
    assert centers[-1] < 8000 and np.all(np.diff(centers) > 0)
    freqs = np.linspace(0, 8000, 201)
    peaks = freqs[f.argmax(axis=0)]
    assert np.all(np.abs(peaks - centers) <= 20.0 + 1e-9)  # nearest bin to the center
    # area normalisation: each triangle integrates to ~1 (check the wide ones)
    edges = np.concatenate([[0.0], centers, [8000.0]])
    # filter i rises from edges[i] to its center and falls to edges[i+2]
    width = edges[2:] - edges[:-2]
    wide = width > 200
    assert wide.sum() == 27
    np.testing.assert_allclose(f.sum(axis=0)[wide] * 40.0, 1.0, rtol=0.02)
    # 130 points evenly spaced in Slaney mels from 0 to mel(8000 Hz) = 15 + 27 ln(8) / ln(6.4)
    step_hz = (15 + 27 * math.log(8) / math.log(6.4)) / 129 * (200 / 3)
    np.testing.assert_allclose(centers[:5], step_hz * np.arange(1, 6), rtol=1e-12)
    assert abs(centers[-1] - 1000 * 6.4 ** ((128 * step_hz / (200 / 3) - 15) / 27)) < 1e-9
    # librosa htk=False norm="slaney" known value: peak of the 1 kHz filter = 2/(width)
    i = int(np.argmin(np.abs(centers - 1000)))
    assert f[:, i].max() <= 2 / width[i] + 1e-12


def test_mel_of_silence(ref):
    m = ref.log_mel(np.zeros(16000))
    assert m.shape == (100, 128)
    assert (m == -0.625).all()


@pytest.mark.parametrize("n", [160, 1280, 4000 * 160, 12345 * 160])
def test_mel_frame_count(ref, n):
    assert ref.log_mel(noise(n)).shape == (n // 160, 128)


def test_mel_frame_support(ref):
    x = np.zeros(64 * 160)
    base = ref.log_mel(x)
    s = 20 * 160 + 37
    x[s] = 100.0  # loud enough to clear the -6.5 floor even at the window's tail
    changed = np.nonzero(np.any(ref.log_mel(x) != base, axis=1))[0]
    # frame i covers samples [160 i - 200, 160 i + 200)
    want = [i for i in range(64) if 160 * i - 200 <= s < 160 * i + 200]
    assert changed.tolist() == want


def test_mel_tone_lands_in_its_filter(ref):
    t = np.arange(16000) / 16000
    m = ref.log_mel(0.5 * np.sin(2 * np.pi * 2000.0 * t))
    band = m[10:-10].mean(axis=0).argmax()
    f = ref.mel_filters()
    assert f[2000 // 40, band] > 0  # 2 kHz is bin 50, inside the winning triangle
    assert abs(ref.mel_centers_hz[band] - 2000) < 100
    assert m.min() >= -0.625


# ----- encoder ------------------------------------------------------------------------


def test_conv_stem_against_loops(ref):
    mel = ref.log_mel(noise(24 * 160, seed=1, amp=0.3))
    out = ref.conv_stem(mel)
    assert out.shape == (12, 64)
    w0, b0 = ref.w[E + "conv_layers.0.conv.weight"], ref.w[E + "conv_layers.0.conv.bias"]
    w1, b1 = ref.w[E + "conv_layers.1.conv.weight"], ref.w[E + "conv_layers.1.conv.bias"]

    def gelu(x):
        return 0.5 * x * (1 + np.array([math.erf(v / math.sqrt(2)) for v in x]))

    y = []
    for t in range(24):
        acc = b0.copy()
        for k in range(3):
            if t - 2 + k >= 0:
                acc += w0[:, :, k] @ mel[t - 2 + k]
        y.append(gelu(acc))
    for j in range(12):
        acc = b1.copy()
        for k, src in enumerate((2 * j - 1, 2 * j, 2 * j + 1)):
            if src >= 0:
                acc += w1[:, :, k] @ y[src]
        np.testing.assert_allclose(out[j], gelu(acc), rtol=1e-12, atol=1e-12)


def test_rope_is_relative():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((1, 1, 16)), rng.standard_normal((1, 1, 16))
    d1 = (rope(q, np.array([7]), 1e6) * rope(k, np.array([3]), 1e6)).sum()
    d2 = (rope(q, np.array([1007]), 1e6) * rope(k, np.array([1003]), 1e6)).sum()
    assert abs(d1 - d2) < 1e-10
    r = rope(q, np.array([5]), 1e6)
    assert abs(np.linalg.norm(r) - np.linalg.norm(q)) < 1e-12
    # interleaved: pair (0, 1) turns by exactly pos radians (frequency theta^0 = 1)
    x = np.zeros((1, 1, 16))
    x[0, 0, 0] = 1.0
    np.testing.assert_allclose(rope(x, np.array([2]), 1e6)[0, 0, :2], [math.cos(2), math.sin(2)])


@pytest.mark.parametrize("window,q_pos0", [(5, 0), (3, 10), (1000, 0)])
def test_attention_against_loops(window, q_pos0):
    rng = np.random.default_rng(1)
    n, H, KVH, hd = 9, 4, 2, 8
    m = q_pos0 + n
    q, k, v = (rng.standard_normal(s) for s in ((n, H, hd), (m, KVH, hd), (m, KVH, hd)))
    out = attention(q, k, v, q_pos0, window, chunk=4)
    for i in range(n):
        p = q_pos0 + i
        for h in range(H):
            g = h // (H // KVH)
            keys = [j for j in range(m) if p - window < j <= p]
            s = np.array([q[i, h] @ k[j, g] for j in keys]) / math.sqrt(hd)
            w = np.exp(s - s.max())
            w /= w.sum()
            np.testing.assert_allclose(out[i, h], w @ v[keys, g], rtol=1e-10, atol=1e-12)


def test_encoder_is_causal(ref):
    mel = ref.log_mel(noise(80 * 160, seed=2, amp=0.3))
    full = ref.encoder(mel)
    assert full.shape == (40, 64)
    np.testing.assert_allclose(ref.encoder(mel[:48]), full[:24], rtol=1e-10, atol=1e-12)


def test_encoder_window_matters(tmp_path):
    mel = Reference(write_checkpoint(tmp_path / "w", enc_window=750)).log_mel(noise(80 * 160))
    wide = Reference(tmp_path / "w").encoder(mel)
    narrow = Reference(write_checkpoint(tmp_path / "n", enc_window=6)).encoder(mel)
    np.testing.assert_allclose(narrow[:6], wide[:6], rtol=1e-10, atol=1e-12)
    assert np.abs(narrow[6:] - wide[6:]).max(axis=1).min() > 1e-6


def test_adapter_groups_four_frames(ref):
    enc = np.random.default_rng(3).standard_normal((12, 64))
    out = ref.adapter(enc)
    assert out.shape == (3, 64)
    w0 = ref.w[P + "audio_language_projection.0.weight"]
    w2 = ref.w[P + "audio_language_projection.2.weight"]
    h = w0 @ np.concatenate(enc[4:8])
    h = 0.5 * h * (1 + np.array([math.erf(v / math.sqrt(2)) for v in h]))
    np.testing.assert_allclose(out[1], w2 @ h, rtol=1e-12, atol=1e-12)


# ----- decoder ------------------------------------------------------------------------


def test_ada_scales_depend_on_delay(ref):
    s480, s960 = ref.ada_scales(480), ref.ada_scales(960)
    assert len(s480) == 2 and s480[0].shape == (64,)
    assert np.abs(s480[0] - s960[0]).max() > 1e-3
    # t_cond at n_delay = 6: [cos(6 f), sin(6 f)], f_i = 10000^(-i/32)
    f = 10000.0 ** (-np.arange(32) / 32)
    t = np.concatenate([np.cos(6 * f), np.sin(6 * f)])
    down, up = ref.w["layers.0.ada_rms_norm_t_cond.0.weight"], ref.w["layers.0.ada_rms_norm_t_cond.2.weight"]
    h = down @ t
    h = 0.5 * h * (1 + np.array([math.erf(v / math.sqrt(2)) for v in h]))
    np.testing.assert_allclose(s480[0], up @ h, rtol=1e-12, atol=1e-12)


def test_decoder_window_and_causality(tmp_path):
    rng = np.random.default_rng(4)
    emb = rng.standard_normal((20, 64))
    toks = rng.integers(0, 1200, 20)
    wide = Reference(write_checkpoint(tmp_path / "w", dec_window=8192))
    narrow = Reference(write_checkpoint(tmp_path / "n", dec_window=4))
    lw, ln = wide.decoder_logits(emb, toks, 480), narrow.decoder_logits(emb, toks, 480)
    assert lw.shape == (20, wide.vocab_size)
    np.testing.assert_allclose(ln[:4], lw[:4], rtol=1e-10, atol=1e-10)
    assert np.abs(ln[4:] - lw[4:]).max(axis=1).min() > 1e-6
    np.testing.assert_allclose(wide.decoder_logits(emb[:7], toks[:7], 480), lw[:7],
                               rtol=1e-10, atol=1e-10)
    assert np.abs(wide.decoder_logits(emb, toks, 960) - lw).max() > 1e-3


@pytest.mark.parametrize("n", [0, 1, 1280, 5 * 1280 + 7])
def test_transcribe_token_count(ref, n):
    toks, margins = ref.transcribe(noise(n))
    assert len(toks) == len(margins) == math.ceil(n / 1280) + 11
    assert all(0 <= t < ref.vocab_size for t in toks)
    assert all(m >= 0 for m in margins)


def test_transcribe_matches_teacher_forced_logits(ref):
    audio = noise(3 * 16000, seed=5)
    for delay in (480, 160):
        emb = ref.audio_embeddings(audio, delay)
        toks, margins = ref.transcribe(audio, delay)
        prompt = ref.prompt(delay)
        inputs = prompt + toks[:-1]
        assert len(inputs) == len(emb)
        logits = ref.decoder_logits(emb, inputs, delay)[len(prompt) - 1:]
        assert logits.argmax(axis=1).tolist() == toks
        top = np.sort(logits, axis=1)
        np.testing.assert_allclose(top[:, -1] - top[:, -2], margins, rtol=1e-9, atol=1e-9)


def test_eos_is_fed_back(ref, monkeypatch):
    audio = noise(2 * 16000, seed=6)
    emb = ref.audio_embeddings(audio)
    L = len(ref.prompt(480))
    calls = []
    real = ref._decode

    def forced(x, pos0, cache, scales):
        calls.append((pos0, x.copy()))
        logits = real(x, pos0, cache, scales)
        if pos0 in (0, L + 2):  # force EOS as g_0 and g_3
            logits[-1, ref.eos] += 1e6
        return logits

    monkeypatch.setattr(ref, "_decode", forced)
    toks, _ = ref.generate(emb)
    assert toks[0] == toks[3] == ref.eos
    assert len(toks) == len(emb) - L + 1
    pos0, x = calls[1]
    assert pos0 == L
    np.testing.assert_array_equal(x[0], emb[L] + ref.embed[ref.eos])


def test_text(ref):
    tek = json.loads((ref.model_dir / "tekken.json").read_text(encoding="utf-8"))
    ids = {base64.b64decode(v["token_bytes"]): v["rank"] + 1000 for v in tek["vocab"]}
    euro = "€".encode()
    toks = [1, 32, 33, ids[b" ask"], ids[b" not"], 32, ids[euro[:2]], 33, ids[euro[2:]], 2]
    assert ref.text(toks) == " ask not€"
    assert ref.text([ids[euro[:2]]]) == "\ufffd"
    assert ref.text([ids["中".encode()]]) == "中"
