"""Tiny random Voxtral Realtime checkpoint in the official (Mistral) file layout.

Writes `params.json`, `tekken.json` and a bfloat16 `consolidated.safetensors` with the
official tensor names, so an engine under test loads it through exactly the code path of
the real 4B model. Only numpy is used; the safetensors file is written by hand because
numpy has no bfloat16.
"""

from __future__ import annotations

import base64
import json
import pathlib
import struct

import numpy as np

P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."

N_SPECIAL = 1000

# Specials the engine looks up by name, plus a few realistic neighbours.
_NAMED_SPECIALS = {
    0: "<unk>",
    1: "<s>",
    2: "</s>",
    3: "[INST]",
    4: "[/INST]",
    5: "[AVAILABLE_TOOLS]",
    6: "[/AVAILABLE_TOOLS]",
    7: "[TOOL_RESULTS]",
    8: "[/TOOL_RESULTS]",
    9: "[TOOL_CALLS]",
    10: "[IMG]",
    11: "<pad>",
    12: "[IMG_BREAK]",
    13: "[IMG_END]",
    17: "[SYSTEM_PROMPT]",
    18: "[/SYSTEM_PROMPT]",
    24: "[AUDIO]",
    25: "[BEGIN_AUDIO]",
    32: "[STREAMING_PAD]",
    33: "[STREAMING_WORD]",
    34: "[TRANSCRIBE]",
}

# Merged text tokens after the 256 single bytes: words with and without a leading space,
# whole multi-byte characters, and partial UTF-8 sequences so a character can be split
# across tokens.
_MERGED = [
    " the", "the", " ask", "ask", " not", "not", " what", "what", " your", "your",
    " country", "country", " can", "can", " do", "do", " for", "for", " you", "you",
    "hello", " hello", " world", "world", " and", "and", " my", " fellow", " Americans",
    " so", "so", " a", " is", " of", " to", " in", "ing", "ed", "er", "th", " it",
    "é", "ü", "€", "中", "文", "中文", "\U0001F600", "café", " café", " über",
    "\u20ac".encode()[:2],          # first two bytes of the euro sign
    "\U0001F600".encode()[:2],      # first half of the emoji
    "\U0001F600".encode()[2:],      # second half of the emoji
    "中".encode()[1:],              # tail of a CJK character
    ". ", ", ", "?", "!!",          # "?" is a byte already; kept out below by dedup
]

# Entries beyond default_vocab_size - 1000: present in the file, never valid ids.
_UNUSED = [
    " zebra", " quartz", " never", " unused", " beyond", " vocab", " limit", "xyzzy",
    " plugh", " \u00e6sir",
]

_PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _token_bytes() -> tuple[list[bytes], list[bytes]]:
    used = [bytes([b]) for b in range(256)]
    seen = set(used)
    for tok in _MERGED:
        b = tok if isinstance(tok, bytes) else tok.encode("utf-8")
        if b not in seen:
            seen.add(b)
            used.append(b)
    unused = [t.encode("utf-8") for t in _UNUSED]
    assert not seen.intersection(unused)
    return used, unused


def _vocab_entry(rank: int, b: bytes) -> dict:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        s = None
    return {"rank": rank, "token_bytes": base64.b64encode(b).decode("ascii"), "token_str": s}


def _tekken(delay_ms: int, num_mel_bins: int) -> tuple[dict, int]:
    used, unused = _token_bytes()
    vocab = [_vocab_entry(i, b) for i, b in enumerate(used + unused)]
    default_vocab_size = N_SPECIAL + len(used)
    specials = [
        {"rank": i, "token_str": _NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(N_SPECIAL)
    ]
    tek = {
        "config": {
            "pattern": _PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": default_vocab_size,
            "default_num_special_tokens": N_SPECIAL,
            "version": "v13",
        },
        "vocab": vocab,
        "special_tokens": specials,
        "audio": {
            "sampling_rate": 16000,
            "frame_rate": 12.5,
            "audio_encoding_config": {
                "num_mel_bins": num_mel_bins,
                "hop_length": 160,
                "window_size": 400,
            },
            "transcription_format": "streaming",
            "transcription_delay_ms": delay_ms,
            "streaming_look_ahead_ms": 2.5,
            "streaming_look_back_ms": 52.5,
            "streaming_n_left_pad_tokens": 32,
        },
    }
    return tek, default_vocab_size


def _params(*, enc_dim, enc_layers, enc_heads, enc_head_dim, enc_hidden, enc_window, dim,
            n_layers, n_heads, n_kv_heads, head_dim, hidden_dim, dec_window, cond_dim,
            vocab_size, num_mel_bins, downsample_factor) -> dict:
    return {
        "dim": dim,
        "n_layers": n_layers,
        "head_dim": head_dim,
        "hidden_dim": hidden_dim,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "vocab_size": vocab_size,
        "norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": dec_window,
        "tied_embeddings": True,
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": cond_dim,
        "model_max_length": 131072,
        # Unknown keys a loader must ignore.
        "model_parallel": 1,
        "causal": True,
        "use_biases": False,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "dim": enc_dim,
                    "n_layers": enc_layers,
                    "head_dim": enc_head_dim,
                    "hidden_dim": enc_hidden,
                    "n_heads": enc_heads,
                    "n_kv_heads": enc_heads,
                    "use_biases": True,
                    "causal": True,
                    "rope_theta": 1e6,
                    "norm_eps": 1e-5,
                    "sliding_window": enc_window,
                    "pos_embed": "rope",
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "audio_encoding_args": {
                        "sampling_rate": 16000,
                        "frame_rate": 12.5,
                        "num_mel_bins": num_mel_bins,
                        "hop_length": 160,
                        "window_size": 400,
                        "global_log_mel_max": 1.5,
                    },
                },
                "downsample_args": {"downsample_factor": downsample_factor},
            },
        },
    }


def _tensor_specs(*, enc_dim, enc_layers, enc_heads, enc_head_dim, enc_hidden, dim, n_layers,
                  n_heads, n_kv_heads, head_dim, hidden_dim, cond_dim, vocab_size,
                  num_mel_bins, downsample_factor) -> list[tuple[str, tuple, str]]:
    """(name, shape, init kind) for every official tensor, in forward order."""
    s: list[tuple[str, tuple, str]] = [
        (E + "conv_layers.0.conv.weight", (enc_dim, num_mel_bins, 3), "conv"),
        (E + "conv_layers.0.conv.bias", (enc_dim,), "bias"),
        (E + "conv_layers.1.conv.weight", (enc_dim, enc_dim, 3), "conv"),
        (E + "conv_layers.1.conv.bias", (enc_dim,), "bias"),
    ]
    eq = enc_heads * enc_head_dim
    for i in range(enc_layers):
        L = f"{E}transformer.layers.{i}."
        s += [
            (L + "attention_norm.weight", (enc_dim,), "norm"),
            (L + "attention.wq.weight", (eq, enc_dim), "qk"),
            (L + "attention.wq.bias", (eq,), "bias"),
            (L + "attention.wk.weight", (eq, enc_dim), "qk"),
            (L + "attention.wv.weight", (eq, enc_dim), "linear"),
            (L + "attention.wv.bias", (eq,), "bias"),
            (L + "attention.wo.weight", (enc_dim, eq), "linear"),
            (L + "attention.wo.bias", (enc_dim,), "bias"),
            (L + "ffn_norm.weight", (enc_dim,), "norm"),
            (L + "feed_forward.w1.weight", (enc_hidden, enc_dim), "linear"),
            (L + "feed_forward.w3.weight", (enc_hidden, enc_dim), "linear"),
            (L + "feed_forward.w2.weight", (enc_dim, enc_hidden), "linear"),
            (L + "feed_forward.w2.bias", (enc_dim,), "bias"),
        ]
    s += [
        (E + "transformer.norm.weight", (enc_dim,), "norm"),
        (P + "audio_language_projection.0.weight", (dim, enc_dim * downsample_factor), "linear"),
        (P + "audio_language_projection.2.weight", (dim, dim), "linear"),
        (P + "tok_embeddings.weight", (vocab_size, dim), "embed"),
    ]
    for i in range(n_layers):
        L = f"layers.{i}."
        s += [
            (L + "attention_norm.weight", (dim,), "norm"),
            (L + "attention.wq.weight", (n_heads * head_dim, dim), "qk"),
            (L + "attention.wk.weight", (n_kv_heads * head_dim, dim), "qk"),
            (L + "attention.wv.weight", (n_kv_heads * head_dim, dim), "linear"),
            (L + "attention.wo.weight", (dim, n_heads * head_dim), "linear"),
            (L + "ffn_norm.weight", (dim,), "norm"),
            (L + "ada_rms_norm_t_cond.0.weight", (cond_dim, dim), "linear"),
            (L + "ada_rms_norm_t_cond.2.weight", (dim, cond_dim), "linear"),
            (L + "feed_forward.w1.weight", (hidden_dim, dim), "linear"),
            (L + "feed_forward.w3.weight", (hidden_dim, dim), "linear"),
            (L + "feed_forward.w2.weight", (dim, hidden_dim), "linear"),
        ]
    s.append(("norm.weight", (dim,), "norm"))
    return s


def _init(rng: np.random.Generator, shape: tuple, kind: str, qk_scale: float) -> np.ndarray:
    if kind == "bias":
        return 0.1 * rng.standard_normal(shape)
    if kind == "norm":
        return 1.0 + 0.1 * rng.standard_normal(shape)
    if kind == "embed":
        return rng.standard_normal(shape)
    if kind == "conv":
        return rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:]))))
    fan_in = shape[-1] if len(shape) > 1 else shape[0]
    w = rng.standard_normal(shape) / np.sqrt(fan_in)
    return w * qk_scale if kind == "qk" else w


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


def write_bf16_safetensors(file: pathlib.Path, tensors: dict[str, np.ndarray]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        arr = np.asarray(tensors[name])
        data = to_bf16_bits(arr).astype("<u2").tobytes()
        header[name] = {
            "dtype": "BF16",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def write_checkpoint(path, *, seed=0, enc_dim=64, enc_layers=2, enc_heads=4, enc_head_dim=16,
                     enc_hidden=128, enc_window=750, dim=64, n_layers=2, n_heads=4,
                     n_kv_heads=2, head_dim=16, hidden_dim=128, dec_window=8192, cond_dim=8,
                     delay_ms=480, qk_scale=4.0, num_mel_bins=128, downsample_factor=4,
                     extra_tensors=None, drop_tensors=(), reshape_tensors=None,
                     embed_std=1.0, audio_scale=1.0) -> pathlib.Path:
    """Write a tiny random checkpoint (params.json, tekken.json, consolidated.safetensors).

    Args:
        path: target directory, created if needed.
        seed: seed of the numpy Generator used for every weight.
        extra_tensors: name -> float32 array, written in addition to the official tensors.
        drop_tensors: official names to leave out.
        reshape_tensors: name -> shape; that tensor is written with this (wrong) shape.
        embed_std: std of `tok_embeddings`. At 1.0 the tied embedding dominates the output
            and greedy decoding mostly repeats its input token (large margins, few distinct
            tokens); about 0.5 gives varied tokens with smaller margins.
        audio_scale: multiplies the adapter's output layer, so the audio embedding outweighs
            the fed-back token in the decoder input and the tokens follow the audio.

    Returns:
        The directory as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tek, vocab_size = _tekken(delay_ms, num_mel_bins)
    dims = dict(enc_dim=enc_dim, enc_layers=enc_layers, enc_heads=enc_heads,
                enc_head_dim=enc_head_dim, enc_hidden=enc_hidden, dim=dim, n_layers=n_layers,
                n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
                hidden_dim=hidden_dim, cond_dim=cond_dim, vocab_size=vocab_size,
                num_mel_bins=num_mel_bins, downsample_factor=downsample_factor)
    params = _params(enc_window=enc_window, dec_window=dec_window, **dims)

    rng = np.random.default_rng(seed)
    reshape_tensors = dict(reshape_tensors or {})
    drop = set(drop_tensors)
    tensors: dict[str, np.ndarray] = {}
    for name, shape, kind in _tensor_specs(**dims):
        shape = tuple(reshape_tensors.get(name, shape))
        w = _init(rng, shape, kind, qk_scale)  # drawn even when dropped: keeps others stable
        if kind == "embed":
            w = w * embed_std
        if name == P + "audio_language_projection.2.weight":
            w = w * audio_scale
        if name not in drop:
            tensors[name] = w.astype(np.float32)
    for name, arr in (extra_tensors or {}).items():
        tensors[name] = np.asarray(arr, dtype=np.float32)

    (path / "params.json").write_text(json.dumps(params, indent=2))
    (path / "tekken.json").write_text(json.dumps(tek, ensure_ascii=False))
    write_bf16_safetensors(path / "consolidated.safetensors", tensors)
    return path
