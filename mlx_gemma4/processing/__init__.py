"""Input processing: images/video (processing.image, processing.video), audio (processing.audio), text."""

from .processor import Processor

__all__ = ["Processor"]
