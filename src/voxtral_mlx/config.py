"""Model and audio configuration, parsed once from `params.json` and `tekken.json`."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

# Delays the model was trained for, in decoder tokens: 1..15 tokens and 30 (80..1200 ms, 2400 ms).
TRAINED_DELAY_TOKENS = tuple(range(1, 16)) + (30,)


class ConfigError(ValueError):
    """A model configuration file is missing a key or holds an inconsistent value."""


def _from_dict(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    required = {
        f.name
        for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }
    missing = sorted(required - d.keys())
    if missing:
        raise ConfigError(f"{where} is missing {', '.join(repr(m) for m in missing)}")
    return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class AudioEncodingArgs:
    sampling_rate: int = 16000
    frame_rate: float = 12.5
    num_mel_bins: int = 128
    hop_length: int = 160
    window_size: int = 400
    global_log_mel_max: float = 1.5


@dataclass
class EncoderArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    sliding_window: int
    n_kv_heads: int | None = None
    use_biases: bool = True
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    audio_encoding_args: AudioEncodingArgs = field(default_factory=AudioEncodingArgs)

    def __post_init__(self):
        if isinstance(self.audio_encoding_args, dict):
            self.audio_encoding_args = _from_dict(
                AudioEncodingArgs, self.audio_encoding_args, "params.json audio_encoding_args"
            )
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads


@dataclass
class DecoderArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    sliding_window: int
    norm_eps: float = 1e-5
    rope_theta: float = 1e6
    tied_embeddings: bool = True
    ada_rms_norm_t_cond: bool = True
    ada_rms_norm_t_cond_dim: int = 32


@dataclass
class ModelArgs:
    """The network: decoder keys at the top of `params.json`, the encoder under `multimodal`."""

    decoder: DecoderArgs
    encoder: EncoderArgs
    downsample_factor: int

    @classmethod
    def from_params(cls, params: dict[str, Any], source: str = "params.json") -> "ModelArgs":
        """Parse the official `params.json` layout (also what voxmlx keeps in its config.json)."""
        try:
            whisper = params["multimodal"]["whisper_model_args"]
            enc = whisper["encoder_args"]
            factor = whisper["downsample_args"]["downsample_factor"]
        except (KeyError, TypeError) as e:
            raise ConfigError(
                f"{source} has no multimodal.whisper_model_args section ({e}); "
                "is this a Voxtral Realtime checkpoint?"
            ) from None
        return cls(
            decoder=_from_dict(DecoderArgs, params, source),
            encoder=_from_dict(EncoderArgs, enc, f"{source} encoder_args"),
            downsample_factor=factor,
        ).checked(source)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """The inverse of `to_dict`: the `model` section of a converted model's config.json."""
        try:
            return cls(
                decoder=_from_dict(DecoderArgs, d["decoder"], f"{source} model.decoder"),
                encoder=_from_dict(EncoderArgs, d["encoder"], f"{source} model.encoder"),
                downsample_factor=d["downsample_factor"],
            ).checked(source)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source} model section is missing {e}") from None

    @classmethod
    def from_mlx_audio(cls, config: dict[str, Any], source: str = "config.json") -> "ModelArgs":
        """mlx-audio's config.json: the decoder keys under `decoder`, the encoder's under `encoder_args`."""
        try:
            enc = dict(config["encoder_args"])
            params = dict(config["decoder"])
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{source} has no {e} section; is this an mlx-audio Voxtral Realtime model?") from None
        if "audio_encoding_args" not in enc and isinstance(config.get("audio_encoding_args"), dict):
            enc["audio_encoding_args"] = config["audio_encoding_args"]
        factor = enc.pop("downsample_factor", config.get("downsample_factor", 4))
        params["multimodal"] = {"whisper_model_args": {"encoder_args": enc,
                                                       "downsample_args": {"downsample_factor": factor}}}
        return cls.from_params(params, source)

    @classmethod
    def from_transformers(cls, config: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                          source: str = "config.json") -> "ModelArgs":
        """Hugging Face transformers' `VoxtralRealtimeConfig` (and its preprocessor_config.json, if any)."""
        text, audio = config.get("text_config"), config.get("audio_config")
        if not isinstance(text, dict) or not isinstance(audio, dict):
            raise ConfigError(f"{source} has no text_config and audio_config sections; "
                              "is this a transformers VoxtralRealtimeForConditionalGeneration model?")

        def pick(d: dict, where: str, *keys: str, default: Any = dataclasses.MISSING):
            for key in keys:
                if d.get(key) is not None:
                    return d[key]
            if default is dataclasses.MISSING:
                raise ConfigError(f"{source} {where} is missing {keys[0]!r}")
            return default

        def rope_theta(d: dict) -> float:
            rope = d.get("rope_parameters") or {}
            return d.get("rope_theta") or rope.get("rope_theta") or DecoderArgs.rope_theta

        n_heads = pick(text, "text_config", "num_attention_heads")
        decoder = dict(
            dim=pick(text, "text_config", "hidden_size"),
            n_layers=pick(text, "text_config", "num_hidden_layers"),
            head_dim=pick(text, "text_config", "head_dim",
                          default=pick(text, "text_config", "hidden_size") // n_heads),
            hidden_dim=pick(text, "text_config", "intermediate_size"),
            n_heads=n_heads,
            n_kv_heads=pick(text, "text_config", "num_key_value_heads", default=n_heads),
            vocab_size=pick(text, "text_config", "vocab_size"),
            sliding_window=pick(text, "text_config", "sliding_window"),
            norm_eps=pick(text, "text_config", "rms_norm_eps", default=DecoderArgs.norm_eps),
            rope_theta=rope_theta(text),
            tied_embeddings=pick(text, "text_config", "tie_word_embeddings",
                                 default=config.get("tie_word_embeddings", True)),
            # transformers builds the ada-norm bottleneck as Linear(hidden_size, 32).
            ada_rms_norm_t_cond_dim=pick(text, "text_config", "ada_rms_norm_t_cond_dim", default=32),
        )
        pre = preprocessor or {}
        encoding = AudioEncodingArgs(
            num_mel_bins=pick(audio, "audio_config", "num_mel_bins", default=AudioEncodingArgs.num_mel_bins),
            sampling_rate=pre.get("sampling_rate", AudioEncodingArgs.sampling_rate),
            hop_length=pre.get("hop_length", AudioEncodingArgs.hop_length),
            window_size=pre.get("win_length", pre.get("n_fft", AudioEncodingArgs.window_size)),
            global_log_mel_max=pre.get("global_log_mel_max", AudioEncodingArgs.global_log_mel_max),
        )
        if "audio_length_per_tok" in config:
            encoding.frame_rate = encoding.sampling_rate / (encoding.hop_length * config["audio_length_per_tok"])
        enc_heads = pick(audio, "audio_config", "num_attention_heads", "encoder_attention_heads")
        encoder = dict(
            dim=pick(audio, "audio_config", "hidden_size", "d_model"),
            n_layers=pick(audio, "audio_config", "num_hidden_layers", "encoder_layers"),
            head_dim=pick(audio, "audio_config", "head_dim"),
            hidden_dim=pick(audio, "audio_config", "intermediate_size", "encoder_ffn_dim"),
            n_heads=enc_heads,
            n_kv_heads=pick(audio, "audio_config", "num_key_value_heads", default=enc_heads),
            sliding_window=pick(audio, "audio_config", "sliding_window"),
            norm_eps=pick(audio, "audio_config", "rms_norm_eps", default=EncoderArgs.norm_eps),
            rope_theta=rope_theta(audio),
            audio_encoding_args=dataclasses.asdict(encoding),
        )
        params = {**decoder, "multimodal": {"whisper_model_args": {
            "encoder_args": encoder,
            "downsample_args": {"downsample_factor": pick(config, "top level", "downsample_factor")}}}}
        return cls.from_params(params, source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def checked(self, source: str) -> "ModelArgs":
        if not self.decoder.tied_embeddings:
            raise ConfigError(f"{source}: only tied embeddings are supported (tied_embeddings true)")
        if not self.decoder.ada_rms_norm_t_cond:
            raise ConfigError(f"{source}: ada_rms_norm_t_cond must be true for Voxtral Realtime")
        for name, a in (("decoder", self.decoder), ("encoder", self.encoder)):
            if a.n_heads % a.n_kv_heads:
                raise ConfigError(f"{source}: {name} n_heads {a.n_heads} is not a multiple of n_kv_heads {a.n_kv_heads}")
            if a.head_dim % 2:
                raise ConfigError(f"{source}: {name} head_dim must be even for RoPE")
        return self


@dataclass
class AudioArgs:
    """The streaming contract: the `audio` section of `tekken.json` plus the encoder's front end."""

    sampling_rate: int
    frame_rate: float
    num_mel_bins: int
    hop_length: int
    window_size: int
    transcription_delay_ms: int
    n_left_pad_tokens: int
    global_log_mel_max: float
    downsample_factor: int
    samples_per_token: int = field(init=False)
    mel_per_token: int = field(init=False)
    frames_per_token: int = field(init=False)
    look_ahead: int = field(init=False)

    def __post_init__(self):
        spt = self.sampling_rate / self.frame_rate
        if spt != int(spt) or int(spt) % self.hop_length:
            raise ConfigError(
                f"audio: {self.sampling_rate} Hz at {self.frame_rate} tokens/s is not a whole "
                f"number of {self.hop_length}-sample hops"
            )
        self.samples_per_token = int(spt)
        self.mel_per_token = self.samples_per_token // self.hop_length
        self.frames_per_token = self.downsample_factor
        # The conv stem halves the mel rate; the adapter then groups `downsample_factor` frames.
        if self.mel_per_token != 2 * self.downsample_factor:
            raise ConfigError(
                f"audio: {self.mel_per_token} mel frames per token do not match the stride-2 conv "
                f"stem and downsample factor {self.downsample_factor}"
            )
        # The last mel frame of a token reaches this many samples past the token's end.
        self.look_ahead = self.window_size // 2 - self.hop_length
        if self.look_ahead < 0 or self.window_size // 2 > self.samples_per_token * self.n_left_pad_tokens:
            raise ConfigError("audio: the STFT window does not fit the left padding")
        self.delay_tokens(self.transcription_delay_ms)

    @property
    def token_ms(self) -> float:
        return 1000.0 / self.frame_rate

    @property
    def pad_only_tokens(self) -> int:
        """The first tokens, whose mel frames reach no sample past the left pad: every stream
        starts with the same ones (31 of the 32)."""
        return (self.n_left_pad_tokens * self.samples_per_token - self.look_ahead) // self.samples_per_token

    @property
    def allowed_delays_ms(self) -> list[int]:
        return [round(n * self.token_ms) for n in TRAINED_DELAY_TOKENS]

    def delay_tokens(self, delay_ms: int | float | None) -> int:
        """Validated transcription delay in tokens (`None` means the tokenizer's default)."""
        if delay_ms is None:
            delay_ms = self.transcription_delay_ms
        n = delay_ms / self.token_ms if isinstance(delay_ms, (int, float)) else math.nan
        if isinstance(delay_ms, bool) or not math.isfinite(n) or n != round(n) or round(n) not in TRAINED_DELAY_TOKENS:
            allowed = self.allowed_delays_ms
            raise ValueError(
                f"a delay of {delay_ms!r} ms is not one the model was trained for; use "
                f"{allowed[0]}..{allowed[-2]} in steps of {round(self.token_ms)}, or {allowed[-1]}"
            )
        return int(round(n))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> "AudioArgs":
        """The inverse of `to_dict`: the `audio` section of a converted model's config.json."""
        if not isinstance(d, dict):
            raise ConfigError(f"{source} has no audio section")
        try:
            return _from_dict(cls, d, f"{source} audio")
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"{source} audio: {e}") from None

    @classmethod
    def from_files(cls, tekken_audio: dict[str, Any], model: ModelArgs,
                   model_source: str = "params.json") -> "AudioArgs":
        enc = model.encoder.audio_encoding_args
        cfg = tekken_audio.get("audio_encoding_config", {})
        try:
            values = dict(
                sampling_rate=tekken_audio["sampling_rate"],
                frame_rate=tekken_audio["frame_rate"],
                num_mel_bins=cfg.get("num_mel_bins", enc.num_mel_bins),
                hop_length=cfg.get("hop_length", enc.hop_length),
                window_size=cfg.get("window_size", enc.window_size),
                transcription_delay_ms=tekken_audio["transcription_delay_ms"],
                n_left_pad_tokens=tekken_audio["streaming_n_left_pad_tokens"],
            )
        except KeyError as e:
            raise ConfigError(f"tekken.json audio section is missing {e}") from None
        for key in ("sampling_rate", "frame_rate", "num_mel_bins", "hop_length", "window_size"):
            if values[key] != getattr(enc, key):
                raise ConfigError(
                    f"tekken.json audio {key}={values[key]} disagrees with {model_source} "
                    f"audio_encoding_args {key}={getattr(enc, key)}"
                )
        try:
            return cls(**values, global_log_mel_max=enc.global_log_mel_max,
                       downsample_factor=model.downsample_factor)
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"tekken.json audio transcription_delay_ms: {e}") from None
