"""`voxtral-mlx mic`: a real PortAudio InputStream on an ALSA fake microphone, the silence gate,
the backlog policy and device errors."""

import builtins
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import AUDIO, checkpoint, load_model, speech, synthetic

from voxtral_mlx.mic import CaptureBuffer, EnergyGate, MicError, Microphone, _sounddevice, transcribe_live

CLI = Path(sys.executable).parent / "voxtral-mlx"
FAKEMIC_CONF = Path(os.environ.get("VOXTRAL_FAKEMIC_CONF", AUDIO.parent / "tools" / "fakemic" / "asound.conf"))
needs_portaudio = pytest.mark.skipif(ctypes.util.find_library("portaudio") is None,
                                     reason="PortAudio is not installed (Debian: libportaudio2)")


def pcm16(audio):
    return (np.clip(audio, -1, 1 - 2**-15) * 32768).round().astype("<i2")


@pytest.fixture
def fakemic(tmp_path):
    """Write audio as the fake microphone's recording; returns the environment for a subprocess."""

    def make(audio: np.ndarray) -> dict:
        raw = tmp_path / "mic.raw"
        # Past the end of the file the device delivers garbage: pad it well beyond what is read.
        np.concatenate([pcm16(audio), np.zeros(10 * 16000, "<i2")]).tofile(raw)
        conf = tmp_path / "asound.conf"
        conf.write_text(FAKEMIC_CONF.read_text().replace("/tmp/fakemic_s16le_16k_mono.raw", str(raw)))
        return dict(os.environ, ALSA_CONFIG_PATH=str(conf))

    return make


def quantized(audio):
    return pcm16(audio).astype(np.float32) / 32768


def run_mic(env, *args, timeout=120):
    proc = subprocess.run([str(CLI), "mic", *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@needs_portaudio
def test_mic_transcript_equals_offline(fakemic, tiny_dir, tmp_path):
    audio = quantized(speech("night1968_5s"))
    env = fakemic(audio)
    out_file = tmp_path / "transcript.txt"
    rc, out, err = run_mic(env, "--no-vad", "--device", "fakemic", "--duration", 5, "--model", tiny_dir,
                           "--output", out_file)
    expected = load_model(tiny_dir).transcribe(audio).text
    assert rc == 0, err
    assert expected.strip() and out == expected.strip() + "\n"
    assert out_file.read_text() == expected.strip() + "\n"  # as on stdout
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def gate_dir(ckpt_root):
    # Small windows forget the past within the silence. A random model is no speech model:
    # with this seed it is silent during silence and settles the same way after a shortened
    # pause, as the real model does (asserted below); some other seeds do not.
    return checkpoint(ckpt_root, seed=37, enc_window=24, dec_window=20, control_scale=1.0)


def speech_silence_speech():
    # 8 s in all: below the 10 s of backlog the fake microphone's instant delivery may build up.
    return quantized(np.concatenate([synthetic(1.5, seed=1), np.zeros(5 * 16000, np.float32),
                                     synthetic(1.5, seed=2)]))


@needs_portaudio
def test_gate_skips_silence_without_changing_the_text(fakemic, gate_dir):
    audio = speech_silence_speech()
    model = load_model(gate_dir)
    offline = model.transcribe(audio)
    decode = model.tokenizer.decode
    # Text before and after the silence, none inside it (tokens come n_delay = 6 tokens late).
    assert decode(offline.tokens[: 1500 // 80 + 6]).strip() and decode(offline.tokens[6500 // 80 :]).strip()
    assert decode(offline.tokens[1500 // 80 + 11 : 6500 // 80]) == ""
    env = fakemic(audio)
    rc, plain, err = run_mic(env, "--no-vad", "--device", "fakemic", "--duration", 8, "--model", gate_dir)
    assert rc == 0, err
    rc, gated, err = run_mic(env, "--device", "fakemic", "--duration", 8, "--model", gate_dir, "-v")
    assert rc == 0, err
    assert gated == plain == offline.text.strip() + "\n"
    assert err.startswith(f"loaded {gate_dir} (")  # -v: how the model loaded, as `transcribe -v` says
    summary = [line for line in err.splitlines() if line.startswith("heard ")]
    heard, fed = float(summary[0].split()[1]), float(summary[0].split()[4])
    assert heard == 8.0 and fed < 8.0 - 3.0  # most of the 5 s of silence never reached the model


def test_energy_gate_steps():
    block = 10
    gate = EnergyGate(block, hangover=3, preroll=2)
    loud, quiet = np.full(block, 0.5, np.float32), np.zeros(block, np.float32)
    signal_ = np.concatenate([quiet] * 5 + [loud] * 2 + [quiet] * 6 + [loud] + [quiet[:4]])
    steps = gate.process(signal_[:37]) + gate.process(signal_[37:]) + gate.end()
    kinds = [(k, None if x is None else x.size) for k, x in steps]
    # 2 preroll + 2 loud + 3 quiet (hangover) fed, flush, 2 quiet wait in the preroll, then
    # preroll + loud; the partial block at the end is fed since the gate is open.
    assert kinds == [("feed", 70), ("flush", None), ("feed", 30), ("feed", 4)]
    assert gate.skipped == 3 * block + block  # 3 blocks before speech, 1 in the second pause
    assert np.array_equal(steps[2][1][20:30], loud)


def test_capture_buffer_keeps_the_most_recent_audio():
    buf = CaptureBuffer(rate=100, max_seconds=2.0)
    for i in range(50):
        buf.push(np.full((10, 1), i, np.int16))
    assert buf.backlog_seconds == 2.0 and buf.dropped_seconds == 3.0
    got = buf.pop_all(timeout=0)
    assert np.array_equal(got[:, 0], np.repeat(np.arange(30, 50), 10).astype(np.int16))
    assert buf.backlog_seconds == 0 and buf.pop_all(timeout=0).size == 0


class FakeSource:
    """Delivers audio in fixed chunks; fails with MicError after `fail_after` chunks."""

    def __init__(self, audio, chunk, fail_after=None):
        self.audio, self.chunk, self.fail_after, self.pos, self.reads = audio, chunk, fail_after, 0, 0
        self.dropped_seconds = 0.0

    @property
    def finished(self):
        return self.pos >= self.audio.size

    def read(self, timeout=0.1):
        if self.fail_after is not None and self.reads >= self.fail_after:
            raise MicError("recording from 'fake' stopped: the device was unplugged or failed")
        self.reads += 1
        x = self.audio[self.pos : self.pos + self.chunk]
        self.pos += self.chunk
        return x


def test_falling_behind_is_reported_once(tiny_dir):
    model = load_model(tiny_dir)
    audio = speech("night1968_5s")
    messages = []
    texts = list(transcribe_live(model, FakeSource(audio, 48000), vad=False, on_status=messages.append))
    assert messages == ["falling behind real time: 3.0 s of audio were waiting; "
                        "beyond 10 s the oldest audio is skipped"]
    assert "".join(texts) == model.transcribe(audio).text


def test_a_backlog_is_fed_in_pieces_so_its_text_shows_as_it_is_decoded(tiny_dir, monkeypatch):
    from voxtral_mlx import StreamingSession

    model = load_model(tiny_dir)
    audio = speech("night1968_5s")
    fed, real = [], StreamingSession.feed
    monkeypatch.setattr(StreamingSession, "feed", lambda self, x: (fed.append(x.size), real(self, x))[1])
    texts = list(transcribe_live(model, FakeSource(audio, audio.size), vad=False))  # all of it waits at once
    assert fed == [8 * 1280] * (audio.size // (8 * 1280)) + [audio.size % (8 * 1280)]
    assert "".join(texts) == model.transcribe(audio).text and len(texts) > 1


def test_drops_while_the_rest_is_decoded_are_not_counted_as_heard_time(tiny_dir, monkeypatch):
    from voxtral_mlx import StreamingSession

    model = load_model(tiny_dir)
    source, finish = FakeSource(speech("night1968_5s"), 16000), StreamingSession.finish
    source.dropped_seconds = 1.5

    def finish_while_capture_drops(self):  # the device keeps capturing, unread, meanwhile
        source.dropped_seconds = 99.0
        return finish(self)

    monkeypatch.setattr(StreamingSession, "finish", finish_while_capture_drops)
    stats = {}
    list(transcribe_live(model, source, vad=False, stats=stats))
    assert stats["dropped"] == 1.5 and stats["heard"] == speech("night1968_5s").size / 16000


def test_audio_waiting_behind_real_time_is_decoded_speculatively_where_the_model_does(tiny_dir, monkeypatch):
    # This model's default is off (MKL multiplies its head); where it is on, 3 s waiting at each
    # read are decoded in passes, with the same text.
    from voxtral_mlx import StreamingSession, Voxtral

    model = load_model(tiny_dir)
    audio = speech("night1968_5s")
    plain = model.transcribe(audio, speculate=0).text
    monkeypatch.setattr(Voxtral, "default_speculate", property(lambda self: 4))
    passes = []
    real = StreamingSession._speculate
    monkeypatch.setattr(StreamingSession, "_speculate", lambda self, emb: (passes.append(emb.shape[1]), real(self, emb))[1])
    assert "".join(transcribe_live(model, FakeSource(audio, 48000), vad=False)) == plain
    assert passes and max(passes) <= 4


def test_device_failure_keeps_what_was_heard(tiny_dir):
    model = load_model(tiny_dir)
    audio = speech("night1968_5s")
    texts, stats = [], {}
    with pytest.raises(MicError, match="unplugged or failed"):
        for t in transcribe_live(model, FakeSource(audio, 16000, fail_after=3), vad=False, stats=stats):
            texts.append(t)
    assert "".join(texts) == model.transcribe(audio[:48000]).text
    assert stats["heard"] == stats["fed"] == 3.0


@needs_portaudio
def test_stream_stopping_mid_recording_is_an_error(fakemic, tiny_dir, monkeypatch):
    monkeypatch.setenv("ALSA_CONFIG_PATH", fakemic(np.zeros(16000, np.float32))["ALSA_CONFIG_PATH"])
    sd = _sounddevice()
    sd._terminate()
    sd._initialize()
    from voxtral_mlx.mic import Microphone

    calls = []
    real = Microphone._callback

    def failing(self, indata, frames, time_, status):
        # A device that goes away: PortAudio stops the stream from its own thread.
        calls.append(frames)
        if len(calls) > 20:
            raise sd.CallbackAbort
        real(self, indata, frames, time_, status)

    monkeypatch.setattr(Microphone, "_callback", failing)
    try:
        texts = []
        with Microphone("silence") as source:
            with pytest.raises(MicError, match="recording from 'silence' stopped"):
                for text in transcribe_live(load_model(tiny_dir), source, vad=False):
                    texts.append(text)
        assert len(calls) == 21
    finally:
        sd._terminate()
        sd._initialize()


@needs_portaudio
def test_unknown_device_and_listing(fakemic, tiny_dir):
    env = fakemic(np.zeros(16000, np.float32))
    rc, out, err = run_mic(env, "--device", "no-such-mic", "--model", tiny_dir)
    assert rc == 1 and out == ""
    assert err.startswith("voxtral-mlx: error: no input device 'no-such-mic'") and err.count("\n") == 1
    assert "--list-devices" in err
    rc, out, err = run_mic(env, "--list-devices")
    assert rc == 0 and "fakemic" in out and "silence" in out


@needs_portaudio
def test_the_device_is_looked_up_before_the_model_and_the_output_is_kept(fakemic, tmp_path):
    env = fakemic(np.zeros(16000, np.float32))
    notes = tmp_path / "notes.txt"
    notes.write_text("yesterday's notes\n")
    # No model is there to load: the device's error comes first, and the file is as it was.
    rc, out, err = run_mic(env, "--device", "no-such-mic", "--model", tmp_path / "no-model", "-o", notes)
    assert (rc, out) == (1, "")
    assert err.startswith("voxtral-mlx: error: no input device 'no-such-mic'") and err.count("\n") == 1
    assert notes.read_text() == "yesterday's notes\n"
    rc, out, err = run_mic(env, "--device", "fakemic", "--model", tmp_path / "no-model", "-o", tmp_path / "new.txt")
    assert rc == 1 and "no-model" in err and not (tmp_path / "new.txt").exists()


def test_listing_no_devices_says_so(monkeypatch):
    from typer.testing import CliRunner

    from voxtral_mlx.cli import app

    monkeypatch.setattr(sys.modules["voxtral_mlx.mic"], "list_input_devices", lambda: [])
    result = CliRunner().invoke(app, ["mic", "--list-devices"])
    assert result.exit_code == 1
    assert result.output == ("voxtral-mlx: error: no input devices found: is a microphone connected, and can "
                             "PortAudio see it (on Linux: arecord -l)?\n")


@pytest.mark.parametrize("args,option", [(["--duration", "inf"], "--duration"), (["--duration", "0"], "--duration"),
                                         (["--interval", "nan"], "--interval"), (["--interval", "-1"], "--interval")])
def test_mic_numbers_out_of_range_are_usage_errors(args, option):
    proc = subprocess.run([str(CLI), "mic", *args], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="100"))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert f"Invalid value for '{option}'" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kw,message", [({"duration": float("inf")}, "duration must be a number of seconds above 0"),
                                        ({"interval": -1.0}, "interval must be a number of seconds from 0")])
def test_python_mic_checks_its_numbers_before_loading(kw, message):
    import voxtral_mlx

    with pytest.raises(ValueError, match=message):
        next(voxtral_mlx.mic("/no/such/model", **kw))


@needs_portaudio
def test_ctrl_c_stops_and_flushes(fakemic, tiny_dir):
    env = fakemic(np.zeros(16000, np.float32))
    proc = subprocess.Popen([str(CLI), "mic", "--device", "silence", "--no-vad", "--model", str(tiny_dir), "-v"],
                            env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(3)
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "heard " in err


def test_missing_portaudio_or_sounddevice_is_explained(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "sounddevice":
            raise OSError("PortAudio library not found")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "sounddevice", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(MicError, match="PortAudio library is not installed: sudo apt install libportaudio2"):
        _sounddevice()

    def no_module(name, *args, **kwargs):
        if name == "sounddevice":
            raise ModuleNotFoundError("No module named 'sounddevice'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_module)
    with pytest.raises(MicError, match=r"pip install 'voxtral-mlx\[mic\]'"):
        _sounddevice()


@needs_portaudio
def test_python_mic_helper_yields_the_offline_text(fakemic, tiny_dir, monkeypatch):
    import voxtral_mlx

    audio = quantized(speech("night1968_5s"))
    monkeypatch.setenv("ALSA_CONFIG_PATH", fakemic(audio)["ALSA_CONFIG_PATH"])
    sd = _sounddevice()
    sd._terminate()
    sd._initialize()
    try:
        model = voxtral_mlx.load(tiny_dir)  # not the shared model: a state of its own
        assert model.net.snapshots.nbytes == 0
        # The left pad's state is computed before the microphone opens (`Voxtral.prepare`).
        state_at_open, enter = [], Microphone.__enter__
        monkeypatch.setattr(Microphone, "__enter__",
                            lambda self: (state_at_open.append(model.net.snapshots.nbytes), enter(self))[1])
        with pytest.warns(UserWarning, match="falling behind real time"):  # the fake delivers at once
            pieces = list(voxtral_mlx.mic(model, device="fakemic", duration=5, vad=False))
        assert state_at_open[0] > 0
        assert "".join(pieces) == model.transcribe(audio).text
        assert len(pieces) >= 1
    finally:
        sd._terminate()
        sd._initialize()
