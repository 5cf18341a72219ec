"""Timed transcripts: token records, words and segments from the generated tokens.

Token `g_k` describes `[k * 80, (k + 1) * 80)` ms of the stream (MODEL.md section 7), so
timing needs no alignment model. The rules, applied as tokens arrive so that a streaming
session and an offline run give the same records:

- A word starts at a `[STREAMING_WORD]` marker (the first one since the last text token)
  and takes the text tokens that follow. Without a marker, a text token starts a new word
  when it begins with whitespace or the word so far ends with whitespace; other text
  continues the word. Text without a visible character never makes a word of its own.
- A word ends where the next word of its segment starts. The last word of a segment ends
  where the first token without text after it begins (a pad, a marker or EOS).
- A segment ends after a word that ends a sentence (`.!?…。！？؟।`, closing quotes allowed),
  at a pause (more than `pause_ms` of tokens without text after a word), at EOS, and where
  a streaming session is flushed or finished.
- A word's probability is the mean of its text tokens' probabilities.

Times are seconds of the input audio. Where a session feeds padding that is not audio (the
right padding of `flush` and `finish`, `skip`), the time axis leaves it out: a token decoded
in it is timed at the end of the audio before it (so no time lies past the audio's end), and
later audio goes on from there.

A word is final once the next word starts or its segment ends; a segment once it ends.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from .tokenizer import Tekken

# A segment ends after more than this much time without text.
DEFAULT_PAUSE_MS = 1000.0
SENTENCE_END = ".!?…。！？؟।"
CLOSING_MARKS = "\"'”’)]}»」』"


@dataclass(slots=True)
class Alternative:
    """One of the most probable tokens at a step."""

    id: int
    text: str
    probability: float


@dataclass(slots=True)
class TokenRecord:
    """One generated token.

    Attributes:
        id: the token id (control tokens included).
        text: the token for display: text as its bytes decode, a control token by name.
        time: start in seconds of the 80 ms of audio it describes.
        probability: its softmax probability.
        alternatives: the most probable tokens, best first, when asked for (else None).
    """

    id: int
    text: str
    time: float
    probability: float
    alternatives: list[Alternative] | None = None


@dataclass(slots=True)
class Word:
    """A word in seconds; `text` keeps its leading space, as in the transcript."""

    start: float
    end: float
    text: str
    probability: float


@dataclass
class Segment:
    """A sentence or a stretch of speech between pauses; `span` is the range of indices of its
    tokens in the timeline's records (None for a segment read back from JSON)."""

    start: float
    end: float
    text: str
    words: list[Word] = field(default_factory=list)
    span: range | None = field(default=None, compare=False, repr=False)


def ends_sentence(text: str) -> bool:
    text = text.rstrip().rstrip(CLOSING_MARKS)
    return bool(text) and text[-1] in SENTENCE_END


class _OpenWord:
    __slots__ = ("start", "last", "text", "probabilities")

    def __init__(self, start: int):
        self.start = start
        self.last = start
        self.text = ""
        self.probabilities: list[float] = []

    @property
    def visible(self) -> bool:
        return bool(self.text.strip())


class Timeline:
    """Generated ids in; text, token records, words and segments out, as each becomes final.

    Args:
        tokenizer: the model's tokenizer (control ids, token text).
        token_ms: audio per token (80).
        pause_ms: a segment ends after more than this much time without text (default 1000).
        on_token, on_word, on_segment: called with each record, word and segment as it
            becomes final.
    """

    def __init__(self, tokenizer: Tekken, token_ms: float, pause_ms: float | None = None,
                 on_token: Callable[[TokenRecord], None] | None = None,
                 on_word: Callable[[Word], None] | None = None,
                 on_segment: Callable[[Segment], None] | None = None):
        if pause_ms is None:
            pause_ms = DEFAULT_PAUSE_MS
        if isinstance(pause_ms, bool) or not isinstance(pause_ms, (int, float)) or not pause_ms >= 0:
            raise ValueError(f"pause_ms must be 0 or more, not {pause_ms!r}")
        self.tokenizer = tokenizer
        self.token_ms = token_ms
        self.pause_ms = pause_ms
        self.on_token, self.on_word, self.on_segment = on_token, on_word, on_segment
        self.records: list[TokenRecord] = []
        self.words: list[Word] = []
        self.segments: list[Segment] = []
        self._text = tokenizer.text_stream()
        self._pieces: list[str] = []
        self._segment: list[Word] = []
        self._word: _OpenWord | None = None
        self._marker: int | None = None
        self._segment_tokens = range(0)  # the tokens of the segment's closed words
        # Stretches of the token grid that are padding, not audio: their starts and ends in
        # seconds on the grid, and the seconds of padding before each.
        self._gap_starts: list[float] = []
        self._gap_ends: list[float] = []
        self._gap_before: list[float] = []

    @classmethod
    def from_tokens(cls, tokens: Iterable[int], tokenizer: Tekken, token_ms: float = 80.0,
                    probabilities: Sequence[float] | None = None, pause_ms: float | None = None) -> "Timeline":
        """The finished timeline of a whole token list (probabilities unknown: NaN)."""
        timeline = cls(tokenizer, token_ms, pause_ms)
        for i, token in enumerate(tokens):
            timeline.push(int(token), math.nan if probabilities is None else float(probabilities[i]))
        timeline.end()
        return timeline

    @property
    def text(self) -> str:
        """All text so far."""
        return "".join(self._pieces)

    def skip(self, start: float, length: float) -> None:
        """`length` seconds of padding start at `start` seconds of the token grid (the stream as
        fed, padding included; `math.inf`: everything after it). Tokens from there on are not
        yet pushed. Their times leave the padding out (see the module)."""
        if not (start >= 0 and length >= 0):
            raise ValueError(f"a skipped stretch needs a start and length of 0 or more, not {start!r}, {length!r}")
        if length == 0:
            return
        if self._gap_ends and start <= self._gap_ends[-1]:  # continues the last one
            self._gap_ends[-1] = max(self._gap_ends[-1], start + length)
            return
        before = self._gap_before[-1] + self._gap_ends[-1] - self._gap_starts[-1] if self._gap_starts else 0.0
        self._gap_starts.append(start)
        self._gap_ends.append(start + length)
        self._gap_before.append(before)

    def seconds(self, k: int) -> float:
        """The time of token boundary k in seconds of audio."""
        t = k * self.token_ms / 1000.0
        i = bisect.bisect_right(self._gap_starts, t) - 1
        if i < 0:
            return t
        start, end = self._gap_starts[i], self._gap_ends[i]
        # (rounded to 1 ns: the same number as the same time without padding before it)
        if t < end:  # in the padding: at its start
            return round(start - self._gap_before[i], 9)
        return round(t - (self._gap_before[i] + end - start), 9)

    def push(self, token_id: int, probability: float,
             alternatives: list[Alternative] | None = None) -> str:
        """Add the next generated token; return the text that became final."""
        k = len(self.records)
        record = TokenRecord(token_id, self.tokenizer.token_str(token_id), self.seconds(k), probability,
                             alternatives)
        self.records.append(record)
        if self.on_token is not None:
            self.on_token(record)
        tok = self.tokenizer
        if token_id >= tok.n_special:
            piece = self._text.push(token_id)
            self._add_text(k, piece, probability)
            if piece:
                self._pieces.append(piece)
            return piece
        word = self._word
        if token_id == tok.eos:
            self._break()
            self._marker = None
            return ""
        if word is not None and (k - word.last) * self.token_ms > self.pause_ms:
            self._break()
        if token_id == tok.word and self._marker is None:
            self._marker = k
        return ""

    def close(self):
        """End the current segment (a streaming session was flushed)."""
        self._break()
        self._marker = None

    def end(self) -> str:
        """End of the stream: close everything; return text held back by an unfinished character."""
        tail = self._text.end()
        if tail:
            self._pieces.append(tail)
            if self._word is not None:
                self._word.text += tail
        self.close()
        return tail

    def _add_text(self, k: int, piece: str, probability: float):
        word = self._word
        if word is None or (word.visible and (self._marker is not None or piece[:1].isspace()
                                              or word.text[-1:].isspace())):
            start = k if self._marker is None else self._marker
            if word is not None:
                self._close_word(next_start=start)
            word = self._word = _OpenWord(start)
        self._marker = None
        word.last = k
        word.text += piece
        word.probabilities.append(probability)

    def _close_word(self, next_start: int | None):
        open_word, self._word = self._word, None
        last = next_start is None or ends_sentence(open_word.text)
        end = open_word.last + 1 if last else next_start
        probabilities = open_word.probabilities
        word = Word(self.seconds(open_word.start), self.seconds(end), open_word.text,
                    sum(probabilities) / len(probabilities))
        self.words.append(word)
        self._segment_tokens = range(open_word.start if not self._segment else self._segment_tokens.start, end)
        self._segment.append(word)
        if self.on_word is not None:
            self.on_word(word)
        if last:
            self._close_segment()

    def _close_segment(self):
        words, self._segment = self._segment, []
        if not words:
            return
        segment = Segment(words[0].start, words[-1].end, "".join(w.text for w in words), words, self._segment_tokens)
        self.segments.append(segment)
        if self.on_segment is not None:
            self.on_segment(segment)

    def _break(self):
        if self._word is not None and self._word.visible:
            self._close_word(next_start=None)
        self._word = None
        self._close_segment()
