"""The whole network, with attribute names that mirror the official checkpoint."""

from __future__ import annotations

import re
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import host
from .cache import RingKVCache
from .config import AudioArgs, ModelArgs
from .decoder import DecoderBlock, delay_embedding
from .encoder import GELU, StemState, WhisperEncoder

# Official name prefixes of the audio side: the adapter and embedding (P), the encoder (E).
P = "mm_streams_embeddings.embedding_module."
E = P + "whisper_encoder."


class EmbeddingModule(nn.Module):
    """`mm_streams_embeddings.embedding_module`: audio encoder, adapter and token embedding."""

    def __init__(self, args: ModelArgs, audio: AudioArgs):
        super().__init__()
        enc, dec = args.encoder, args.decoder
        self.whisper_encoder = WhisperEncoder(enc, audio)
        self.audio_language_projection = [
            nn.Linear(enc.dim * args.downsample_factor, dec.dim, bias=False),
            GELU(),
            nn.Linear(dec.dim, dec.dim, bias=False),
        ]
        self.tok_embeddings = nn.Embedding(dec.vocab_size, dec.dim)


class StreamsEmbeddings(nn.Module):
    def __init__(self, args: ModelArgs, audio: AudioArgs):
        super().__init__()
        self.embedding_module = EmbeddingModule(args, audio)


@dataclass
class Caches:
    """Everything the network carries from one chunk of audio to the next."""

    stem: StemState
    encoder: list[RingKVCache]
    decoder: list[RingKVCache]

    def expect(self, tokens: int, frames_per_token: int):
        """Size the rings, when first written, for `tokens` decoder positions and the encoder
        frames under them (`RingKVCache.expect`)."""
        for cache in self.decoder:
            cache.expect(tokens)
        for cache in self.encoder:
            cache.expect(tokens * frames_per_token)

    def filter(self, rows: mx.array):
        """Keep only these batch rows (streams that are done leave the batch)."""
        self.stem.filter(rows)
        for cache in self.encoder + self.decoder:
            cache.filter(rows)

    def snapshot(self) -> "CachesSnapshot":
        """A copy of this state (one batch row) that `restore` can give new caches."""
        mx.eval(self.stem.tails)
        return CachesSnapshot(list(self.stem.tails), [c.snapshot() for c in self.encoder],
                              [c.snapshot() for c in self.decoder])

    def restore(self, snapshot: "CachesSnapshot", batch_size: int):
        """Take the state of `snapshot` (caches of the same model, one row), in each of `batch_size` rows."""
        self.stem.tails = [mx.repeat(t, batch_size, axis=0) for t in snapshot.tails]
        for cache, saved in zip(self.encoder + self.decoder, snapshot.encoder + snapshot.decoder):
            cache.restore(saved, batch_size)


@dataclass
class CachesSnapshot:
    """`Caches.snapshot`: the conv stem's tails and each ring's (offset, keys, values)."""

    tails: list[mx.array]
    encoder: list[tuple[int, mx.array, mx.array]]
    decoder: list[tuple[int, mx.array, mx.array]]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.tails) + sum(k.nbytes + v.nbytes for _, k, v in self.encoder + self.decoder)


class Snapshots:
    """Caches' states a model keeps for new sessions, by key (`streaming`: the state after the
    left pad, per delay and compute path); the `LIMIT` most recently used, and on disk where a
    store is given (`states`)."""

    LIMIT = 4

    def __init__(self):
        self._items: dict[tuple, CachesSnapshot] = {}
        self.store = None  # `states.Store`: the states on disk, for later processes (`load` sets it)
        self.read = 0  # states read from the store

    def get(self, key: tuple) -> CachesSnapshot | None:
        """The state kept for `key`, in memory or else in the store, or None."""
        item = self._items.pop(key, None)
        if item is None and self.store is not None:
            item = self.store.read(key)
            self.read += item is not None
        if item is not None:
            self._keep(key, item)
        return item

    def put(self, key: tuple, item: CachesSnapshot):
        """Keep `item` for `key`, in memory and in the store."""
        self._keep(key, item)
        if self.store is not None:
            self.store.write(key, item)

    def _keep(self, key: tuple, item: CachesSnapshot):
        self._items.pop(key, None)
        self._items[key] = item
        while len(self._items) > self.LIMIT:
            del self._items[next(iter(self._items))]

    @property
    def nbytes(self) -> int:
        return sum(item.nbytes for item in self._items.values())


class VoxtralRealtime(nn.Module):
    def __init__(self, args: ModelArgs, audio: AudioArgs):
        super().__init__()
        self.args = args
        self.mm_streams_embeddings = StreamsEmbeddings(args, audio)
        self.layers = [DecoderBlock(args.decoder) for _ in range(args.decoder.n_layers)]
        self.norm = nn.RMSNorm(args.decoder.dim, eps=args.decoder.norm_eps)
        self.snapshots = Snapshots()  # a plain object: not a parameter of the module

    @property
    def embedding_module(self) -> EmbeddingModule:
        return self.mm_streams_embeddings.embedding_module

    @property
    def encoder(self) -> WhisperEncoder:
        return self.embedding_module.whisper_encoder

    @property
    def dtype(self) -> mx.Dtype:
        return self.norm.weight.dtype

    def make_cache(self, batch_size: int = 1, spare: int = 0, encoder_spare: int = 0) -> Caches:
        """Empty state for `batch_size` streams. `spare` decoder slots allow rolling back that
        many positions, and passes of `spare + 1` to read the ring in place (`kernels`); so do
        `encoder_spare` slots for encoder passes of `encoder_spare + 1` frames."""
        return Caches(
            stem=self.encoder.make_stem_state(self.dtype, batch_size),
            encoder=self.encoder.make_cache(encoder_spare),
            decoder=[RingKVCache(self.args.decoder.sliding_window, spare=spare) for _ in self.layers],
        )

    def encode(self, mel: mx.array, caches: Caches) -> mx.array:
        """Audio embeddings for mel frames of whole tokens: [B, T, n_mels] -> [B, T / 8, dim]
        (one stream: [T, n_mels] -> [T / 8, dim])."""
        if mel.ndim == 2:
            return self.encode(mel[None], caches)[0]
        frames = self.encoder(mel.astype(self.dtype), caches.stem, caches.encoder)
        B, T, D = frames.shape
        k = self.args.downsample_factor
        grouped = frames.reshape(B, T // k, D * k)  # [B, T/8, 4 * enc_dim]
        if B > 1 and mx.default_device() == mx.cpu:  # each stream alone, as the conv stem (encoder)
            return mx.concatenate([self.adapt(grouped[b : b + 1]) for b in range(B)])
        return self.adapt(grouped)

    def adapt(self, grouped: mx.array) -> mx.array:
        for layer in self.embedding_module.audio_language_projection:
            grouped = layer(grouped)
        return grouped

    def ffn_scales(self, n_delay: int) -> list[mx.array]:
        t_cond = delay_embedding(n_delay, self.args.decoder.dim).astype(self.dtype)
        return [layer.ffn_scale(t_cond) for layer in self.layers]

    def decode(self, audio: mx.array, tokens: mx.array, caches: Caches, scales: list[mx.array],
               every: bool = False) -> mx.array:
        """Logits of the last of n positions, inputs `audio[p] + E[tokens[p]]`: [B, n, dim], [B, n] -> [B, vocab]
        (one stream: [n, dim], [n] -> [vocab]); with `every`, of all n: [B, n, vocab] ([n, vocab]).
        The B streams share positions, so they share the mask."""
        if tokens.ndim == 1:
            return self.decode(audio[None], tokens[None], caches, scales, every)[0]
        if host.fits(self.layers, caches.decoder, [self.embedding_module.tok_embeddings]):
            return host.decode(self, audio, tokens, caches.decoder, scales, every)
        tok = self.embedding_module.tok_embeddings
        x = audio + tok(tokens)  # [B, n, dim]
        mask = caches.decoder[0].make_mask(x.shape[1])
        for layer, cache, scale in zip(self.layers, caches.decoder, scales):
            x = layer(x, mask, cache, scale)
        return tok.as_linear(self.norm(x if every else x[:, -1]))

    def decode_rows(self, audio: mx.array, tokens: mx.array, caches: list[Caches],
                    scales: list[list[mx.array]]) -> mx.array:
        """Logits [n, vocab] of one position of each of n streams with caches and FFN scales of
        their own (sessions at positions of their own, at delays of their own), inputs
        `audio[i] + E[tokens[i]]`: [n, dim], [n]. The products read each weight once for all
        of them; on the host, each row's numbers are those of its stream's own step."""
        tok = self.embedding_module.tok_embeddings
        rings = [c.decoder for c in caches]
        if host.fits(self.layers, [r for ring in rings for r in ring], [tok]):
            return host.decode_rows(self, audio, tokens, rings, scales)
        x = (audio + tok(tokens))[:, None]  # [n, 1, dim]
        for i, layer in enumerate(self.layers):
            x = layer.rows(x, [ring[i] for ring in rings], mx.stack([s[i] for s in scales])[:, None])
        return tok.as_linear(self.norm(x[:, 0]))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Any supported layout -> module layout (idempotent; see `rename` for the name tables).

        Conv kernels [out, in, k] -> [out, k, in]; the query/key rows of Hugging Face
        transformers checkpoints, permuted there for rotate-half RoPE, are put back in the
        interleaved order `mx.fast.rope(traditional=True)` expects. Quantized layers
        (`.scales`, `.biases`) are renamed like their weights.
        """
        expected = dict(tree_flatten(self.parameters()))
        out = {}
        for name, w in weights.items():
            new, rotate_half = rename(name)
            if new is None:
                continue
            if rotate_half:
                head_dim = (self.args.encoder if new.startswith(E) else self.args.decoder).head_dim
                w = interleave_rope_rows(w, head_dim)
            want = expected.get(new)
            if want is not None and w.ndim == 3 and w.shape != want.shape and w.swapaxes(1, 2).shape == want.shape:
                w = w.swapaxes(1, 2)
            out[new] = w
        return out


# Containers of the other layouts -> official prefixes. Hugging Face transformers:
# `[model.]audio_tower`, `[model.]multi_modal_projector`, `[model.]language_model[.model]`;
# voxmlx: `encoder`, `adapter`, `language_model`; mlx-audio: `encoder`, `decoder`.
_PREFIXES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"(?:model\.)?audio_tower\.embedder\.conv1\.", E + "conv_layers.0.conv."),
    (r"(?:model\.)?audio_tower\.embedder\.conv2\.", E + "conv_layers.1.conv."),
    (r"(?:model\.)?audio_tower\.layers\.", E + "transformer.layers."),
    (r"(?:model\.)?audio_tower\.norm\.", E + "transformer.norm."),
    (r"(?:model\.)?multi_modal_projector\.linear_1\.", P + "audio_language_projection.0."),
    (r"(?:model\.)?multi_modal_projector\.linear_2\.", P + "audio_language_projection.2."),
    (r"(?:model\.)?language_model\.(?:model\.)?embed_tokens\.", P + "tok_embeddings."),
    (r"(?:model\.)?language_model\.(?:model\.)?layers\.", "layers."),
    (r"(?:model\.)?language_model\.(?:model\.)?norm\.", "norm."),
    (r"encoder\.conv1\.", E + "conv_layers.0.conv."),
    (r"encoder\.conv2\.", E + "conv_layers.1.conv."),
    (r"encoder\.conv_layers_(\d+)_conv\.conv\.", E + r"conv_layers.\1.conv."),
    (r"encoder\.(?:transformer_)?layers\.", E + "transformer.layers."),
    (r"encoder\.(?:transformer_)?norm\.", E + "transformer.norm."),
    (r"encoder\.audio_language_projection_(\d+)\.", P + r"audio_language_projection.\1."),
    (r"adapter\.w_in\.", P + "audio_language_projection.0."),
    (r"adapter\.w_out\.", P + "audio_language_projection.2."),
    (r"decoder\.tok_embeddings\.", P + "tok_embeddings."),
    (r"decoder\.layers\.", "layers."),
    (r"decoder\.norm\.", "norm."),
]]

# Modules inside an encoder or decoder layer -> official names.
_IN_LAYER = {
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "attention.q_proj": "attention.wq", "attention.k_proj": "attention.wk",
    "attention.v_proj": "attention.wv", "attention.o_proj": "attention.wo",
    "self_attn_layer_norm": "attention_norm", "input_layernorm": "attention_norm", "attn_norm": "attention_norm",
    "final_layer_norm": "ffn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2", "mlp.up_proj": "feed_forward.w3",
    "feed_forward_w1": "feed_forward.w1", "feed_forward_w2": "feed_forward.w2", "feed_forward_w3": "feed_forward.w3",
    "ada_rms_norm.linear1": "ada_rms_norm_t_cond.0", "ada_rms_norm.linear2": "ada_rms_norm_t_cond.2",
    "ada_norm.linear_in": "ada_rms_norm_t_cond.0", "ada_norm.linear_out": "ada_rms_norm_t_cond.2",
    "ada_rms_norm_t_cond.ada_down": "ada_rms_norm_t_cond.0", "ada_rms_norm_t_cond.ada_up": "ada_rms_norm_t_cond.2",
}
_LAYER = re.compile(r"((?:" + re.escape(E) + r"transformer\.)?layers\.\d+\.)(.+)\.(\w+)$")
# Derived or duplicated tensors of the transformers layout: the output head is tied to the
# embedding, and the delay embedding's frequencies are recomputed.
_DROP = re.compile(r"(?:model\.)?(?:language_model\.)?lm_head\.weight$|(?:model\.)?time_embedding\.inv_freq$")


def rename(name: str) -> tuple[str | None, bool]:
    """(official name or None to drop it, whether its rows are in rotate-half order)."""
    if _DROP.match(name):
        return None, False
    for pattern, replacement in _PREFIXES:
        m = pattern.match(name)
        if m:
            name = m.expand(replacement) + name[m.end():]
            break
    m = _LAYER.match(name)
    if m and m[2] in _IN_LAYER:
        return f"{m[1]}{_IN_LAYER[m[2]]}.{m[3]}", m[2] in ("self_attn.q_proj", "self_attn.k_proj")
    return name, False


def interleave_rope_rows(w: mx.array, head_dim: int) -> mx.array:
    """Undo transformers' q/k permutation: per head, rows [x0, x2, .., x1, x3, ..] -> [x0, x1, x2, ..].

    Rows are independent, so this applies alike to weights, biases and quantized
    weights, scales and biases.
    """
    rows = w.shape[0]
    return w.reshape(rows // head_dim, 2, head_dim // 2, -1).swapaxes(1, 2).reshape(w.shape)


def should_quantize(path: str, module: nn.Module, group_size: int) -> bool:
    """The layers a conversion quantizes: every linear layer and the tied embedding whose
    input dimension is a multiple of the group size, except the tiny delay-conditioning MLP."""
    if not isinstance(module, (nn.Linear, nn.Embedding)) or "ada_rms_norm_t_cond" in path:
        return False
    return module.weight.shape[1] % group_size == 0
