"""Float64 numpy reference of the Voxtral Realtime computation (MODEL.md).

Independent of the engine under test: it reads the official checkpoint layout with its own
safetensors reader and computes every stage offline, in float64, with numpy only. Meant
for tiny test checkpoints; the decoder caches keys and values so a transcription costs one
small step per 80 ms token.
"""

from __future__ import annotations

import base64
import json
import math
import pathlib
import struct

import numpy as np

P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."

_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16}


def read_safetensors(file) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file as float64 arrays (BF16 widened exactly)."""
    raw = pathlib.Path(file).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        buf = raw[base + start:base + end]
        shape = tuple(info["shape"])
        if info["dtype"] == "BF16":
            bits = np.frombuffer(buf, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        elif info["dtype"] in _DTYPES:
            arr = np.frombuffer(buf, dtype=np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<"))
        else:
            raise ValueError(f"{name}: unsupported dtype {info['dtype']}")
        out[name] = arr.astype(np.float64).reshape(shape)
    return out


_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(np.float64))


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x: np.ndarray, pos: np.ndarray, theta: float) -> np.ndarray:
    """Interleaved RoPE: pairs (x[2d], x[2d+1]) rotated by pos * theta^(-2d/head_dim)."""
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.asarray(pos, dtype=np.float64)[:, None] * inv[None, :]  # [n, hd/2]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out


def attention(q, k, v, q_pos0: int, window: int, chunk: int = 256) -> np.ndarray:
    """Causal sliding-window GQA attention.

    q [n, H, hd] at positions q_pos0 .. q_pos0+n-1; k, v [m, KVH, hd] at positions 0 .. m-1.
    A query at position p sees keys p-window+1 .. p. Query head h uses KV head h // (H/KVH).
    """
    n, H, hd = q.shape
    KVH = k.shape[1]
    rep = H // KVH
    out = np.empty((n, H, hd))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        qp = q_pos0 + np.arange(s, e)
        lo, hi = max(0, int(qp[0]) - window + 1), int(qp[-1]) + 1
        kp = np.arange(lo, hi)
        qc = q[s:e].reshape(e - s, KVH, rep, hd).transpose(1, 2, 0, 3)  # [KVH, rep, nq, hd]
        kc = k[lo:hi].transpose(1, 0, 2)[:, None]  # [KVH, 1, nk, hd]
        vc = v[lo:hi].transpose(1, 0, 2)[:, None]
        scores = (qc @ kc.swapaxes(-1, -2)) / math.sqrt(hd)  # [KVH, rep, nq, nk]
        ok = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - window)
        scores = np.where(ok, scores, -np.inf)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        o = scores @ vc  # [KVH, rep, nq, hd]
        out[s:e] = o.transpose(2, 0, 1, 3).reshape(e - s, H, hd)
    return out


def linear(x, w, b=None):
    y = x @ w.T
    return y if b is None else y + b


class Reference:
    """Float64 reference model read from an official-layout model directory."""

    def __init__(self, model_dir):
        self.model_dir = d = pathlib.Path(model_dir)
        self.params = p = json.loads((d / "params.json").read_text())
        self.tekken = tek = json.loads((d / "tekken.json").read_text(encoding="utf-8"))
        self.w = read_safetensors(d / "consolidated.safetensors")

        wm = p["multimodal"]["whisper_model_args"]
        ea = wm["encoder_args"]
        au = ea["audio_encoding_args"]
        self.sr = int(au["sampling_rate"])
        self.hop = int(au["hop_length"])
        self.n_fft = int(au["window_size"])
        self.n_mels = int(au["num_mel_bins"])
        self.log_mel_max = float(au["global_log_mel_max"])
        self.samples_per_token = int(round(self.sr / au["frame_rate"]))
        self.downsample = int(wm["downsample_args"]["downsample_factor"])
        assert self.samples_per_token == self.hop * 2 * self.downsample

        self.enc_dim = ea["dim"]
        self.enc_layers = ea["n_layers"]
        self.enc_heads = ea["n_heads"]
        self.enc_kv_heads = ea.get("n_kv_heads", ea["n_heads"])
        self.enc_head_dim = ea["head_dim"]
        self.enc_theta = float(ea["rope_theta"])
        self.enc_eps = float(ea["norm_eps"])
        self.enc_window = int(ea["sliding_window"])

        self.dim = p["dim"]
        self.n_layers = p["n_layers"]
        self.n_heads = p["n_heads"]
        self.n_kv_heads = p["n_kv_heads"]
        self.head_dim = p["head_dim"]
        self.vocab_size = p["vocab_size"]
        self.theta = float(p["rope_theta"])
        self.eps = float(p["norm_eps"])
        self.window = int(p["sliding_window"])

        a = tek["audio"]
        self.n_left = int(a["streaming_n_left_pad_tokens"])
        self.default_delay_ms = int(a["transcription_delay_ms"])
        specials = {s["token_str"]: s["rank"] for s in tek["special_tokens"]}
        self.bos = specials["<s>"]
        self.eos = specials["</s>"]
        self.pad_id = specials["[STREAMING_PAD]"]
        self.word_id = specials["[STREAMING_WORD]"]
        self.n_special = int(tek["config"]["default_num_special_tokens"])
        n_text = int(tek["config"]["default_vocab_size"]) - self.n_special
        vocab = sorted(tek["vocab"], key=lambda v: v["rank"])[:n_text]
        self.vocab = [base64.b64decode(v["token_bytes"]) for v in vocab]

        self._check_shapes()
        self.embed = self.w[P + "tok_embeddings.weight"]
        self._filters = None
        self.mel_filters()

    def _check_shapes(self):
        ed, eq = self.enc_dim, self.enc_heads * self.enc_head_dim
        ekv = self.enc_kv_heads * self.enc_head_dim
        d, q, kv = self.dim, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        want = {
            E + "conv_layers.0.conv.weight": (ed, self.n_mels, 3),
            E + "conv_layers.1.conv.weight": (ed, ed, 3),
            E + "transformer.norm.weight": (ed,),
            P + "audio_language_projection.0.weight": (d, ed * self.downsample),
            P + "audio_language_projection.2.weight": (d, d),
            P + "tok_embeddings.weight": (self.vocab_size, d),
            "norm.weight": (d,),
        }
        for i in range(self.enc_layers):
            L = f"{E}transformer.layers.{i}.attention."
            want.update({L + "wq.weight": (eq, ed), L + "wk.weight": (ekv, ed),
                         L + "wv.weight": (ekv, ed), L + "wo.weight": (ed, eq)})
        for i in range(self.n_layers):
            L = f"layers.{i}.attention."
            want.update({L + "wq.weight": (q, d), L + "wk.weight": (kv, d),
                         L + "wv.weight": (kv, d), L + "wo.weight": (d, q)})
        for name, shape in want.items():
            if name not in self.w:
                raise KeyError(f"missing tensor {name}")
            if self.w[name].shape != shape:
                raise ValueError(f"{name}: shape {self.w[name].shape}, expected {shape}")

    # ----- geometry -------------------------------------------------------------------

    def n_delay(self, delay_ms) -> int:
        if isinstance(delay_ms, bool) or float(delay_ms) != int(delay_ms):
            raise ValueError(f"invalid delay {delay_ms!r}")
        ms = int(delay_ms)
        if not ((80 <= ms <= 1200 and ms % 80 == 0) or ms == 2400):
            raise ValueError(f"delay must be a multiple of 80 ms in 80..1200, or 2400; got {ms}")
        return ms // 80

    def _delay(self, delay_ms):
        return self.default_delay_ms if delay_ms is None else delay_ms

    def prompt(self, delay_ms) -> list[int]:
        return [self.bos] + [self.pad_id] * (self.n_left + self.n_delay(delay_ms))

    def pad(self, audio, delay_ms) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float64).reshape(-1)
        spt = self.samples_per_token
        right = -len(audio) % spt + (self.n_delay(delay_ms) + 1 + 10) * spt
        return np.concatenate([np.zeros(self.n_left * spt), audio, np.zeros(right)])

    # ----- front end --------------------------------------------------------------------

    def mel_filters(self) -> np.ndarray:
        """Slaney mel bank (librosa htk=False, norm='slaney'), [n_fft//2+1, n_mels]."""
        if self._filters is not None:
            return self._filters
        f_sp, min_log_hz = 200.0 / 3, 1000.0
        min_log_mel = min_log_hz / f_sp
        logstep = math.log(6.4) / 27.0

        def hz_to_mel(f):
            f = np.asarray(f, dtype=np.float64)
            lin = f / f_sp
            log = min_log_mel + np.log(np.maximum(f, min_log_hz) / min_log_hz) / logstep
            return np.where(f >= min_log_hz, log, lin)

        def mel_to_hz(m):
            m = np.asarray(m, dtype=np.float64)
            lin = f_sp * m
            log = min_log_hz * np.exp(logstep * (m - min_log_mel))
            return np.where(m >= min_log_mel, log, lin)

        n_bins = self.n_fft // 2 + 1
        fft_f = np.linspace(0.0, self.sr / 2, n_bins)
        mel_f = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(self.sr / 2), self.n_mels + 2))
        fdiff = np.diff(mel_f)
        ramps = mel_f[:, None] - fft_f[None, :]
        lower = -ramps[:-2] / fdiff[:-1, None]
        upper = ramps[2:] / fdiff[1:, None]
        w = np.maximum(0.0, np.minimum(lower, upper))  # [n_mels, n_bins]
        w *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
        self._filters = w.T.copy()
        self.mel_centers_hz = mel_f[1:-1]
        return self._filters

    def log_mel(self, padded) -> np.ndarray:
        x = np.asarray(padded, dtype=np.float64)
        half = self.n_fft // 2
        x = np.pad(x, half, mode="reflect")
        frames = np.lib.stride_tricks.sliding_window_view(x, self.n_fft)[::self.hop][:-1]
        k = np.arange(self.n_fft)
        window = 0.5 - 0.5 * np.cos(2 * math.pi * k / self.n_fft)  # periodic Hann
        spec = np.fft.rfft(frames * window, axis=-1)
        power = spec.real ** 2 + spec.imag ** 2  # [T, n_fft//2+1]
        mel = power @ self.mel_filters()
        logm = np.log10(np.maximum(mel, 1e-10))
        logm = np.maximum(logm, self.log_mel_max - 8.0)
        return (logm + 4.0) / 4.0

    # ----- encoder ----------------------------------------------------------------------

    def conv_stem(self, mel) -> np.ndarray:
        x = np.asarray(mel, dtype=np.float64)
        T = x.shape[0]
        w0, b0 = self.w[E + "conv_layers.0.conv.weight"], self.w[E + "conv_layers.0.conv.bias"]
        w1, b1 = self.w[E + "conv_layers.1.conv.weight"], self.w[E + "conv_layers.1.conv.bias"]
        xp = np.concatenate([np.zeros((2, x.shape[1])), x])
        # tap k of output t reads input t - 2 + k
        y = b0 + sum(xp[k:k + T] @ w0[:, :, k].T for k in range(3))
        y = gelu(y)
        n_out = (T - 2) // 2 + 1 if T >= 2 else 0
        yp = np.concatenate([np.zeros((1, y.shape[1])), y])
        # output j reads first-conv frames 2j-1, 2j, 2j+1
        z = b1 + sum(yp[k:k + 2 * n_out:2] @ w1[:, :, k].T for k in range(3))
        return gelu(z)

    def encoder(self, mel) -> np.ndarray:
        x = self.conv_stem(mel)
        T = x.shape[0]
        pos = np.arange(T)
        H, KVH, hd = self.enc_heads, self.enc_kv_heads, self.enc_head_dim
        for i in range(self.enc_layers):
            L = f"{E}transformer.layers.{i}."
            w = lambda n: self.w[L + n]  # noqa: E731
            h = rms_norm(x, w("attention_norm.weight"), self.enc_eps)
            q = linear(h, w("attention.wq.weight"), w("attention.wq.bias")).reshape(T, H, hd)
            k = linear(h, w("attention.wk.weight")).reshape(T, KVH, hd)
            v = linear(h, w("attention.wv.weight"), w("attention.wv.bias")).reshape(T, KVH, hd)
            q, k = rope(q, pos, self.enc_theta), rope(k, pos, self.enc_theta)
            a = attention(q, k, v, 0, self.enc_window).reshape(T, H * hd)
            x = x + linear(a, w("attention.wo.weight"), w("attention.wo.bias"))
            h = rms_norm(x, w("ffn_norm.weight"), self.enc_eps)
            g = silu(linear(h, w("feed_forward.w1.weight"))) * linear(h, w("feed_forward.w3.weight"))
            x = x + linear(g, w("feed_forward.w2.weight"), w("feed_forward.w2.bias"))
        return rms_norm(x, self.w[E + "transformer.norm.weight"], self.enc_eps)

    def adapter(self, enc) -> np.ndarray:
        enc = np.asarray(enc, dtype=np.float64)
        n = enc.shape[0] // self.downsample
        x = enc[:n * self.downsample].reshape(n, self.downsample * enc.shape[1])  # [T/4, 4*D]
        x = gelu(linear(x, self.w[P + "audio_language_projection.0.weight"]))
        return linear(x, self.w[P + "audio_language_projection.2.weight"])

    def audio_embeddings(self, audio, delay_ms=None) -> np.ndarray:
        padded = self.pad(audio, self._delay(delay_ms))
        return self.adapter(self.encoder(self.log_mel(padded)))

    # ----- decoder ----------------------------------------------------------------------

    def ada_scales(self, delay_ms) -> list[np.ndarray]:
        nd = self.n_delay(delay_ms)
        half = self.dim // 2
        f = np.exp(-math.log(10000.0) * np.arange(half) / half)
        t_cond = np.concatenate([np.cos(nd * f), np.sin(nd * f)])
        out = []
        for i in range(self.n_layers):
            down = self.w[f"layers.{i}.ada_rms_norm_t_cond.0.weight"]
            up = self.w[f"layers.{i}.ada_rms_norm_t_cond.2.weight"]
            out.append(up @ gelu(down @ t_cond))
        return out

    def _new_cache(self, capacity: int):
        shape = (capacity, self.n_kv_heads, self.head_dim)
        return [(np.zeros(shape), np.zeros(shape)) for _ in range(self.n_layers)]

    def _decode(self, x, pos0: int, cache, scales) -> np.ndarray:
        """Run positions pos0 .. pos0+n-1 (x [n, dim]), writing keys/values into cache.

        Returns the logits [n, vocab]."""
        n = x.shape[0]
        pos = pos0 + np.arange(n)
        H, KVH, hd = self.n_heads, self.n_kv_heads, self.head_dim
        for i in range(self.n_layers):
            L = f"layers.{i}."
            w = lambda n_: self.w[L + n_]  # noqa: E731
            h = rms_norm(x, w("attention_norm.weight"), self.eps)
            q = rope(linear(h, w("attention.wq.weight")).reshape(n, H, hd), pos, self.theta)
            k = rope(linear(h, w("attention.wk.weight")).reshape(n, KVH, hd), pos, self.theta)
            v = linear(h, w("attention.wv.weight")).reshape(n, KVH, hd)
            ck, cv = cache[i]
            ck[pos0:pos0 + n], cv[pos0:pos0 + n] = k, v
            a = attention(q, ck[:pos0 + n], cv[:pos0 + n], pos0, self.window)
            x = x + linear(a.reshape(n, H * hd), w("attention.wo.weight"))
            h = rms_norm(x, w("ffn_norm.weight"), self.eps) * (1.0 + scales[i])
            g = silu(linear(h, w("feed_forward.w1.weight"))) * linear(h, w("feed_forward.w3.weight"))
            x = x + linear(g, w("feed_forward.w2.weight"))
        return rms_norm(x, self.w["norm.weight"], self.eps) @ self.embed.T

    def decoder_logits(self, embeds, tokens, delay_ms) -> np.ndarray:
        """Logits [n, vocab] for inputs embeds[p] + E[tokens[p]] at positions 0 .. n-1."""
        embeds = np.asarray(embeds, dtype=np.float64)
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens)
        x = embeds[:n] + self.embed[tokens]
        return self._decode(x, 0, self._new_cache(n), self.ada_scales(delay_ms))

    def generate(self, embeds, delay_ms=None) -> tuple[list[int], list[float]]:
        """Greedy decoding over all audio positions L-1 .. N-1 (MODEL.md section 7).

        EOS does not stop decoding. Returns (tokens, top1 - top2 logit margins)."""
        delay_ms = self._delay(delay_ms)
        embeds = np.asarray(embeds, dtype=np.float64)
        prompt = self.prompt(delay_ms)
        L, N = len(prompt), embeds.shape[0]
        if N < L:
            raise ValueError(f"{N} audio embeddings, fewer than the prompt length {L}")
        scales = self.ada_scales(delay_ms)
        cache = self._new_cache(N)
        logits = self._decode(embeds[:L] + self.embed[prompt], 0, cache, scales)[-1]
        tokens, margins = [], []
        for p in range(L, N + 1):
            top2 = np.partition(logits, -2)[-2:]
            tok = int(np.argmax(logits))
            tokens.append(tok)
            margins.append(float(top2[1] - top2[0]))
            if p == N:
                break
            x = embeds[p:p + 1] + self.embed[tok]
            logits = self._decode(x, p, cache, scales)[0]
        return tokens, margins

    def transcribe(self, audio, delay_ms=None) -> tuple[list[int], list[float]]:
        """Offline greedy transcription: ceil(len(audio) / 1280) + 11 tokens and margins."""
        delay_ms = self._delay(delay_ms)
        self.n_delay(delay_ms)
        return self.generate(self.audio_embeddings(audio, delay_ms), delay_ms)

    def text(self, tokens) -> str:
        b = b"".join(self.vocab[t - self.n_special] for t in tokens if t >= self.n_special)
        return b.decode("utf-8", errors="replace")
