"""`voxtral-mlx transcribe` with output files, several inputs and progress bars."""

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import AUDIO, load_model

from voxtral_mlx import Transcription
from voxtral_mlx.transcribe import WRITERS, to_srt, to_vtt

SCRIPT = Path(sys.executable).parent / "voxtral-mlx"
JFK = AUDIO / "jfk.wav"
NIGHT = AUDIO / "night1968_5s.wav"
ERROR = "voxtral-mlx: error: "
ENV = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="100", NO_COLOR="1", TERM="xterm")


def run(*args, cwd=None, stdin=None, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(SCRIPT), *map(str, args)], stdin=stdin or subprocess.DEVNULL, capture_output=True,
                          env=ENV, cwd=cwd, timeout=timeout)
    proc.out, proc.err = proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")
    return proc


def run_on_terminal(*args, stdout_too=False, timeout=120) -> tuple[int, str, str]:
    """Run with stderr (and stdout, if asked) on a pseudo-terminal; return (code, stdout, terminal)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT), *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=slave if stdout_too else subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    screen = b""
    while True:
        ready, _, _ = select.select([master], [], [], timeout)
        if not ready:
            proc.kill()
            pytest.fail("the command hung")
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closed: the command is done
            break
        if not data:
            break
        screen += data
    os.close(master)
    out = b"" if stdout_too else proc.stdout.read()
    return proc.wait(timeout=timeout), out.decode("utf-8"), screen.decode("utf-8", errors="replace")


def library(path, audio, **kw) -> Transcription:
    return load_model(path).transcribe(audio, **kw)


def same_file(path: Path, expected: Transcription):
    """The file holds what the writer makes of the library's result (JSON: up to float rounding;
    several files are decoded as one batch, whose probabilities differ from one file's in float32
    rounding, as streamed ones do in test_timestamps)."""
    fmt = path.suffix[1:]
    text = path.read_text(encoding="utf-8")
    if fmt != "json":
        assert text == WRITERS[fmt](expected), path
        return
    got = Transcription.from_dict(json.loads(text))
    assert (got.text, got.tokens, got.delay_ms, got.duration) == (expected.text, expected.tokens,
                                                                 expected.delay_ms, expected.duration)
    assert [(s.start, s.end, s.text) for s in got.segments] == [(s.start, s.end, s.text) for s in expected.segments]
    np.testing.assert_allclose([r.probability for r in got.token_records],
                               [r.probability for r in expected.token_records], rtol=1e-4, atol=1e-6)


def test_output_dir_writes_every_format_and_stdout_is_unchanged(tmp_path, timed_dir):
    proc = run("transcribe", JFK, NIGHT, "--model", timed_dir, "--output-dir", tmp_path / "out")
    jfk, night = library(timed_dir, JFK), library(timed_dir, NIGHT)
    assert (proc.returncode, proc.err) == (0, "")
    assert proc.out == jfk.text.strip() + "\n" + night.text.strip() + "\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        f"{stem}.{fmt}" for stem in ("jfk", "night1968_5s") for fmt in ("txt", "json", "srt", "vtt", "tsv"))
    for fmt in ("txt", "json", "srt", "vtt", "tsv"):
        same_file(tmp_path / "out" / f"jfk.{fmt}", jfk)
        same_file(tmp_path / "out" / f"night1968_5s.{fmt}", night)
    assert len(jfk.segments) >= 2  # the subtitles have something to show


def test_one_format_goes_to_the_current_directory(tmp_path, timed_dir):
    proc = run("transcribe", JFK, "-m", timed_dir, "-f", "srt", "--pause-ms", "400", cwd=tmp_path)
    assert (proc.returncode, proc.err) == (0, "")
    assert [p.name for p in tmp_path.iterdir()] == ["jfk.srt"]
    same_file(tmp_path / "jfk.srt", library(timed_dir, JFK, pause_ms=400))
    assert to_cues(tmp_path / "jfk.srt") > len(library(timed_dir, JFK).segments)


def to_cues(path: Path) -> int:
    return path.read_text(encoding="utf-8").count(" --> ")


def test_alternatives_in_json_only_when_asked(tmp_path, timed_dir):
    assert run("transcribe", NIGHT, "-m", timed_dir, "-f", "json", "-o", tmp_path / "a", "--alt", "3").returncode == 0
    assert run("transcribe", NIGHT, "-m", timed_dir, "-f", "json", "-o", tmp_path / "b").returncode == 0
    asked = json.loads((tmp_path / "a" / "night1968_5s.json").read_text(encoding="utf-8"))
    plain = json.loads((tmp_path / "b" / "night1968_5s.json").read_text(encoding="utf-8"))
    assert all(len(t["alternatives"]) == 3 and t["alternatives"][0]["id"] == t["id"] for t in asked["tokens"])
    assert all("alternatives" not in t for t in plain["tokens"])
    assert [t["id"] for t in asked["tokens"]] == [t["id"] for t in plain["tokens"]]
    same_file(tmp_path / "a" / "night1968_5s.json", library(timed_dir, NIGHT, alternatives=3))


def test_several_files_with_an_unreadable_one(tmp_path, timed_dir):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00not audio")
    out = tmp_path / "out"
    proc = run("transcribe", JFK, bad, NIGHT, "-m", timed_dir, "-o", out, "-f", "all")
    assert proc.returncode == 1
    assert proc.out == library(timed_dir, JFK).text.strip() + "\n" + library(timed_dir, NIGHT).text.strip() + "\n"
    assert proc.err.startswith(f"{ERROR}{bad}: ") and proc.err.count("\n") == 1 and "Traceback" not in proc.err
    assert sorted(p.stem for p in out.iterdir()) == ["jfk"] * 5 + ["night1968_5s"] * 5
    same_file(out / "night1968_5s.vtt", library(timed_dir, NIGHT))


def test_stdin_is_written_as_stdin(tmp_path, timed_dir):
    with open(JFK, "rb") as f:
        proc = run("transcribe", "-", "-m", timed_dir, "-f", "tsv", "-o", tmp_path, stdin=f)
    assert (proc.returncode, proc.err) == (0, "")
    same_file(tmp_path / "stdin.tsv", library(timed_dir, JFK))


def test_inputs_with_the_same_name_are_refused(tmp_path, timed_dir):
    (tmp_path / "b").mkdir()
    copy = tmp_path / "b" / "jfk.flac"
    copy.write_bytes(JFK.read_bytes())
    proc = run("transcribe", JFK, copy, "-m", timed_dir, "-o", tmp_path / "out")
    assert (proc.returncode, proc.out) == (2, "")
    assert proc.err == (f"{ERROR}{JFK} and {copy} would write the same files jfk.*; "
                        "rename one or transcribe them separately\n")
    assert not (tmp_path / "out").exists()
    # Without output files the names do not matter.
    assert run("transcribe", JFK, copy, "-m", timed_dir).returncode == 0
    # Nor does case, on the case-insensitive disks of macOS and Windows; the same file twice is refused too.
    upper = tmp_path / "JFK.wav"
    upper.write_bytes(JFK.read_bytes())
    for second in (upper, JFK):
        proc = run("transcribe", JFK, second, "-m", timed_dir, "-f", "txt")
        assert (proc.returncode, proc.out) == (2, "")
        assert proc.err == (f"{ERROR}{JFK} and {second} would write the same files {second.stem}.*; "
                            "rename one or transcribe them separately\n")


def test_repeated_formats_write_each(tmp_path, timed_dir):
    proc = run("transcribe", JFK, "-m", timed_dir, "-f", "vtt", "-f", "SRT", "-f", "vtt", "-o", tmp_path)
    assert (proc.returncode, proc.err) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jfk.srt", "jfk.vtt"]
    same_file(tmp_path / "jfk.srt", library(timed_dir, JFK))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc, a directory no one can write")
def test_output_dir_that_cannot_be_written_is_found_before_decoding(timed_dir):
    proc = run("transcribe", JFK, NIGHT, "-m", timed_dir, "-o", "/proc")
    assert (proc.returncode, proc.out) == (1, "")
    assert proc.err.startswith(f"{ERROR}--output-dir /proc: cannot write there (") and proc.err.count("\n") == 1


def test_output_dir_that_cannot_be_made(tmp_path, timed_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = run("transcribe", JFK, "-m", timed_dir, "-o", blocker / "sub")
    assert (proc.returncode, proc.out) == (1, "")
    assert proc.err.startswith(f"{ERROR}--output-dir {blocker / 'sub'}: ") and proc.err.count("\n") == 1
    proc = run("transcribe", JFK, "-m", timed_dir, "-o", blocker)
    assert proc.returncode == 2 and "is a file" in proc.err and "Traceback" not in proc.err


def test_subtitle_line_width_and_count(tmp_path, timed_dir):
    proc = run("transcribe", JFK, "-m", timed_dir, "-f", "srt", "-f", "vtt", "-f", "txt", "--max-line-width", "20",
               "--max-line-count", "1", "-o", tmp_path / "narrow")
    assert (proc.returncode, proc.err) == (0, "")
    jfk = library(timed_dir, JFK)
    srt = (tmp_path / "narrow" / "jfk.srt").read_text(encoding="utf-8")
    assert srt == to_srt(jfk, max_line_width=20, max_line_count=1) != to_srt(jfk)
    assert (tmp_path / "narrow" / "jfk.vtt").read_text(encoding="utf-8") == to_vtt(jfk, 20, 1)
    same_file(tmp_path / "narrow" / "jfk.txt", jfk)  # one segment per line, whatever the subtitles' layout
    assert to_cues(tmp_path / "narrow" / "jfk.srt") > len(jfk.segments)
    proc = run("transcribe", JFK, "-m", timed_dir, "-f", "srt", "--max-line-width", "0", "--max-line-count", "0",
               "-o", tmp_path / "whole")
    assert (tmp_path / "whole" / "jfk.srt").read_text(encoding="utf-8") == to_srt(jfk, 0, 0)
    assert to_cues(tmp_path / "whole" / "jfk.srt") == len(jfk.segments)


def test_bad_format_and_alt_are_usage_errors(timed_dir):
    for args in (["-f", "doc"], ["--alt", "-1"], ["--pause-ms", "-5"], ["--max-line-width", "-1"],
                 ["--max-line-count", "x"]):
        proc = run("transcribe", JFK, "-m", timed_dir, *args)
        assert proc.returncode == 2 and proc.out == "" and "Traceback" not in proc.err, args
    proc = run("transcribe", JFK, "-m", timed_dir, "--alt", "2", "-f", "srt")
    assert (proc.returncode, proc.out) == (2, "")
    assert proc.err == f"{ERROR}--alt: the alternatives are written in the json output; add -f json (or -f all)\n"


def test_help_lists_the_new_options():
    proc = run("transcribe", "--help")
    for option in ("--output-format", "--output-dir", "--alt", "--pause-ms", "txt|json|srt|vtt|tsv|all",
                   "--max-line-width", "--max-line-count"):
        assert option in proc.out, option


def test_progress_bars_on_a_terminal_stderr(tmp_path, timed_dir):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"\x00" * 100)
    code, out, screen = run_on_terminal("transcribe", JFK, bad, NIGHT, "-m", timed_dir)
    assert code == 1
    # stdout is not the terminal: it gets exactly the text it gets without bars.
    assert out == library(timed_dir, JFK).text.strip() + "\n" + library(timed_dir, NIGHT).text.strip() + "\n"
    for shown in (f"{ERROR}{bad}: ", "0/3 files", "2/3 files", "3/3 files", "jfk.wav", "100%"):
        assert shown in screen, shown
    assert "Traceback" not in screen
    assert set(screen) & set("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏")  # the spinner, turning while nothing else moves


def test_progress_bars_and_text_on_the_same_terminal(timed_dir):
    code, _, screen = run_on_terminal("transcribe", NIGHT, "-m", timed_dir, stdout_too=True)
    assert code == 0
    text = library(timed_dir, NIGHT).text.strip()
    assert text.replace("\ufffd", "") in screen.replace("\r\n", "\n").replace("\ufffd", "")
    assert "night1968_5s.wav" in screen and "files" not in screen  # one input: no overall bar


def test_a_stream_on_the_terminal_of_its_text_prints_it_as_it_comes(timed_dir):
    import soundfile as sf

    audio, _ = sf.read(JFK, dtype="int16")
    first = audio[: 8 * 16000]
    session = load_model(timed_dir).stream()
    early = session.feed(first.astype(np.float32) / 32768).strip()  # final before the input ends
    assert len(early) > 5
    master, slave = pty.openpty()
    proc = subprocess.Popen([str(SCRIPT), "transcribe", "-", "-m", str(timed_dir)], stdin=subprocess.PIPE,
                            stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    proc.stdin.write(first.tobytes())
    proc.stdin.flush()
    screen, deadline = b"", time.monotonic() + 60
    while early.encode()[:5] not in screen.replace(b"\r\n", b"\n"):  # the input is still open
        assert time.monotonic() < deadline, screen
        if select.select([master], [], [], 1)[0]:
            screen += os.read(master, 65536)
    proc.stdin.write(audio[8 * 16000 :].tobytes())
    proc.stdin.close()
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:
            break
        if not data:
            break
        screen += data
    os.close(master)
    assert proc.wait(timeout=60) == 0
    text = library(timed_dir, JFK).text.strip()
    assert text.replace("\ufffd", "") in screen.decode(errors="replace").replace("\r\n", "\n").replace("\ufffd", "")
    assert "━" not in screen.decode(errors="replace")  # no progress bar over the live text
