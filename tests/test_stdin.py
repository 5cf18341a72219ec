"""`voxtral-mlx transcribe -`: raw PCM or WAV piped in small writes, Ctrl+C flushes."""

import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np
import pytest

from conftest import load_model, speech, synthetic

from voxtral_mlx.audio import AudioError, read_pcm_stream

CLI = shutil.which("voxtral-mlx") or str(Path(sys.executable).parent / "voxtral-mlx")


def pcm16(audio: np.ndarray) -> bytes:
    return (np.clip(audio, -1, 1 - 2**-15) * 32768).round().astype("<i2").tobytes()


def wav_bytes(audio: np.ndarray, rate=16000, channels=1, unknown_sizes=False) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm16(audio))
    data = bytearray(buf.getvalue())
    if unknown_sizes:  # what ffmpeg writes into a pipe
        data[4:8] = struct.pack("<I", 0xFFFFFFFF)
        data[40:44] = struct.pack("<I", 0xFFFFFFFF)
    return bytes(data)


def quantized(audio):
    return np.frombuffer(pcm16(audio), "<i2").astype(np.float32) / 32768


def pipe(model_dir, data: bytes, chunk=777, args=()):
    proc = subprocess.Popen([CLI, "transcribe", "-", "--model", str(model_dir), *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for i in range(0, len(data), chunk):
        proc.stdin.write(data[i : i + chunk])
        proc.stdin.flush()
    proc.stdin.close()
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    return proc.wait(timeout=120), out, err


@pytest.mark.parametrize("kind", ["raw", "wav", "wav-unknown-size"])
def test_piped_audio_gives_the_offline_text(tiny_dir, kind):
    audio = quantized(speech("night1968_5s"))
    data = {"raw": pcm16(audio), "wav": wav_bytes(audio),
            "wav-unknown-size": wav_bytes(audio, unknown_sizes=True)}[kind]
    rc, out, err = pipe(tiny_dir, data)
    assert (rc, err) == (0, "")
    expected = load_model(tiny_dir).transcribe(audio).text.strip()
    assert expected and out == expected + "\n"


def test_resampled_stereo_wav_stream(tiny_dir):
    mono = synthetic(3.0)
    t = np.arange(int(3.0 * 44100)) / 44100
    left = np.interp(t, np.arange(mono.size) / 16000, mono)
    data = wav_bytes(np.stack([left, left], axis=1).reshape(-1), rate=44100, channels=2)
    chunks = list(read_pcm_stream(io.BufferedReader(io.BytesIO(data)), block_bytes=1000))
    samples = np.concatenate(chunks)
    assert abs(samples.size - 48000) <= 1
    # soxr's stream equals the one-shot conversion of the same samples.
    import soxr

    left_q = np.frombuffer(pcm16(left), "<i2").astype(np.float32) / 32768
    np.testing.assert_allclose(samples, soxr.resample(left_q, 44100, 16000, "HQ")[: samples.size], atol=1e-5)
    rc, out, err = pipe(tiny_dir, data)
    assert rc == 0 and out.strip()


@pytest.mark.parametrize("bits", [8, 24, 32])
def test_wav_sample_formats(bits):
    x = np.array([0.0, 0.5, -0.5, 0.25], np.float32)
    scale = 2 ** (bits - 1)
    if bits == 8:
        body = (x * 128 + 128).astype(np.uint8).tobytes()
    elif bits == 24:
        ints = (x * scale).astype(np.int32)
        body = b"".join(int(v).to_bytes(3, "little", signed=True) for v in ints)
    else:
        body = (x * scale).astype("<i4").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, 16000, 16000 * bits // 8, bits // 8, bits)
    data = b"RIFF" + struct.pack("<I", 0) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
    data += b"LIST" + struct.pack("<I", 3) + b"abc\0" + b"data" + struct.pack("<I", len(body)) + body
    data += b"junk after the data chunk"
    out = np.concatenate(list(read_pcm_stream(io.BytesIO(data))))
    np.testing.assert_array_equal(out, x)


def test_bad_wav_header_is_a_clear_error():
    fmt = struct.pack("<HHIIHH", 2, 1, 16000, 0, 0, 4)  # ADPCM
    data = b"RIFF\0\0\0\0WAVEfmt " + struct.pack("<I", 16) + fmt + b"data\0\0\0\0"
    with pytest.raises(AudioError, match="unsupported WAV format"):
        list(read_pcm_stream(io.BytesIO(data)))


def test_empty_stdin_is_an_error(tiny_dir):
    rc, out, err = pipe(tiny_dir, b"")
    assert rc == 1 and out == ""
    assert err == "voxtral-mlx: error: stdin: no audio received\n"


def test_ctrl_c_flushes_and_prints_the_rest(tiny_dir):
    model = load_model(tiny_dir)
    audio = quantized(speech("jfk")[: 40 * 1280])
    offline = model.transcribe(audio)
    session = model.stream()
    session.feed(audio)
    before_padding = session.tokens  # what is final before the end of the input is known
    proc = subprocess.Popen([CLI, "transcribe", "-", "--model", str(tiny_dir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(pcm16(audio))
    proc.stdin.flush()
    want = model.tokenizer.decode(before_padding).lstrip()
    got = b""
    os.set_blocking(proc.stdout.fileno(), False)
    deadline = time.time() + 60
    while len(got.decode(errors="ignore")) < len(want) and time.time() < deadline:
        got += proc.stdout.read() or b""
        time.sleep(0.05)
    time.sleep(1.0)  # the last bytes of the pipe are read too
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, err = proc.communicate(timeout=60)
    proc.stdin.close()
    assert proc.returncode == 0, err
    assert (got + rest).decode() == offline.text.strip() + "\n"
    assert "Traceback" not in err.decode()


@pytest.mark.parametrize("subtype", ["ULAW", "ALAW"])
def test_g711_wav_streams_decode_as_libsndfile_does(subtype):
    import soundfile as sf

    audio = synthetic(0.5, seed=3)
    audio = 0.9 * audio / np.abs(audio).max()
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="WAV", subtype=subtype)
    expected, _ = sf.read(io.BytesIO(buf.getvalue()), dtype="float32")
    assert np.abs(expected - audio).max() < 0.02  # the codec's own loss: the comparison below can fail
    out = np.concatenate(list(read_pcm_stream(io.BytesIO(buf.getvalue()), block_bytes=333)))
    np.testing.assert_array_equal(out, expected)


def test_rf64_wav_stream():
    import soundfile as sf

    audio = quantized(synthetic(0.5, seed=4))
    buf = io.BytesIO()
    sf.write(buf, audio, 16000, format="RF64", subtype="PCM_16")
    assert buf.getvalue()[:4] == b"RF64"
    out = np.concatenate(list(read_pcm_stream(io.BytesIO(buf.getvalue()))))
    np.testing.assert_array_equal(out, audio)


@pytest.mark.parametrize("head,name", [(b"ID3\x04\x00", "MP3"), (b"fLaC\x00\x00", "FLAC"), (b"OggS\x00\x02", "Ogg"),
                                       (b"\x00\x00\x00\x20ftypM4A ", "MP4/M4A")])
def test_compressed_streams_are_refused_with_the_way_to_pipe_them(head, name):
    with pytest.raises(AudioError) as e:
        list(read_pcm_stream(io.BytesIO(head + bytes(100))))
    assert str(e.value) == (f"stdin: {name} data (compressed audio); stdin takes raw 16-bit PCM or WAV: pipe it "
                            "through `ffmpeg -loglevel error -i - -f wav -`, or give the file's path")


def test_compressed_stdin_is_one_error_line(tiny_dir):
    rc, out, err = pipe(tiny_dir, b"ID3\x04\x00" + bytes(5000))
    assert (rc, out) == (1, "")
    assert err.startswith("voxtral-mlx: error: stdin: MP3 data (compressed audio)") and err.count("\n") == 1


def test_a_live_source_the_model_cannot_keep_up_with_is_told_once(tiny_dir, monkeypatch):
    import threading

    from voxtral_mlx import StreamingSession
    from voxtral_mlx.cli import _Printer, _transcribe_stdin

    model = load_model(tiny_dir)
    audio = quantized(speech("jfk")[: 5 * 16000])
    read, write = os.pipe()

    def record():  # in real time, 80 ms at a time
        data = pcm16(audio)
        for i in range(0, len(data), 2560):
            os.write(write, data[i : i + 2560])
            time.sleep(0.08)
        os.close(write)

    messages, feed = [], StreamingSession.feed

    def slow_feed(self, x):  # three times slower than real time, until told
        if not messages:
            time.sleep(3 * x.size / 16000)
        return feed(self, x)

    monkeypatch.setattr(StreamingSession, "feed", slow_feed)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(os.fdopen(read, "rb")))
    threading.Thread(target=record, daemon=True).start()
    result = _transcribe_stdin(model, None, _Printer(hold=lambda text: None), on_status=messages.append)
    assert len(messages) == 1, messages
    assert messages[0].startswith("voxtral-mlx: falling behind real time: ")
    assert float(messages[0].split(": ")[2].split(" s ")[0]) > 2.0
    assert result.tokens == model.transcribe(audio).tokens  # nothing lost


def test_a_file_piped_in_is_not_behind_however_slow_the_model(tiny_dir, monkeypatch):
    from voxtral_mlx import StreamingSession
    from voxtral_mlx.cli import _Printer, _transcribe_stdin

    model = load_model(tiny_dir)
    audio = quantized(speech("jfk")[: 3 * 16000])
    feed = StreamingSession.feed
    monkeypatch.setattr(StreamingSession, "feed", lambda self, x: (time.sleep(2 * x.size / 16000), feed(self, x))[1])
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(wav_bytes(audio)))))
    messages = []
    result = _transcribe_stdin(model, None, _Printer(hold=lambda text: None), on_status=messages.append)
    assert messages == [] and result.tokens == model.transcribe(audio).tokens
