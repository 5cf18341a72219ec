import os
import sys
import wave
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
# Models load without a store of states on disk (`states`; test_states gives each test its own):
# tests change kernels and settings under one model directory, and no test writes to the user's cache.
os.environ.setdefault("VOXTRAL_MLX_STATES", "off")
os.environ.setdefault("VOXTRAL_MLX_PACKS", "off")  # (`packs`: test_packs gives each test its own)

from reference import Reference  # noqa: E402
from tiny_checkpoint import write_checkpoint  # noqa: E402

from voxtral_mlx import cpu_kernels  # noqa: E402

# Built once before any test, so that no command a test runs is the one that compiles them (and says so).
cpu_kernels.library()

AUDIO = TESTS.parent.parent / "shared" / "audio"
if not AUDIO.is_dir():
    AUDIO = Path("/work/shared/audio")


def speech(name: str = "jfk") -> np.ndarray:
    """A shared public-domain recording as float32 16 kHz mono."""
    with wave.open(str(AUDIO / f"{name}.wav")) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768


def synthetic(seconds: float, seed: int = 0) -> np.ndarray:
    """A chirp, a pause, and noise bursts: a signal whose every token differs."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    chirp = 0.3 * np.sin(2 * np.pi * (200 + 900 * t) * t)
    bursts = rng.normal(0, 0.2, t.size) * (np.sin(2 * np.pi * 1.3 * t) > 0.4)
    x = chirp + bursts
    x[(t > seconds * 0.4) & (t < seconds * 0.5)] = 0
    return x.astype(np.float32)


_CHECKPOINTS: dict = {}


def checkpoint(tmp_root: Path, **overrides) -> Path:
    """A tiny random checkpoint for these overrides, written once per test session.

    The adapter output is scaled up so that tokens follow the audio (at scale 1 the fed-back
    token dominates and greedy decoding repeats it whatever the audio), and control tokens
    the model never emits are scaled down so that the output is text.
    """
    overrides.setdefault("audio_scale", 6.0)
    overrides.setdefault("control_scale", 0.3)
    key = tuple(sorted(overrides.items()))
    if key not in _CHECKPOINTS:
        path = tmp_root / f"ckpt{len(_CHECKPOINTS)}"
        _CHECKPOINTS[key] = write_checkpoint(path, **overrides)
    return _CHECKPOINTS[key]


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def tiny_dir(ckpt_root) -> Path:
    return checkpoint(ckpt_root)


@pytest.fixture(scope="session")
def small_windows_dir(ckpt_root) -> Path:
    """Encoder window of 24 frames and decoder window of 20 positions: both are exceeded."""
    return checkpoint(ckpt_root, enc_window=24, dec_window=20, seed=1)


@pytest.fixture(scope="session")
def timed_dir(ckpt_root) -> Path:
    """Emits pad runs, word markers and text: [STREAMING_PAD] and [STREAMING_WORD] take the
    embedding rows of " " and "l", two frequent tokens of the plain model on this audio."""
    return checkpoint(ckpt_root, embed_std=0.5, swap_rows=((32, 1032), (33, 1108)))


@lru_cache(maxsize=None)
def load_model(path: Path, dtype: str = "float32"):
    import voxtral_mlx

    return voxtral_mlx.load(path, dtype=dtype)


def load_mlx(path: Path, dtype: str = "float32"):
    """The model on MLX's own float32 graphs, as CPUs without MKL and AMX run it: where they
    are, `load` keeps a bfloat16 checkpoint's product weights bfloat16 and multiplies them in
    float32 through `mkl_bf16` (uncached: callers may change the model)."""
    from unittest import mock

    import voxtral_mlx
    from voxtral_mlx import mkl_bf16

    with mock.patch.object(mkl_bf16, "float32_available", lambda: False):
        return voxtral_mlx.load(path, dtype=dtype)


@lru_cache(maxsize=None)
def reference(path: Path) -> Reference:
    return Reference(path)


def forced_logits(model, audio, tokens, delay_ms=480) -> np.ndarray:
    """Logits of every generated position with the input tokens forced to `tokens` (teacher
    forcing), one decoder step at a time: [len(tokens) + 1, vocab] float32."""
    import mlx.core as mx

    from voxtral_mlx.audio import LogMel

    net, a = model.net, model.audio
    n_delay = a.delay_tokens(delay_ms)
    spt = a.samples_per_token
    padded = np.concatenate([np.zeros(a.n_left_pad_tokens * spt), audio,
                             np.zeros(-audio.size % spt + (n_delay + 11) * spt)])
    span = np.concatenate([np.zeros(a.window_size // 2), padded, np.zeros(a.look_ahead)]).astype(np.float32)
    caches = net.make_cache()
    emb = net.encode(LogMel(a)(mx.array(span)), caches)
    scales = net.ffn_scales(n_delay)
    prompt = [model.tokenizer.bos] + [model.tokenizer.pad] * (a.n_left_pad_tokens + n_delay)
    inputs = prompt + tokens
    out = []
    for p in range(emb.shape[0]):
        logits = net.decode(emb[p : p + 1], mx.array(inputs[p : p + 1]), caches, scales)
        if p >= len(prompt) - 1:
            out.append(np.array(logits.astype(mx.float32)))
    return np.stack(out)
