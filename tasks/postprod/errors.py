"""The error post-production stages raise."""

from __future__ import annotations


class PostprocessError(RuntimeError):
    """A post-production stage could not process a clip; for ffmpeg, the message ends with its log."""
