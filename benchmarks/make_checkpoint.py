"""Random Voxtral Realtime checkpoints in the official (Mistral) file layout.

The one place that knows how a checkpoint looks on disk: `params.json`, `tekken.json` and
a bfloat16 `consolidated.safetensors` with the official tensor names and shapes. The test
fixture (`tests/tiny_checkpoint.py`) builds on it; run as a script it writes a random
checkpoint of any size, up to the real 4B geometry, for benchmarks:

    python benchmarks/make_checkpoint.py /work/models/full --preset full
    python benchmarks/make_checkpoint.py /tmp/small --layers-decoder 2 --layers-encoder 2

The safetensors file is streamed to disk one block at a time, so writing the 8.9 GB
checkpoint needs well under 1 GB of memory. Only numpy is needed (numpy has no bfloat16,
so the file is written by hand from uint16 bit patterns).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import functools
import json
import math
import pathlib
import struct
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np

P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."

N_SPECIAL = 1000

# Specials the engine looks up by name, plus a few realistic neighbours.
NAMED_SPECIALS = {
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

PATTERN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|"
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|"
    r"\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The published tekken.json holds 150000 vocab entries for 130072 usable text tokens; the
# rest are never valid ids.
N_UNUSED_VOCAB = 150_000 - 130_072


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Geometry of a checkpoint; the defaults are the real 4B model (MODEL.md section 1)."""

    enc_dim: int = 1280
    enc_layers: int = 32
    enc_heads: int = 32
    enc_head_dim: int = 64
    enc_hidden: int = 5120
    enc_window: int = 750
    dim: int = 3072
    n_layers: int = 26
    n_heads: int = 32
    n_kv_heads: int = 8
    head_dim: int = 128
    hidden_dim: int = 9216
    dec_window: int = 8192
    cond_dim: int = 32
    vocab_size: int = 131072
    num_mel_bins: int = 128
    downsample_factor: int = 4
    delay_ms: int = 480


PRESETS = {
    "full": CheckpointConfig(),
    "tiny": CheckpointConfig(
        enc_dim=64, enc_layers=2, enc_heads=4, enc_head_dim=16, enc_hidden=128, dim=64,
        n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=128, cond_dim=8,
        vocab_size=2048,
    ),
}


# ---------------------------------------------------------------------------------------
# params.json


def params(cfg: CheckpointConfig, *, official: bool = True) -> dict:
    """The params.json dict.

    official=True gives the key set and order of the published file (with its unused keys
    such as `use_cache` or `chunk_length_s`, which a loader must ignore); official=False
    gives the smaller set the test fixture has always written.
    """
    audio = {
        "sampling_rate": 16000,
        "frame_rate": 12.5,
        "num_mel_bins": cfg.num_mel_bins,
        "hop_length": 160,
        "window_size": 400,
    }
    if not official:
        return _compact_params(cfg, audio)
    return {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_dim": cfg.hidden_dim,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "use_biases": False,
        "causal": True,
        "rope_theta": 1000000.0,
        "norm_eps": 1e-05,
        "vocab_size": cfg.vocab_size,
        "model_parallel": 1,
        "tied_embeddings": True,
        "sliding_window": cfg.dec_window,
        "model_max_length": 131072,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "audio_encoding_args": {
                        **audio,
                        "chunk_length_s": None,
                        "global_log_mel_max": 1.5,
                        "transcription_format": "streaming",
                    },
                    "dim": cfg.enc_dim,
                    "n_layers": cfg.enc_layers,
                    "head_dim": cfg.enc_head_dim,
                    "hidden_dim": cfg.enc_hidden,
                    "n_heads": cfg.enc_heads,
                    "vocab_size": cfg.vocab_size,
                    "n_kv_heads": cfg.enc_heads,
                    "use_biases": True,
                    "use_cache": False,
                    "rope_theta": 1000000.0,
                    "causal": True,
                    "norm_eps": 1e-05,
                    "pos_embed": "rope",
                    "max_source_positions": None,
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "sliding_window": cfg.enc_window,
                },
                "downsample_args": {"downsample_factor": cfg.downsample_factor},
            },
        },
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": cfg.cond_dim,
    }


def _compact_params(cfg: CheckpointConfig, audio: dict) -> dict:
    return {
        "dim": cfg.dim,
        "n_layers": cfg.n_layers,
        "head_dim": cfg.head_dim,
        "hidden_dim": cfg.hidden_dim,
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size,
        "norm_eps": 1e-5,
        "rope_theta": 1e6,
        "sliding_window": cfg.dec_window,
        "tied_embeddings": True,
        "ada_rms_norm_t_cond": True,
        "ada_rms_norm_t_cond_dim": cfg.cond_dim,
        "model_max_length": 131072,
        # Unknown keys a loader must ignore.
        "model_parallel": 1,
        "causal": True,
        "use_biases": False,
        "multimodal": {
            "whisper_model_args": {
                "encoder_args": {
                    "dim": cfg.enc_dim,
                    "n_layers": cfg.enc_layers,
                    "head_dim": cfg.enc_head_dim,
                    "hidden_dim": cfg.enc_hidden,
                    "n_heads": cfg.enc_heads,
                    "n_kv_heads": cfg.enc_heads,
                    "use_biases": True,
                    "causal": True,
                    "rope_theta": 1e6,
                    "norm_eps": 1e-5,
                    "sliding_window": cfg.enc_window,
                    "pos_embed": "rope",
                    "ffn_type": "swiglu",
                    "norm_type": "rms_norm",
                    "audio_encoding_args": {**audio, "global_log_mel_max": 1.5},
                },
                "downsample_args": {"downsample_factor": cfg.downsample_factor},
            },
        },
    }


# ---------------------------------------------------------------------------------------
# Tensors


def tensor_specs(cfg: CheckpointConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) for every official tensor, in forward order.

    Kinds: conv, bias, norm, qk (query/key projections), linear, embed.
    """
    c = cfg
    s: list[tuple[str, tuple[int, ...], str]] = [
        (E + "conv_layers.0.conv.weight", (c.enc_dim, c.num_mel_bins, 3), "conv"),
        (E + "conv_layers.0.conv.bias", (c.enc_dim,), "bias"),
        (E + "conv_layers.1.conv.weight", (c.enc_dim, c.enc_dim, 3), "conv"),
        (E + "conv_layers.1.conv.bias", (c.enc_dim,), "bias"),
    ]
    eq = c.enc_heads * c.enc_head_dim
    for i in range(c.enc_layers):
        L = f"{E}transformer.layers.{i}."
        s += [
            (L + "attention_norm.weight", (c.enc_dim,), "norm"),
            (L + "attention.wq.weight", (eq, c.enc_dim), "qk"),
            (L + "attention.wq.bias", (eq,), "bias"),
            (L + "attention.wk.weight", (eq, c.enc_dim), "qk"),
            (L + "attention.wv.weight", (eq, c.enc_dim), "linear"),
            (L + "attention.wv.bias", (eq,), "bias"),
            (L + "attention.wo.weight", (c.enc_dim, eq), "linear"),
            (L + "attention.wo.bias", (c.enc_dim,), "bias"),
            (L + "ffn_norm.weight", (c.enc_dim,), "norm"),
            (L + "feed_forward.w1.weight", (c.enc_hidden, c.enc_dim), "linear"),
            (L + "feed_forward.w3.weight", (c.enc_hidden, c.enc_dim), "linear"),
            (L + "feed_forward.w2.weight", (c.enc_dim, c.enc_hidden), "linear"),
            (L + "feed_forward.w2.bias", (c.enc_dim,), "bias"),
        ]
    s += [
        (E + "transformer.norm.weight", (c.enc_dim,), "norm"),
        (P + "audio_language_projection.0.weight", (c.dim, c.enc_dim * c.downsample_factor),
         "linear"),
        (P + "audio_language_projection.2.weight", (c.dim, c.dim), "linear"),
        (P + "tok_embeddings.weight", (c.vocab_size, c.dim), "embed"),
    ]
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        L = f"layers.{i}."
        s += [
            (L + "attention_norm.weight", (c.dim,), "norm"),
            (L + "attention.wq.weight", (q, c.dim), "qk"),
            (L + "attention.wk.weight", (kv, c.dim), "qk"),
            (L + "attention.wv.weight", (kv, c.dim), "linear"),
            (L + "attention.wo.weight", (c.dim, q), "linear"),
            (L + "ffn_norm.weight", (c.dim,), "norm"),
            (L + "ada_rms_norm_t_cond.0.weight", (c.cond_dim, c.dim), "linear"),
            (L + "ada_rms_norm_t_cond.2.weight", (c.dim, c.cond_dim), "linear"),
            (L + "feed_forward.w1.weight", (c.hidden_dim, c.dim), "linear"),
            (L + "feed_forward.w3.weight", (c.hidden_dim, c.dim), "linear"),
            (L + "feed_forward.w2.weight", (c.dim, c.hidden_dim), "linear"),
        ]
    s.append(("norm.weight", (c.dim,), "norm"))
    return s


def init_std(shape: tuple[int, ...], kind: str, qk_scale: float = 1.0) -> float:
    """Standard deviation of a random weight of this kind (norms: of `weight - 1`).

    The embedding is scaled like the output head it is tied to (1/sqrt(dim)): much larger
    and the fed-back token dominates the logits, so greedy decoding repeats the prompt's
    [STREAMING_PAD] forever and no text is ever produced.
    """
    if kind in ("bias", "norm"):
        return 0.1
    if kind == "conv":
        return 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    std = 1.0 / math.sqrt(shape[-1])
    return std * qk_scale if kind == "qk" else std


# ---------------------------------------------------------------------------------------
# tekken.json


def tekken(used: list[bytes], unused: list[bytes], *, delay_ms: int,
           num_mel_bins: int) -> dict:
    """The tekken.json dict: `used` text tokens get ids 1000.., `unused` come after them in
    the file but past `default_vocab_size`, so they are never valid ids."""
    vocab = [_vocab_entry(i, b) for i, b in enumerate(used + unused)]
    specials = [
        {"rank": i, "token_str": NAMED_SPECIALS.get(i, f"<SPECIAL_{i}>"), "is_control": True}
        for i in range(N_SPECIAL)
    ]
    return {
        "config": {
            "pattern": PATTERN,
            "num_vocab_tokens": len(vocab),
            "default_vocab_size": N_SPECIAL + len(used),
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


def _vocab_entry(rank: int, b: bytes) -> dict:
    try:
        s = b.decode("utf-8")
    except UnicodeDecodeError:
        s = None
    return {"rank": rank, "token_bytes": base64.b64encode(b).decode("ascii"), "token_str": s}


_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_NON_ASCII = "éèàâçüöäßñøåæœłšžđ中文日本語한국어приветмирعربيहिन्दी€\U0001F600"


def random_vocab(n_used: int, n_unused: int, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """256 single bytes, then unique random multi-byte tokens: words with and without a
    leading space, some with non-ASCII characters, a few partial UTF-8 sequences."""
    if n_used < 256:
        raise ValueError(f"need at least the 256 single bytes, got n_used={n_used}")
    rng = np.random.default_rng([seed, 1])
    tokens = [bytes([b]) for b in range(256)]
    seen = set(tokens)
    while len(tokens) < n_used + n_unused:
        n = int(rng.integers(1, 9))
        word = "".join(_LETTERS[i] for i in rng.integers(0, len(_LETTERS), n))
        u = rng.random()
        if u < 0.1:
            pos = int(rng.integers(0, n + 1))
            word = word[:pos] + _NON_ASCII[int(rng.integers(0, len(_NON_ASCII)))] + word[pos:]
        if rng.random() < 0.5:
            word = " " + word
        b = word.encode("utf-8")
        if u > 0.99:  # a character split across tokens
            ch = _NON_ASCII[int(rng.integers(0, len(_NON_ASCII)))].encode("utf-8")
            cut = int(rng.integers(1, len(ch))) if len(ch) > 1 else 1
            b = ch[:cut] if rng.random() < 0.5 else ch[cut:]
        if len(b) > 1 and b not in seen:
            seen.add(b)
            tokens.append(b)
    return tokens[:n_used], tokens[n_used:]


# ---------------------------------------------------------------------------------------
# bfloat16 safetensors


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype(np.uint16)


# A tensor to stream: name, shape, and a function yielding its bfloat16 bit patterns
# (uint16, row-major) in pieces of any size.
TensorSource = tuple[str, tuple[int, ...], Callable[[], Iterable[np.ndarray]]]


def stream_bf16_safetensors(file: str | pathlib.Path, tensors: Iterable[TensorSource],
                            metadata: Mapping[str, str] | None = None) -> int:
    """Write a bfloat16 safetensors file, holding one piece of one tensor at a time.

    Tensors are stored in sorted name order, as the header lists them. Returns the file size.
    """
    entries = sorted(tensors, key=lambda t: t[0])
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, _ in entries:
        nbytes = 2 * math.prod(shape)
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for name, shape, pieces in entries:
            written = 0
            for piece in pieces():
                data = np.ascontiguousarray(piece, dtype="<u2")
                f.write(memoryview(data).cast("B"))
                written += data.size
            if written != math.prod(shape):
                raise ValueError(f"{name}: wrote {written} values for shape {tuple(shape)}")
    return 8 + len(h) + offset


def write_bf16_safetensors(file: str | pathlib.Path, tensors: Mapping[str, np.ndarray]) -> int:
    """Write float arrays (rounded to bfloat16) as a safetensors file."""
    def source(name: str) -> TensorSource:
        arr = np.asarray(tensors[name])
        return name, arr.shape, lambda: [to_bf16_bits(arr)]
    return stream_bf16_safetensors(file, [source(n) for n in tensors])


@functools.lru_cache(maxsize=64)
def _bf16_table(std: float) -> np.ndarray:
    """uint16 -> bf16 bits whose 65536 values have standard deviation `std` (within ~1%)."""
    target = std
    for _ in range(4):  # uniform mantissas overweight the top of each binade: re-aim
        table = _binade_table(target)
        got = float(((table.astype(np.uint32) << 16).view(np.float32)).std())
        target *= std / got
    return table


def _binade_table(std: float) -> np.ndarray:
    """The low byte gives sign and mantissa; the high byte picks a binade [2^e, 2^(e+1))
    with the probability that |N(0, std)| lands in it."""
    lo_e = math.floor(math.log2(std)) - 12
    edges = 2.0 ** np.arange(lo_e, lo_e + 17)
    cdf = np.array([math.erf(e / (std * math.sqrt(2))) for e in edges])
    p = np.diff(cdf)
    p /= p.sum()
    counts = np.floor(p * 256).astype(int)
    for i in np.argsort(-(p * 256 - counts))[: 256 - counts.sum()]:
        counts[i] += 1
    # Biased exponent fields 1..254: no denormals, no inf/NaN.
    fields = np.clip(np.arange(lo_e, lo_e + 16) + 127, 1, 254)
    exp_of_byte = np.repeat(fields, counts).astype(np.uint16)  # [256]
    lo = np.arange(256, dtype=np.uint16)
    sign_mant = ((lo & 0x80) << 8) | (lo & 0x7F)
    return (exp_of_byte[:, None] << 7 | sign_mant[None, :]).reshape(-1)  # [hi * 256 + lo]


def random_bf16(rng: np.random.Generator, n: int, std: float) -> np.ndarray:
    """n bfloat16 bit patterns spread like N(0, std): a random binade, uniform within it.

    Two random bytes per value and one table lookup, about 200x faster than rounding
    normal float32 draws.
    """
    words = rng.bit_generator.random_raw((n + 3) // 4).view(np.uint16)[:n]
    return _bf16_table(float(std))[words]


def random_tensor(seed: int, index: int, shape: tuple[int, ...], kind: str,
                  qk_scale: float = 1.0, block_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
    """bf16 bits of one random tensor, in blocks of at most `block_bytes`."""
    rng = np.random.default_rng([seed, 2, index])
    n = math.prod(shape)
    std = init_std(shape, kind, qk_scale)
    if kind in ("norm", "bias"):  # small: exact normals (norm weights near 1)
        w = std * rng.standard_normal(n, dtype=np.float32)
        yield to_bf16_bits(w + 1.0 if kind == "norm" else w)
        return
    step = max(4, block_bytes // 8 * 4)  # whole random words: blocks do not change values
    for start in range(0, n, step):
        yield random_bf16(rng, min(step, n - start), std)


# ---------------------------------------------------------------------------------------
# Whole checkpoint


def write_random_checkpoint(path: str | pathlib.Path, cfg: CheckpointConfig, *, seed: int = 0,
                            qk_scale: float = 1.0, block_bytes: int = 64 << 20,
                            n_unused_vocab: int = N_UNUSED_VOCAB) -> pathlib.Path:
    """Write params.json, tekken.json and a random bfloat16 consolidated.safetensors.

    Args:
        path: target directory, created if needed.
        cfg: the geometry; `cfg.vocab_size - 1000` random text tokens are used.
        seed: the weights and the vocabulary depend only on it (not on block_bytes).
        qk_scale: extra factor on query/key projection weights (sharper attention).
        block_bytes: size of the pieces the weights are generated and written in.
        n_unused_vocab: vocab entries in tekken.json past the used ones (the published
            file has 19928).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    used, unused = random_vocab(cfg.vocab_size - N_SPECIAL, n_unused_vocab, seed)
    tek = tekken(used, unused, delay_ms=cfg.delay_ms, num_mel_bins=cfg.num_mel_bins)
    (path / "params.json").write_text(json.dumps(params(cfg), indent=2))
    (path / "tekken.json").write_text(json.dumps(tek, ensure_ascii=False))
    specs = tensor_specs(cfg)
    sources = [
        (name, shape, functools.partial(random_tensor, seed, i, shape, kind, qk_scale,
                                        block_bytes))
        for i, (name, shape, kind) in enumerate(specs)
    ]
    stream_bf16_safetensors(path / "consolidated.safetensors", sources)
    return path


def check_checkpoint(path: str | pathlib.Path, cfg: CheckpointConfig) -> dict:
    """Re-read a written checkpoint: header, sizes, shapes (also through `mx.load` when MLX
    is installed), and finite values with a sensible spread in a few tensors."""
    path = pathlib.Path(path)
    file = path / "consolidated.safetensors"
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    specs = {name: shape for name, shape, _ in tensor_specs(cfg)}
    if set(header) != set(specs):
        raise ValueError(f"tensor names differ: {sorted(set(header) ^ set(specs))[:5]}")
    data_bytes = sum(2 * math.prod(s) for s in specs.values())
    if file.stat().st_size != 8 + n + data_bytes:
        raise ValueError(f"file is {file.stat().st_size} bytes, expected {8 + n + data_bytes}")
    for name, shape in specs.items():
        if tuple(header[name]["shape"]) != shape or header[name]["dtype"] != "BF16":
            raise ValueError(f"{name}: {header[name]} does not match {shape}")
    tek = json.loads((path / "tekken.json").read_text(encoding="utf-8"))
    if tek["config"]["default_vocab_size"] != cfg.vocab_size:
        raise ValueError("tekken.json default_vocab_size does not match vocab_size")
    bits = np.memmap(file, dtype="<u2", mode="r", offset=8 + n)
    stats = {}
    for name in [P + "tok_embeddings.weight", "norm.weight", "layers.0.attention.wq.weight",
                 E + "transformer.layers.0.feed_forward.w2.bias"]:
        a, b = header[name]["data_offsets"]
        x = (np.asarray(bits[a // 2:b // 2][: 1 << 22]).astype(np.uint32) << 16).view(np.float32)
        if not np.isfinite(x).all():
            raise ValueError(f"{name}: non-finite values")
        stats[name] = (float(x.mean()), float(x.std()))
    try:
        import mlx.core as mx
    except ImportError:
        return stats
    loaded = mx.load(str(file))
    bad = [k for k, v in loaded.items() if tuple(v.shape) != specs[k] or v.dtype != mx.bfloat16]
    if len(loaded) != len(specs) or bad:
        raise ValueError(f"mx.load: {len(loaded)} tensors, wrong: {bad[:5]}")
    return stats


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=pathlib.Path)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="full")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--qk-scale", type=float, default=1.0)
    ap.add_argument("--block-mb", type=int, default=64)
    ap.add_argument("--check", action="store_true", help="re-read and verify the output")
    aliases = {"n_layers": "--layers-decoder", "enc_layers": "--layers-encoder"}
    for field in dataclasses.fields(CheckpointConfig):
        flag = aliases.get(field.name, "--" + field.name.replace("_", "-"))
        ap.add_argument(flag, dest=field.name, type=int, default=None,
                        help=f"override the preset's {field.name}")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(CheckpointConfig)
                 if getattr(args, f.name) is not None}
    cfg = dataclasses.replace(PRESETS[args.preset], **overrides)
    t0 = time.perf_counter()
    write_random_checkpoint(args.out_dir, cfg, seed=args.seed, qk_scale=args.qk_scale,
                            block_bytes=args.block_mb << 20)
    dt = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in args.out_dir.iterdir() if f.is_file())
    n_tensors = len(tensor_specs(cfg))
    print(f"wrote {args.out_dir}: {n_tensors} tensors, {size / 1e9:.2f} GB in {dt:.1f} s "
          f"({size / 1e6 / dt:.0f} MB/s)")
    if args.check:
        t0 = time.perf_counter()
        stats = check_checkpoint(args.out_dir, cfg)
        for name, (mean, std) in stats.items():
            print(f"  {name}: mean {mean:+.4f} std {std:.4f}")
        print(f"checked in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
