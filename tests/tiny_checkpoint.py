"""Tiny random Voxtral Realtime checkpoint in the official (Mistral) file layout.

Writes `params.json`, `tekken.json` and a bfloat16 `consolidated.safetensors` with the
official tensor names, so an engine under test loads it through exactly the code path of
the real 4B model. The layout itself (names, shapes, file formats) lives in
`benchmarks/make_checkpoint.py`; this file holds the tiny vocabulary and the init scheme
the tests rely on.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import numpy as np  # noqa: E402

from make_checkpoint import (  # noqa: E402,F401  (to_bf16_bits is re-exported for tests)
    N_SPECIAL,
    P,
    CheckpointConfig,
    params,
    tekken,
    tensor_specs,
    to_bf16_bits,
    write_bf16_safetensors,
)

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


def write_checkpoint(path, *, seed=0, enc_dim=64, enc_layers=2, enc_heads=4, enc_head_dim=16,
                     enc_hidden=128, enc_window=750, dim=64, n_layers=2, n_heads=4,
                     n_kv_heads=2, head_dim=16, hidden_dim=128, dec_window=8192, cond_dim=8,
                     delay_ms=480, qk_scale=4.0, num_mel_bins=128, downsample_factor=4,
                     extra_tensors=None, drop_tensors=(), reshape_tensors=None,
                     embed_std=1.0, audio_scale=1.0, control_scale=1.0, swap_rows=()) -> pathlib.Path:
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
        control_scale: multiplies the embedding rows of the control tokens the model never
            emits (all ids below 1000 except EOS, [STREAMING_PAD] and [STREAMING_WORD]), so
            that greedy decoding picks text, pads and word markers as the real model does.
        swap_rows: pairs of token ids whose embedding rows are exchanged. Swapping a control
            id with a frequent text id makes the model emit the control token where it would
            emit that text (through the tied output head): with [STREAMING_PAD] and
            [STREAMING_WORD] this gives a mix of pad runs, word markers and text.

    Returns:
        The directory as a `pathlib.Path`.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    used, unused = _token_bytes()
    cfg = CheckpointConfig(
        enc_dim=enc_dim, enc_layers=enc_layers, enc_heads=enc_heads, enc_head_dim=enc_head_dim,
        enc_hidden=enc_hidden, enc_window=enc_window, dim=dim, n_layers=n_layers,
        n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim, hidden_dim=hidden_dim,
        dec_window=dec_window, cond_dim=cond_dim, vocab_size=N_SPECIAL + len(used),
        num_mel_bins=num_mel_bins, downsample_factor=downsample_factor, delay_ms=delay_ms)

    rng = np.random.default_rng(seed)
    reshape_tensors = dict(reshape_tensors or {})
    drop = set(drop_tensors)
    tensors: dict[str, np.ndarray] = {}
    for name, shape, kind in tensor_specs(cfg):
        shape = tuple(reshape_tensors.get(name, shape))
        w = _init(rng, shape, kind, qk_scale)  # drawn even when dropped: keeps others stable
        if kind == "embed":
            w = w * embed_std
            emitted = [2, 32, 33]  # EOS, [STREAMING_PAD], [STREAMING_WORD]
            w[[i for i in range(N_SPECIAL) if i not in emitted]] *= control_scale
            for a, b in swap_rows:
                w[[a, b]] = w[[b, a]]
        if name == P + "audio_language_projection.2.weight":
            w = w * audio_scale
        if name not in drop:
            tensors[name] = w.astype(np.float32)
    for name, arr in (extra_tensors or {}).items():
        tensors[name] = np.asarray(arr, dtype=np.float32)

    tek = tekken(used, unused, delay_ms=delay_ms, num_mel_bins=num_mel_bins)
    (path / "params.json").write_text(json.dumps(params(cfg, official=False), indent=2))
    (path / "tekken.json").write_text(json.dumps(tek, ensure_ascii=False))
    write_bf16_safetensors(path / "consolidated.safetensors", tensors)
    return path
