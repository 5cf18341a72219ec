"""Voxtral Realtime speech-to-text in MLX.

    import voxtral_mlx
    model = voxtral_mlx.load()                   # or a local model directory
    print(model.transcribe("speech.wav").text)
"""

from .audio import AudioError, load_audio
from .config import ConfigError
from .streaming import SessionClosed, StreamingSession
from .transcribe import Transcription, Voxtral
from .weights import DEFAULT_MODEL, ModelNotFoundError, WeightsError, load

__version__ = "0.1.0"

__all__ = [
    "AudioError", "ConfigError", "DEFAULT_MODEL", "ModelNotFoundError", "SessionClosed",
    "StreamingSession", "Transcription", "Voxtral", "WeightsError", "load", "load_audio",
]
