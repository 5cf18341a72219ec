"""Audio in: every supported file kind decodes to the expected samples; bad input is a clear AudioError."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf

from voxtral_mlx.audio import AudioError, load_audio, prepare_audio

SR = 16000
FFMPEG = shutil.which("ffmpeg")
needs_ffmpeg = pytest.mark.skipif(FFMPEG is None, reason="the ffmpeg binary is not installed")


def tone(freq: float, seconds: float = 1.0, rate: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * rate))) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, rate: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return spectrum.argmax() * rate / x.size


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64))))


def pcm16(n: int = 8000, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).integers(-32768, 32768, n, dtype=np.int16)
    x[:2] = [-32768, 32767]  # both extremes
    return x


def ffmpeg_encode(src, dst, *codec):
    proc = subprocess.run([FFMPEG, "-nostdin", "-v", "error", "-y", "-i", str(src), *codec, str(dst)],
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    return dst


def hide_ffmpeg(monkeypatch, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    monkeypatch.setenv("PATH", str(empty))
    assert shutil.which("ffmpeg") is None


def error_for(path) -> str:
    with pytest.raises(AudioError) as e:
        load_audio(path)
    return str(e.value)


# Files read by libsndfile.

@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
def test_pcm16_files_decode_exactly(tmp_path, fmt):
    data = pcm16()
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, data, SR, format=fmt, subtype="PCM_16")
    got = load_audio(path)
    assert got.dtype == np.float32 and got.shape == (data.size,)
    np.testing.assert_array_equal(got, data.astype(np.float32) / 32768)
    assert got.min() == -1.0 and got.max() == 32767 / 32768


def test_float_wav_decodes_exactly(tmp_path):
    data = np.random.default_rng(1).uniform(-1, 1, 8000).astype(np.float32)
    sf.write(tmp_path / "a.wav", data, SR, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(tmp_path / "a.wav"), data)


@pytest.mark.parametrize("fmt,subtype,ext", [("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3")])
def test_lossy_files_decode_close(tmp_path, fmt, subtype, ext):
    if fmt not in sf.available_formats():
        pytest.skip(f"this libsndfile cannot write {fmt}")
    x = tone(440.0)
    path = tmp_path / f"a.{ext}"
    sf.write(path, x, SR, format=fmt, subtype=subtype)
    got = load_audio(path)
    assert got.dtype == np.float32 and got.shape == x.shape
    # Lossy codecs at their default quality: a pure tone comes back within a few percent.
    assert np.abs(got - x).max() < 0.05
    assert peak_hz(got) == 440.0


def test_stereo_is_averaged_to_mono(tmp_path):
    left = tone(440.0, 0.5)
    right = np.random.default_rng(2).uniform(-0.5, 0.5, left.size).astype(np.float32)
    sf.write(tmp_path / "stereo.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    got = load_audio(tmp_path / "stereo.wav")
    assert got.shape == left.shape
    np.testing.assert_allclose(got, (left + right) / 2, rtol=0, atol=1e-7)


def test_stereo_pcm16_file_is_averaged_exactly(tmp_path):
    left, right = pcm16(4000, seed=3), pcm16(4000, seed=4)
    sf.write(tmp_path / "stereo.flac", np.stack([left, right], axis=1), SR, subtype="PCM_16")
    expected = (left.astype(np.float64) + right) / 2 / 32768
    np.testing.assert_allclose(load_audio(tmp_path / "stereo.flac"), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("rate,freq", [(44100, 5000.0), (48000, 3000.0), (22050, 440.0), (8000, 1000.0)])
def test_other_rates_are_resampled_to_16k(tmp_path, rate, freq):
    x = tone(freq, 1.0, rate)
    sf.write(tmp_path / "a.wav", x, rate, subtype="FLOAT")
    got = load_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.shape == (SR,)
    assert peak_hz(got) == freq
    # Away from the filter's edge transients the level is kept.
    assert rms(got[1000:-1000]) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)


@pytest.mark.parametrize("rate", [44100, 8000, 22050])
def test_resampled_length_follows_the_rate(rate):
    n = rate * 3 // 2 + 7
    got = prepare_audio(np.zeros(n, np.float32), rate)
    assert abs(got.size - n * SR / rate) <= 1


def test_downsampling_removes_content_above_8khz():
    # A 12 kHz tone has no place at 16 kHz; without a low-pass filter it would alias to 4 kHz.
    got = prepare_audio(tone(12000.0, 1.0, 44100), 44100)
    assert rms(got) < 0.01


def test_load_audio_resamples_to_the_requested_rate(tmp_path):
    sf.write(tmp_path / "a.wav", tone(1000.0, 1.0, 44100), 44100, subtype="FLOAT")
    got = load_audio(tmp_path / "a.wav", sample_rate=8000)
    assert got.shape == (8000,)
    assert peak_hz(got, 8000) == 1000.0


# Files only ffmpeg reads.

@needs_ffmpeg
@pytest.mark.parametrize("ext,codec", [("m4a", ["-c:a", "aac"]), ("webm", ["-c:a", "libopus"])])
def test_other_formats_go_through_ffmpeg(tmp_path, ext, codec):
    sf.write(tmp_path / "src.wav", tone(1000.0, 1.0, 44100), 44100, subtype="FLOAT")
    path = ffmpeg_encode(tmp_path / "src.wav", tmp_path / f"a.{ext}", *codec)
    with pytest.raises(sf.LibsndfileError):
        sf.info(str(path))
    got = load_audio(path)
    assert got.dtype == np.float32 and got.ndim == 1
    # Codec priming and frame padding may add up to a frame or two of samples.
    assert abs(got.size - SR) <= 512
    assert abs(peak_hz(got) - 1000.0) <= 1.0
    assert rms(got[2000:-2000]) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


@needs_ffmpeg
def test_without_ffmpeg_other_formats_name_it(tmp_path, monkeypatch):
    sf.write(tmp_path / "src.wav", tone(1000.0, 0.5), SR, subtype="FLOAT")
    path = ffmpeg_encode(tmp_path / "src.wav", tmp_path / "a.m4a", "-c:a", "aac")
    hide_ffmpeg(monkeypatch, tmp_path)
    message = error_for(path)
    assert re.fullmatch(re.escape(f"{path}: not a WAV, FLAC, OGG or MP3 file that libsndfile can read (")
                        + r".+" + re.escape("); install ffmpeg to read other formats"), message), message


# Unreadable files.

def test_missing_file(tmp_path):
    assert error_for(tmp_path / "nope.wav") == f"{tmp_path / 'nope.wav'}: no such file"


def test_directory(tmp_path):
    assert error_for(tmp_path) == f"{tmp_path}: is a directory, not an audio file"


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=f"^{re.escape(str(path))}: is empty \\(0 bytes\\)$"):
        load_audio(path)


def test_wav_without_frames(tmp_path):
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), SR, subtype="PCM_16")
    assert sf.info(str(tmp_path / "empty.wav")).frames == 0
    assert error_for(tmp_path / "empty.wav") == f"{tmp_path / 'empty.wav'}: contains no audio samples"


NOT_AUDIO = {
    "text": b"hello, I am not a sound file\n",
    "random": np.random.default_rng(5).bytes(5000),
    "riff-header-only": b"RIFF\x24\x00\x00\x00WAVEfmt ",
}


@needs_ffmpeg
@pytest.mark.parametrize("kind", NOT_AUDIO)
def test_not_audio_named_wav(tmp_path, kind):
    path = tmp_path / "fake.wav"
    path.write_bytes(NOT_AUDIO[kind])
    message = error_for(path)
    assert message.startswith(f"{path}: ffmpeg cannot decode it (") and message.endswith(")"), message
    assert "\n" not in message


@pytest.mark.parametrize("kind", NOT_AUDIO)
def test_not_audio_named_wav_without_ffmpeg(tmp_path, monkeypatch, kind):
    path = tmp_path / "fake.wav"
    path.write_bytes(NOT_AUDIO[kind])
    hide_ffmpeg(monkeypatch, tmp_path)
    message = error_for(path)
    assert message.startswith(f"{path}: not a WAV, FLAC, OGG or MP3 file that libsndfile can read (")
    assert message.endswith("; install ffmpeg to read other formats")


# Arrays.

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    x = np.zeros(100, np.float32)
    x[17] = bad
    with pytest.raises(AudioError, match=r"^mic: samples contain NaN or infinity$"):
        prepare_audio(x, name="mic")


@pytest.mark.parametrize("shape", [(2, 3, 4), (1, 1, 1, 5), ()])
def test_not_one_or_two_dimensional(shape):
    with pytest.raises(AudioError, match=re.escape(f"audio: expected a 1-D array of mono samples, got shape {shape}")):
        prepare_audio(np.zeros(shape, np.float32))


@pytest.mark.parametrize("rate", [0, -16000, None, 16000.5, "16000", True])
def test_bad_sample_rate(rate):
    with pytest.raises(AudioError, match=re.escape(f"audio: invalid sample rate {rate!r}: a whole number of samples "
                                                   "per second is needed")):
        prepare_audio(np.zeros(100, np.float32), rate)


def test_a_whole_float_sample_rate_is_taken():
    x = np.sin(np.arange(4410) / 10).astype(np.float32)
    np.testing.assert_array_equal(prepare_audio(x, 44100.0), prepare_audio(x, 44100))


@pytest.mark.parametrize("dtype", [bool, np.complex64, object, "U3"])
def test_non_numeric_samples(dtype):
    with pytest.raises(AudioError, match=r"^audio: expected float or integer PCM samples, got dtype "):
        prepare_audio(np.zeros(10, dtype=dtype))


def test_integer_pcm_is_scaled_to_unit_range():
    got = prepare_audio(np.array([-32768, -16384, 0, 16384, 32767], np.int16))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, np.array([-1.0, -0.5, 0.0, 0.5, 32767 / 32768], np.float32))
    np.testing.assert_array_equal(prepare_audio(np.array([0, 128, 255], np.uint8)),
                                  np.array([-1.0, 0.0, 127 / 128], np.float32))
    np.testing.assert_array_equal(prepare_audio(np.array([-2**31, 0, 2**30], np.int32)),
                                  np.array([-1.0, 0.0, 0.5], np.float32))


def test_float_samples_pass_unchanged():
    x = np.random.default_rng(6).uniform(-1, 1, 1000)
    got = prepare_audio(x)
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(got, x.astype(np.float32))
    np.testing.assert_array_equal(prepare_audio([0.25, -0.5]), np.array([0.25, -0.5], np.float32))


def test_two_dimensional_array_is_frames_by_channels():
    frames = np.random.default_rng(7).uniform(-1, 1, (1000, 2)).astype(np.float32)
    np.testing.assert_allclose(prepare_audio(frames), frames.mean(axis=1), rtol=0, atol=1e-7)
    stereo16 = np.stack([np.full(10, 16384), np.full(10, -16384)], axis=1).astype(np.int16)
    np.testing.assert_array_equal(prepare_audio(stereo16), np.zeros(10, np.float32))


def test_few_frames_are_frames_by_channels():
    # A stream's chunk of one or a few stereo frames, as sounddevice delivers them.
    for frames in (np.array([[0.5, -0.25]], np.float32), np.array([[0.5, -0.25], [0.125, 0.0]], np.float32),
                   np.full((3, 40), 0.5, np.float32)):
        np.testing.assert_array_equal(prepare_audio(frames), frames.mean(axis=1))
    # Past 64 a dimension is frames: (channels, frames) as torchaudio and librosa give a recording.
    np.testing.assert_array_equal(prepare_audio(np.full((2, 65), 0.5, np.float32)), np.full(65, 0.5, np.float32))


def test_channels_first_array_is_not_silently_collapsed():
    audio = np.stack([tone(440.0), tone(440.0)])  # [2, 16000]
    try:
        got = prepare_audio(audio)
    except AudioError:
        return  # refusing the ambiguous layout with a message is fine too
    assert got.shape == (SR,)
