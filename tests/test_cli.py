"""The installed `voxtral-mlx` console script, run as a user would run it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import AUDIO, checkpoint, load_model

import voxtral_mlx

SCRIPT = Path(sys.executable).parent / "voxtral-mlx"
JFK = AUDIO / "jfk.wav"
NIGHT = AUDIO / "night1968_5s.wav"
ERROR = "voxtral-mlx: error: "


def run(*args, timeout=60, **env_vars) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100", NO_COLOR="1", **env_vars)
    proc = subprocess.run([str(SCRIPT), *map(str, args)], stdin=subprocess.DEVNULL, capture_output=True,
                          env=env, timeout=timeout)
    proc.out, proc.err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def one_error_line(proc, message_start: str):
    assert proc.err.startswith(ERROR + message_start), proc.err
    assert proc.err.endswith("\n") and proc.err.count("\n") == 1, proc.err
    assert "Traceback" not in proc.err


@pytest.fixture(scope="module")
def model_dir(ckpt_root):
    # Smaller embeddings give varied text with a leading space for this audio.
    return checkpoint(ckpt_root, embed_std=0.5)


def library_text(path, audio, delay_ms=None) -> str:
    return load_model(path).transcribe(audio, delay_ms=delay_ms).text


def test_the_console_script_is_installed():
    assert SCRIPT.is_file() and os.access(SCRIPT, os.X_OK)


def test_transcribe_prints_the_library_text(model_dir):
    text = library_text(model_dir, JFK)
    assert text.startswith(" ") and len(set(text.strip())) > 3  # the comparison can fail
    proc = run("transcribe", JFK, "--model", model_dir)
    assert (proc.returncode, proc.out, proc.err) == (0, text.strip() + "\n", "")


def test_delay_option(model_dir):
    text = library_text(model_dir, JFK, delay_ms=960)
    assert text.strip() != library_text(model_dir, JFK).strip()
    proc = run("transcribe", JFK, "--model", model_dir, "--delay-ms", "960")
    assert (proc.returncode, proc.out, proc.err) == (0, text.strip() + "\n", "")
    short = run("transcribe", JFK, "-m", model_dir, "-d", "960")
    assert (short.returncode, short.out) == (0, proc.out)


def test_dtype_option(model_dir):
    proc = run("transcribe", JFK, "--model", model_dir, "--dtype", "float32")
    assert (proc.returncode, proc.out, proc.err) == (0, library_text(model_dir, JFK).strip() + "\n", "")


def test_verbose_status_goes_to_stderr_only(model_dir):
    proc = run("transcribe", JFK, "--model", model_dir, "--verbose")
    assert (proc.returncode, proc.out) == (0, library_text(model_dir, JFK).strip() + "\n")
    lines = proc.err.splitlines()
    assert len(lines) >= 2 and proc.err.endswith("\n")
    assert lines[0].startswith(f"loaded {model_dir} ")
    assert any(str(JFK) in line and "11.00 s" in line for line in lines), proc.err
    assert "Traceback" not in proc.err and ERROR not in proc.err


def test_no_text_is_reported_on_stderr(ckpt_root):
    # Unscaled, the tiny model's fed-back pad dominates: it emits only [STREAMING_PAD] here.
    silent = checkpoint(ckpt_root, audio_scale=1.0, control_scale=1.0)
    assert library_text(silent, NIGHT) == ""
    proc = run("transcribe", NIGHT, "--model", silent)
    assert (proc.returncode, proc.out, proc.err) == (0, "", f"voxtral-mlx: no speech recognized in {NIGHT}\n")


def test_missing_audio_file(tmp_path, model_dir):
    proc = run("transcribe", tmp_path / "nope.wav", "--model", model_dir)
    assert (proc.returncode, proc.out, proc.err) == (1, "", f"{ERROR}{tmp_path / 'nope.wav'}: no such file\n")


def test_unreadable_audio_file(tmp_path, model_dir):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio\n")
    proc = run("transcribe", bad, "--model", model_dir)
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, f"{bad}: ")


def test_empty_audio_file(tmp_path, model_dir):
    import numpy as np
    import soundfile as sf

    sf.write(tmp_path / "empty.wav", np.zeros(0, np.int16), 16000)
    proc = run("transcribe", tmp_path / "empty.wav", "--model", model_dir)
    assert (proc.returncode, proc.out, proc.err) == (1, "", f"{ERROR}{tmp_path / 'empty.wav'}: contains no audio samples\n")


def test_bad_model_directory(tmp_path):
    proc = run("transcribe", JFK, "--model", tmp_path)
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, f"{tmp_path} is not a Voxtral Realtime model directory: ")
    assert "hf download" in proc.err


def test_model_that_does_not_exist(tmp_path):
    proc = run("transcribe", JFK, "--model", tmp_path / "nope")
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, f"{tmp_path / 'nope'}: no such model directory")


def test_unknown_repo_id_offline():
    proc = run("transcribe", JFK, "--model", "owner/no-such-model")
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, "owner/no-such-model is not in the local Hugging Face cache")
    assert "`hf download owner/no-such-model --local-dir DIR`" in proc.err
    proc = run("transcribe", JFK, "--model", "~no_such_user_zz/model")
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, "~no_such_user_zz/model: no such model directory (no home directory for its ~)")


@pytest.mark.parametrize("delay", ["100", "0", "2480"])
def test_bad_delay(model_dir, delay):
    proc = run("transcribe", JFK, "--model", model_dir, "--delay-ms", delay)
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, f"--delay-ms: a delay of {delay} ms is not one the model was trained for; "
                         "use 80..1200 in steps of 80, or 2400")


def test_bad_dtype(model_dir):
    proc = run("transcribe", JFK, "--model", model_dir, "--dtype", "int8")
    assert (proc.returncode, proc.out, proc.err) == (
        1, "", f"{ERROR}dtype 'int8' is not supported; use float32, bfloat16 or float16\n")


def test_several_files_with_bad_ones(tmp_path, model_dir):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 100)
    missing = tmp_path / "missing.wav"
    proc = run("transcribe", JFK, bad, missing, NIGHT, "--model", model_dir)
    assert proc.returncode == 1
    assert proc.out == library_text(model_dir, JFK).strip() + "\n" + library_text(model_dir, NIGHT).strip() + "\n"
    errors = proc.err.splitlines()
    assert len(errors) == 2 and "Traceback" not in proc.err
    assert f"{ERROR}{missing}: no such file" in errors
    assert any(e.startswith(f"{ERROR}{bad}: ") for e in errors)


def test_corrupt_mp3_gives_one_error_line(tmp_path, model_dir):
    bad = tmp_path / "bad.mp3"
    bad.write_bytes(b"\x00" * 100)
    proc = run("transcribe", bad, "--model", model_dir)
    assert (proc.returncode, proc.out) == (1, "")
    one_error_line(proc, f"{bad}: ")


def test_only_missing_files(tmp_path, model_dir):
    proc = run("transcribe", tmp_path / "a.wav", tmp_path / "b.wav", "--model", model_dir)
    assert (proc.returncode, proc.out) == (1, "")
    assert proc.err == f"{ERROR}{tmp_path / 'a.wav'}: no such file\n{ERROR}{tmp_path / 'b.wav'}: no such file\n"


def test_version():
    proc = run("--version")
    assert (proc.returncode, proc.out, proc.err) == (0, f"voxtral-mlx {voxtral_mlx.__version__}\n", "")


def test_help():
    proc = run("--help")
    assert proc.returncode == 0 and proc.err == ""
    assert "Usage: voxtral-mlx" in proc.out and "transcribe" in proc.out and "--version" in proc.out
    sub = run("transcribe", "--help")
    assert sub.returncode == 0 and sub.err == ""
    for option in ("--model", "--delay-ms", "--dtype", "--verbose"):
        assert option in sub.out, option


def test_usage_errors_exit_2(model_dir):
    proc = run("transcribe", JFK, "--model", model_dir, "--delay-ms", "abc")
    assert proc.returncode == 2 and proc.out == ""
    assert "--delay-ms" in proc.err and "Traceback" not in proc.err
    assert run("transcribe").returncode == 2
    assert run("no-such-command").returncode == 2


@pytest.mark.parametrize("args,option", [
    (["-", "--interval-ms", "inf"], "--interval-ms"), (["-", "--interval-ms", "nan"], "--interval-ms"),
    (["-", "--interval-ms", "-5"], "--interval-ms"), ([str(JFK), "--pause-ms", "nan"], "--pause-ms"),
    ([str(JFK), "--speculate", "-1"], "--speculate"), ([str(JFK), "--speculate", "33"], "--speculate"),
])
def test_numbers_out_of_range_are_usage_errors(model_dir, args, option):
    proc = run("transcribe", *args, "--model", model_dir)
    assert (proc.returncode, proc.out) == (2, "")
    assert f"Invalid value for '{option}'" in proc.err and "Traceback" not in proc.err


def test_interval_is_refused_with_files(model_dir):
    proc = run("transcribe", JFK, "--model", model_dir, "--interval-ms", "400")
    assert (proc.returncode, proc.out) == (2, "")
    assert proc.err == (f"{ERROR}--interval-ms applies to a stream on stdin (-), not to files, which are decoded "
                        "as fast as they can be\n")


def test_ctrl_c_ends_a_file_transcription_with_its_line_and_a_message(tmp_path, model_dir):
    import signal
    import time

    import numpy as np
    import soundfile as sf

    long = tmp_path / "long.wav"  # 20 minutes of noise: far from done when Ctrl+C comes
    sf.write(long, np.random.default_rng(0).standard_normal(20 * 60 * 16000).astype(np.float32) * 0.1, 16000)
    # As from a terminal: a shell's background job (a CI script run with &) ignores SIGINT, and its children would.
    proc = subprocess.Popen([str(SCRIPT), "transcribe", str(long), "--model", str(model_dir)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    os.set_blocking(proc.stdout.fileno(), False)
    out, deadline = b"", time.time() + 60
    while not out and time.time() < deadline:  # decoding has begun: text is on stdout
        out += proc.stdout.read() or b""
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and out
    assert (out + rest).endswith(b"\n") and (out + rest).count(b"\n") == 1
    assert err.decode() == "voxtral-mlx: interrupted\n"


def test_python_m_runs_the_command():
    for module in ("voxtral_mlx", "voxtral_mlx.cli"):
        proc = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"voxtral-mlx {voxtral_mlx.__version__}\n", "")
    proc = subprocess.run([sys.executable, "-m", "voxtral_mlx", "--help"], capture_output=True, text=True,
                          env=dict(os.environ, COLUMNS="100"))
    assert proc.returncode == 0 and "Usage: voxtral-mlx [OPTIONS] COMMAND" in proc.stdout


def test_verbose_names_stdin(model_dir):
    with open(JFK, "rb") as f:
        proc = subprocess.run([str(SCRIPT), "transcribe", "-", "--model", str(model_dir), "-v"], stdin=f,
                              capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0
    assert any(line.startswith("stdin: 11.00 s of audio, ") for line in proc.stderr.splitlines()), proc.stderr


def test_verbose_names_mlx_quantized_products(tmp_path, model_dir):
    voxtral_mlx.convert(model_dir, tmp_path / "q6", q_bits=6)  # 6 bits: MLX's own product, on every CPU
    proc = run("transcribe", JFK, "--model", tmp_path / "q6", "-v")
    assert proc.returncode == 0
    assert proc.err.startswith(f"loaded {tmp_path / 'q6'} (6-bit products through MLX, float32 elsewhere) in ")


def test_serve_names_a_model_given_as_dot_by_its_directory(model_dir):
    proc = subprocess.Popen([str(SCRIPT), "serve", "--model", ".", "--port", "0"], cwd=model_dir,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        line = proc.stderr.readline().decode()
        url = line.split(" on ")[1].split()[0]
        import httpx

        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == [model_dir.name]
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_first_run_says_it_compiles_the_kernels(tmp_path, model_dir):
    from voxtral_mlx import cpu_kernels

    text = library_text(model_dir, JFK).strip() + "\n"
    first = run("transcribe", JFK, "--model", model_dir, timeout=300, XDG_CACHE_HOME=str(tmp_path))
    assert (first.returncode, first.out) == (0, text)
    if cpu_kernels.library() is None:  # not here (another CPU, no compiler): nothing to build, nothing said
        assert first.err == ""
        return
    assert first.err == "voxtral-mlx: compiling the CPU kernels (once for this version and machine: several seconds)\n"
    assert list((tmp_path / "voxtral-mlx").glob("cpu_rows-*.so"))
    again = run("transcribe", JFK, "--model", model_dir, XDG_CACHE_HOME=str(tmp_path))
    assert (again.returncode, again.out, again.err) == (0, text, "")
