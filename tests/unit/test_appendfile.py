"""circusd's unbuffered log streams and pipes (controller.appendfile), with circus' own
FileStream and Popen as circusd runs them."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest
from circus import process
from circus.stream import file_stream

from controller.appendfile import AppendFile, unbuffered_streams


@pytest.fixture
def patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """``unbuffered_streams`` on circus' modules, undone after the test."""
    monkeypatch.setattr(file_stream._FileStreamBase, "_open", file_stream._FileStreamBase._open)
    monkeypatch.setattr(process, "Popen", process.Popen)
    unbuffered_streams(file_stream, process)


def chunk(data: bytes) -> dict[str, object]:
    return {"data": data, "pid": 7, "name": "stdout", "timestamp": time.time()}


@pytest.mark.usefixtures("patched")
def test_a_file_stream_writes_every_chunk_at_once_and_rotates(tmp_path: Path) -> None:
    log = tmp_path / "bot.out.log"
    log.write_bytes(b"from before\n")
    stream = file_stream.FileStream(str(log), max_bytes=40, backup_count=1)
    assert isinstance(stream._file, AppendFile)
    stream(chunk("héllo\n".encode()))
    assert log.read_bytes() == "from before\nhéllo\n".encode()  # no flush needed
    stream(chunk(b"\xff not utf-8\n"))  # decoded with replacement, as circus does
    assert log.read_bytes().endswith("\ufffd not utf-8\n".encode())
    stream(chunk(b"x" * 30 + b"\n"))  # past max_bytes: the file rotates first
    assert (tmp_path / "bot.out.log.1").read_bytes().startswith(b"from before\n")
    assert log.read_bytes() == b"x" * 30 + b"\n"
    stream.close()
    assert stream._file.closed
    stream.open()  # circus reopens a closed stream
    stream(chunk(b"again\n"))
    assert log.read_bytes().endswith(b"again\n")
    stream.close()


def test_an_append_file_is_created_private_under_a_private_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        appended = AppendFile(str(tmp_path / "new.log"))
    finally:
        os.umask(previous)
    assert (tmp_path / "new.log").stat().st_mode & 0o777 == 0o600
    with pytest.raises(UnicodeEncodeError):  # FileStream's fallback catches this
        appended.write("\udcff")
    assert appended.tell() == 0
    appended.close()
    appended.close()  # twice is harmless, as for a file


@pytest.mark.usefixtures("patched")
def test_a_process_pipe_is_read_unbuffered() -> None:
    child = process.Popen(
        ["sh", "-c", "echo out; echo err >&2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert type(child.stdout) is io.FileIO and type(child.stderr) is io.FileIO
        assert child.stdout.read() == b"out\n" and child.stderr.read() == b"err\n"
    finally:
        child.wait(timeout=10)
        for pipe in (child.stdout, child.stderr):
            pipe.close()
    assert child.returncode == 0


@pytest.mark.usefixtures("patched")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # what a dropped file says
def test_a_stream_circus_drops_without_closing_leaves_no_descriptor(tmp_path: Path) -> None:
    # reloadconfig and rm stop a changed or removed watcher without closing its streams:
    # what circus drops must not keep its log open in circusd for good.
    before = len(os.listdir("/proc/self/fd"))
    for n in range(20):
        stream = file_stream.FileStream(str(tmp_path / f"bot-{n}.log"))
        stream(chunk(b"line\n"))
        del stream
    assert len(os.listdir("/proc/self/fd")) == before
