"""Streaming uint8 RGB frames through an ffmpeg filter graph over raw rgb24 pipes.

Frames are written to ffmpeg's stdin from a thread while the filtered frames are
read from its stdout straight into a preallocated array, so a 1280x704x121 clip
(327 MB) is never copied into ``bytes`` on either side and the pipes cannot deadlock.
Graphs are built with ffmpeg-python, as in :mod:`tasks.encode`.
"""

from __future__ import annotations

import os
import subprocess
import threading

import ffmpeg
import numpy as np

from tasks.postprod.errors import PostprocessError

# Enough of ffmpeg's log to show the failing filter and its message.
_LOG_TAIL = 1500


def raw_input(width: int, height: int, fps: float) -> ffmpeg.nodes.FilterableStream:
    """An ffmpeg input reading rgb24 frames of ``width`` x ``height`` at ``fps`` from stdin."""
    return ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)


def raw_output(stream: ffmpeg.nodes.FilterableStream) -> ffmpeg.nodes.OutputStream:
    """Send ``stream`` to stdout as rgb24 frames, one output frame per filtered frame."""
    # fps_mode passthrough: without it ffmpeg duplicates or drops frames to fit the input's rate.
    return stream.output("pipe:", format="rawvideo", pix_fmt="rgb24", fps_mode="passthrough")


def null_output(stream: ffmpeg.nodes.FilterableStream) -> ffmpeg.nodes.OutputStream:
    """Discard ``stream``'s frames (for analysis passes whose result is a side file)."""
    return stream.output("-", format="null")


def _check_frames(frames: np.ndarray) -> None:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3 or not len(frames):
        raise PostprocessError(f"expected uint8 frames (n > 0, h, w, 3), got {frames.dtype} {frames.shape}")


def _spawn(output: ffmpeg.nodes.OutputStream, threads: int, want_stdout: bool) -> subprocess.Popen:
    args = ffmpeg.compile(output, overwrite_output=True)
    # -filter_threads bounds ffmpeg's own filter threads; OMP_NUM_THREADS bounds libvidstab's OpenMP.
    args[1:1] = ["-hide_banner", "-nostats", "-loglevel", "warning", "-filter_threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    return subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE if want_stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _feed(
    proc: subprocess.Popen, frames: np.ndarray
) -> tuple[threading.Thread, threading.Thread, list[bytes]]:
    log: list[bytes] = []

    def write() -> None:
        try:
            proc.stdin.write(memoryview(np.ascontiguousarray(frames)).cast("B"))
        except BrokenPipeError:
            pass  # ffmpeg exited early; its log says why
        finally:
            proc.stdin.close()

    def read_log() -> None:
        log.append(proc.stderr.read())

    writer, reader = threading.Thread(target=write), threading.Thread(target=read_log)
    writer.start()
    reader.start()
    return writer, reader, log


def _finish(
    proc: subprocess.Popen, writer: threading.Thread, reader: threading.Thread, log: list[bytes]
) -> None:
    writer.join()
    reader.join()
    if proc.wait() != 0:
        tail = b"".join(log).decode(errors="replace")[-_LOG_TAIL:]
        raise PostprocessError(f"ffmpeg exited with {proc.returncode}: {tail}")


def filter_frames(
    output: ffmpeg.nodes.OutputStream,
    frames: np.ndarray,
    threads: int = 1,
    expect: int | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Run ``output`` (a graph from :func:`raw_input` to :func:`raw_output`) over ``frames``.

    Returns every frame ffmpeg produced. ``size`` is the graph's output ``(width, height)``
    (default: the input's, for graphs that do not resize). ``expect`` is how many frames the
    graph should make (default: as many as it gets), so the output is allocated once.
    Raises :class:`PostprocessError` with the end of ffmpeg's log if it fails.
    """
    _check_frames(frames)
    _, height, width, _ = frames.shape
    width, height = size or (width, height)
    proc = _spawn(output, threads, want_stdout=True)
    writer, reader, log = _feed(proc, frames)
    out = np.empty((expect or len(frames), height, width, 3), np.uint8)
    count = 0
    try:
        while True:
            if count == len(out):  # more than expected: grow by half
                out = np.concatenate([out, np.empty_like(out[: len(out) // 2 + 1])])
            slot = memoryview(out[count]).cast("B")
            filled = 0
            while filled < len(slot):
                got = proc.stdout.readinto(slot[filled:])
                if not got:
                    break
                filled += got
            if filled < len(slot):
                break
            count += 1
    finally:
        proc.stdout.close()
        _finish(proc, writer, reader, log)
    if filled:
        raise PostprocessError(f"ffmpeg ended inside a frame ({filled} of {len(slot)} bytes)")
    return out[:count]


def consume_frames(output: ffmpeg.nodes.OutputStream, frames: np.ndarray, threads: int = 1) -> None:
    """Run an analysis graph (from :func:`raw_input` to :func:`null_output`) over ``frames``."""
    _check_frames(frames)
    proc = _spawn(output, threads, want_stdout=False)
    _finish(proc, *_feed(proc, frames))
