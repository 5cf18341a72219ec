"""The whole network, with attribute names that mirror the official checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import RingKVCache
from .config import AudioArgs, ModelArgs
from .decoder import DecoderBlock, delay_embedding
from .encoder import StemState, WhisperEncoder


class EmbeddingModule(nn.Module):
    """`mm_streams_embeddings.embedding_module`: audio encoder, adapter and token embedding."""

    def __init__(self, args: ModelArgs, audio: AudioArgs):
        super().__init__()
        enc, dec = args.encoder, args.decoder
        self.whisper_encoder = WhisperEncoder(enc, audio)
        self.audio_language_projection = [
            nn.Linear(enc.dim * args.downsample_factor, dec.dim, bias=False),
            nn.GELU(),
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


class VoxtralRealtime(nn.Module):
    def __init__(self, args: ModelArgs, audio: AudioArgs):
        super().__init__()
        self.args = args
        self.mm_streams_embeddings = StreamsEmbeddings(args, audio)
        self.layers = [DecoderBlock(args.decoder) for _ in range(args.decoder.n_layers)]
        self.norm = nn.RMSNorm(args.decoder.dim, eps=args.decoder.norm_eps)

    @property
    def embedding_module(self) -> EmbeddingModule:
        return self.mm_streams_embeddings.embedding_module

    @property
    def encoder(self) -> WhisperEncoder:
        return self.embedding_module.whisper_encoder

    @property
    def dtype(self) -> mx.Dtype:
        return self.norm.weight.dtype

    def make_cache(self) -> Caches:
        return Caches(
            stem=self.encoder.make_stem_state(self.dtype),
            encoder=self.encoder.make_cache(),
            decoder=[RingKVCache(self.args.decoder.sliding_window) for _ in self.layers],
        )

    def encode(self, mel: mx.array, caches: Caches) -> mx.array:
        """Audio embeddings for mel frames of whole tokens: [T, n_mels] -> [T / 8, dim]."""
        frames = self.encoder(mel[None].astype(self.dtype), caches.stem, caches.encoder)
        grouped = frames.reshape(-1, frames.shape[-1] * self.args.downsample_factor)  # [T/8, 4 * enc_dim]
        for layer in self.embedding_module.audio_language_projection:
            grouped = layer(grouped)
        return grouped

    def ffn_scales(self, n_delay: int) -> list[mx.array]:
        t_cond = delay_embedding(n_delay, self.args.decoder.dim).astype(self.dtype)
        return [layer.ffn_scale(t_cond) for layer in self.layers]

    def decode(self, audio: mx.array, tokens: mx.array, caches: Caches, scales: list[mx.array]) -> mx.array:
        """Logits of the last of n positions, inputs `audio[p] + E[tokens[p]]`: [n, dim], [n] -> [vocab]."""
        tok = self.embedding_module.tok_embeddings
        x = (audio + tok(tokens))[None]  # [1, n, dim]
        mask = caches.decoder[0].make_mask(x.shape[1])
        for layer, cache, scale in zip(self.layers, caches.decoder, scales):
            x = layer(x, mask, cache, scale)
        return tok.as_linear(self.norm(x[0, -1]))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Official checkpoint -> module layout (idempotent): conv kernels [out, in, k] -> [out, k, in]."""
        expected = dict(tree_flatten(self.parameters()))
        out = {}
        for name, w in weights.items():
            want = expected.get(name)
            if want is not None and w.ndim == 3 and w.shape != want.shape and w.swapaxes(1, 2).shape == want.shape:
                w = w.swapaxes(1, 2)
            out[name] = w
        return out
