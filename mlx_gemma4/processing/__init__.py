"""Input processing: images/video (processing.image, processing.video), audio (processing.audio), text."""
