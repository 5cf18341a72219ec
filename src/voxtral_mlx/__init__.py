"""Voxtral Realtime speech-to-text in MLX.

    import voxtral_mlx
    model = voxtral_mlx.load()                   # or a local model directory
    print(model.transcribe("speech.wav").text)
"""

from . import _blas

_blas.preload()  # before MLX is loaded: a fast BLAS for its CPU matmuls (see _blas)

from .audio import AudioError, load_audio  # noqa: E402
from .config import ConfigError
from .convert import Conversion, convert
from .mic import MicError, mic
from .streaming import SessionClosed, StreamingSession, feed_together
from .timestamps import Alternative, Segment, Timeline, TokenRecord, Word
from .transcribe import FORMATS, Transcription, Voxtral, write_outputs
from .weights import DEFAULT_MODEL, ModelNotFoundError, WeightsError, load

__version__ = "0.1.0"

__all__ = [
    "Alternative", "AudioError", "ConfigError", "DEFAULT_MODEL", "FORMATS", "ModelNotFoundError",
    "Segment", "SessionClosed", "StreamingSession", "Timeline", "TokenRecord", "Transcription", "Voxtral",
    "WeightsError", "Word", "feed_together", "load", "load_audio", "write_outputs",
    "MicError", "mic", "Conversion", "convert",
]
