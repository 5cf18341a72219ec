"""Tekken, Mistral's byte-level BPE tokenizer, read from `tekken.json`."""

from __future__ import annotations

import base64
import codecs
import json
from functools import cached_property
from pathlib import Path

from .config import ConfigError


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable bytes stand for themselves, the rest map above U+0100."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class Tekken:
    """Ids below `n_special` are control tokens; text id = `n_special` + vocabulary rank."""

    def __init__(self, data: dict, source: str = "tekken.json"):
        try:
            config = data["config"]
            self.n_special = int(config["default_num_special_tokens"])
            self.vocab_size = int(config["default_vocab_size"])
            vocab = sorted(data["vocab"], key=lambda v: v["rank"])[: self.vocab_size - self.n_special]
            self._bytes = [base64.b64decode(v["token_bytes"]) for v in vocab]
            self.specials = {s["token_str"]: int(s["rank"]) for s in data["special_tokens"]}
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source} is not a Tekken tokenizer file ({type(e).__name__}: {e})") from None
        self.pattern = config.get("pattern")
        self.audio = data.get("audio")
        self.bos = self.special_id("<s>")
        self.eos = self.special_id("</s>")
        self.pad = self.special_id("[STREAMING_PAD]")
        self.word = self.special_id("[STREAMING_WORD]")

    @classmethod
    def from_file(cls, path: str | Path) -> "Tekken":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        return cls(data, source=str(path))

    def special_id(self, name: str) -> int:
        try:
            return self.specials[name]
        except KeyError:
            raise ConfigError(f"tekken.json has no special token {name!r}") from None

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token stands for; control tokens stand for none."""
        return self._bytes[token_id - self.n_special] if token_id >= self.n_special else b""

    def decode(self, ids) -> str:
        return b"".join(self.token_bytes(int(i)) for i in ids).decode("utf-8", errors="replace")

    def token_str(self, token_id: int) -> str:
        """One token for display: a control token by name, text as its bytes (broken UTF-8 as U+FFFD)."""
        names = self._token_strs
        if token_id not in names:
            # Cached so that a record per generated token shares one string per id.
            names[token_id] = (f"<control {token_id}>" if token_id < self.n_special
                               else self.token_bytes(token_id).decode("utf-8", errors="replace"))
        return names[token_id]

    @cached_property
    def _token_strs(self) -> dict[int, str]:
        return {i: name for name, i in self.specials.items() if i < self.n_special}

    def text_stream(self) -> "TextStream":
        return TextStream(self)

    @cached_property
    def hf(self):
        """The same vocabulary as a `tokenizers.Tokenizer` (byte-level BPE, merges from ranks)."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

        to_unicode = _byte_to_unicode()
        pieces = ["".join(to_unicode[b] for b in tok) for tok in self._bytes]
        vocab = {piece: self.n_special + rank for rank, piece in enumerate(pieces)}
        merges = []
        for rank, tok in enumerate(self._bytes):
            for cut in range(1, len(tok)):
                left, right = pieces[rank][:cut], pieces[rank][cut:]
                if left in vocab and right in vocab and vocab[left] < vocab[pieces[rank]] > vocab[right]:
                    merges.append((vocab[pieces[rank]], left, right))
        merges.sort(key=lambda m: m[0])
        specials = {name: i for name, i in self.specials.items() if i < self.n_special and name not in vocab}
        vocab.update(specials)
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for _, a, b in merges], fuse_unk=False))
        split = [pre_tokenizers.Split(Regex(self.pattern), behavior="isolated")] if self.pattern else []
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            split + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(name, special=True) for name in sorted(specials, key=specials.get)])
        # "<s>" typed in text is text: control ids come only from the engine.
        tok.encode_special_tokens = True
        return tok

    def encode(self, text: str) -> list[int]:
        """Text ids of `text` (no BOS or other control tokens)."""
        return self.hf.encode(text, add_special_tokens=False).ids


class TextStream:
    """Token ids in, text out, holding back bytes of a character split across tokens."""

    def __init__(self, tekken: Tekken):
        self.tekken = tekken
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self.tekken.token_bytes(token_id))

    def end(self) -> str:
        """Whatever is held back, as replacement characters if it never completed."""
        return self._utf8.decode(b"", final=True)
