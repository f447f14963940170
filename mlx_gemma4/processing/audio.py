"""Audio input for Gemma 4 (E2B/E4B): decoding, resampling, log-mel features and the soft-token count.

Pipeline (numpy only, no torch):

  load_audio(path | bytes)        decode WAV/FLAC/MP3/OGG/... with soundfile (libsndfile >= 1.1 reads MP3),
                                  downmix by channel mean, resample to 16 kHz with soxr "HQ" quality,
                                  exactly as transformers' `audio_utils.load_audio(..., backend="soundfile")`.
  AudioFeatureExtractor(clips)    128-bin log-mel spectrogram (20 ms window, 10 ms hop, 512-point FFT),
                                  equal to transformers' `Gemma4AudioFeatureExtractor`.
  num_audio_soft_tokens(n)        how many `<|audio|>` placeholders a clip of n samples (at 16 kHz) expands to:
                                  the valid feature frames after the tower's two stride-2 convolutions, as
                                  `Gemma4Processor.replace_audio_token` counts them.

Length limits: a clip must be at least `MIN_SAMPLES` (161 samples, ~10 ms: one feature frame, one soft
token) and at most `MAX_SAMPLES` (480 000 samples = 30 s = 750 soft tokens). transformers silently truncates
longer clips to 30 s; we raise instead, so nothing the user gave is dropped without notice: split long
recordings into several clips of <= 30 s (each becomes its own `<|audio>...<audio|>` block).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import numpy as np

from ..errors import MediaError

SAMPLING_RATE = 16_000
AUDIO_SEQ_LENGTH = 750  # processor_config "audio_seq_length": most soft tokens per clip
MAX_SAMPLES = 480_000  # feature extractor's max_length: 30 s at 16 kHz (-> exactly 750 soft tokens)
# Soft tokens come from the tower's two stride-2 (kernel 3, padding 1) sub-sampling convolutions.
SUBSAMPLING_LAYERS = 2

AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray]


class AudioError(MediaError):
    """An audio input that cannot be used (unreadable, empty, too short/long, wrong shape)."""


# ----------------------------------------------------------------------------------------------------------
# Decoding and resampling
# ----------------------------------------------------------------------------------------------------------


def to_mono(waveform: np.ndarray) -> np.ndarray:
    """(samples,) or (samples, channels) -> (samples,) float32; channels are averaged (stereo downmix)."""
    waveform = np.asarray(waveform)
    if waveform.ndim == 1:
        return waveform.astype(np.float32, copy=False)
    if waveform.ndim != 2:
        raise AudioError(f"audio must be 1-D (samples,) or 2-D (samples, channels); got shape {waveform.shape}")
    if waveform.shape[1] > 32 >= waveform.shape[0]:
        raise AudioError(f"audio of shape {waveform.shape} looks like (channels, samples); pass (samples, channels)")
    if waveform.shape[1] == 1:
        return waveform[:, 0].astype(np.float32, copy=False)
    return waveform.astype(np.float32, copy=False).mean(axis=1)


def resample(waveform: np.ndarray, orig_rate: int, target_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Resample a mono float32 waveform with soxr (quality "HQ", as transformers' loader and librosa use).

    The output has exactly ceil(n * target / orig) samples (zero-padded or cut, as transformers does)."""
    if orig_rate <= 0 or target_rate <= 0:
        raise AudioError(f"sampling rates must be positive; got {orig_rate} -> {target_rate}")
    waveform = np.asarray(waveform, dtype=np.float32)
    if orig_rate == target_rate:
        return waveform
    import soxr

    n_out = math.ceil(waveform.shape[-1] * target_rate / orig_rate)
    out = soxr.resample(waveform, orig_rate, target_rate, quality="soxr_hq")
    out = np.pad(out, (0, max(0, n_out - len(out))))[:n_out]
    return np.ascontiguousarray(out, dtype=np.float32)


def _describe(source: AudioSource) -> str:
    return f"{len(source)} bytes of audio" if isinstance(source, (bytes, bytearray)) else f"audio file {str(source)!r}"


def decode_audio(source: AudioSource) -> tuple[np.ndarray, int]:
    """Decode a file path or encoded bytes -> (mono float32 waveform, its sampling rate). No resampling.

    Any format libsndfile reads: WAV, FLAC, OGG/Vorbis, MP3 (libsndfile >= 1.1), AIFF, ..."""
    import soundfile as sf

    what = _describe(source)
    if isinstance(source, (bytes, bytearray)):
        if len(source) == 0:
            raise AudioError("audio bytes are empty")
        handle: Any = io.BytesIO(bytes(source))
    else:
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"audio file not found: {path!r}")
        if os.path.isdir(path):
            raise AudioError(f"{what} is a directory, not an audio file")
        handle = path
    try:
        with sf.SoundFile(handle) as f:
            rate = f.samplerate
            if rate > 0 and f.frames > MAX_SAMPLES * rate / SAMPLING_RATE + rate:  # refused before it is decoded
                raise AudioError(f"{what} is too long: {f.frames / rate:.2f} s; Gemma 4 takes at most "
                                 f"{MAX_SAMPLES / SAMPLING_RATE:.0f} s per clip. Split it into clips of at most 30 s")
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as e:
        reason = str(e)
        if not isinstance(handle, io.BytesIO) and "does not exist" in reason:
            reason = "not a recognized audio format"  # libsndfile's words for an existing file it cannot parse
        mp3_hint = ""
        if "MP3" not in sf.available_formats():
            mp3_hint = f" (this libsndfile {sf.__libsndfile_version__} cannot read MP3; libsndfile >= 1.1 can)"
        raise AudioError(
            f"cannot decode {what}: {reason}. Supported formats are those libsndfile reads "
            f"(WAV, FLAC, OGG, MP3, AIFF, ...){mp3_hint}"
        ) from e
    except RuntimeError as e:  # soundfile raises plain RuntimeError for some malformed streams
        raise AudioError(f"cannot decode {what}: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{what} contains no audio samples (zero length)")
    return to_mono(data), int(rate)


def load_audio(source: AudioSource, sampling_rate: int = SAMPLING_RATE) -> np.ndarray:
    """Decode, downmix to mono and resample to `sampling_rate` -> float32 (samples,).

    Equal to transformers' `load_audio(path, sampling_rate, backend="soundfile")`."""
    waveform, rate = decode_audio(source)
    return resample(waveform, rate, sampling_rate)


def prepare_waveform(audio: AudioSource | np.ndarray, sampling_rate: int | None = None) -> np.ndarray:
    """Any accepted audio input -> mono float32 16 kHz waveform of a usable length.

    audio: a path or encoded bytes (decoded; `sampling_rate` must then be None), or an array of samples,
    (samples,) or (samples, channels), at `sampling_rate` Hz (default 16 kHz). Raises AudioError for empty,
    too-short (< ~10 ms), too-long (> 30 s) or non-finite audio."""
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)):
        if sampling_rate is not None:
            raise AudioError("sampling_rate is read from the file; pass it only with an array of samples")
        waveform = load_audio(audio)
    else:
        arr = np.asarray(audio)
        if arr.dtype.kind not in "fiu":
            raise AudioError(f"audio samples must be numbers; got dtype {arr.dtype}")
        if arr.size == 0:
            raise AudioError("audio is empty (zero samples)")
        if arr.dtype.kind in "iu":
            raise AudioError("integer PCM arrays are ambiguous in scale; pass float samples in [-1, 1]")
        waveform = resample(to_mono(arr), sampling_rate or SAMPLING_RATE, SAMPLING_RATE)
    check_clip_length(len(waveform))
    if not np.all(np.isfinite(waveform)):
        raise AudioError("audio contains NaN or infinite samples")
    return waveform


def check_clip_length(num_samples: int) -> None:
    """Raise AudioError unless a 16 kHz clip of num_samples yields between 1 and 750 soft tokens."""
    if num_samples == 0:
        raise AudioError("audio is empty (zero samples)")
    if num_samples < MIN_SAMPLES:
        raise AudioError(
            f"audio is too short: {num_samples} samples ({1000 * num_samples / SAMPLING_RATE:.1f} ms at 16 kHz); "
            f"at least {MIN_SAMPLES} samples (~10 ms) are needed for one audio token"
        )
    if num_samples > MAX_SAMPLES:
        raise AudioError(
            f"audio is too long: {num_samples / SAMPLING_RATE:.2f} s; Gemma 4 takes at most "
            f"{MAX_SAMPLES / SAMPLING_RATE:.0f} s ({AUDIO_SEQ_LENGTH} audio tokens) per clip. "
            "Split it into clips of at most 30 s and pass them as separate audio inputs"
        )


# ----------------------------------------------------------------------------------------------------------
# Log-mel features
# ----------------------------------------------------------------------------------------------------------


def _hz_to_mel_htk(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def _mel_to_hz_htk(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, dtype=np.float64) / 2595.0) - 1.0)


def mel_filters_htk(num_bins: int, num_mels: int, sampling_rate: int, f_min: float, f_max: float) -> np.ndarray:
    """(num_bins, num_mels) float64 triangular filters, HTK mel scale, no area normalization.

    Same filters as transformers' `audio_utils.mel_filter_bank(..., norm=None, mel_scale="htk")`: the triangle
    of mel i rises from edge i to edge i+1 and falls to edge i+2 (edges equally spaced in mel), evaluated at the
    FFT bin frequencies linspace(0, sr // 2, num_bins). With 128 mels on 257 bins the lowest filters are all
    zero (narrower than a bin); that is what the model was trained with."""
    edges_hz = _mel_to_hz_htk(np.linspace(_hz_to_mel_htk(f_min), _hz_to_mel_htk(f_max), num_mels + 2))
    bin_hz = np.linspace(0, sampling_rate // 2, num_bins)
    widths = np.diff(edges_hz)
    offset = edges_hz[None, :] - bin_hz[:, None]  # (bins, mels+2): edge minus bin frequency
    rising = -offset[:, :-2] / widths[:-1]
    falling = offset[:, 2:] / widths[1:]
    return np.maximum(0.0, np.minimum(rising, falling))


def periodic_hann(length: int) -> np.ndarray:
    """Periodic Hann window (float32): 0.5 - 0.5 cos(2 pi n / length), n < length."""
    return np.hanning(length + 1)[:-1].astype(np.float32)


@dataclass
class AudioFeatures:
    """Batch of log-mel features. features: (B, T, n_mels) float32, zero at invalid frames;
    mask: (B, T) bool, True where the frame covers real audio only; num_soft_tokens: per clip."""

    features: np.ndarray
    mask: np.ndarray
    num_soft_tokens: list[int]


# Keys in processor_config.json's "feature_extractor" block that don't affect the features.
_FE_IGNORED = {"feature_extractor_type", "processor_class", "return_attention_mask"}


@dataclass
class AudioFeatureExtractor:
    """Gemma 4 log-mel feature extractor; defaults are the published processor_config.json values.

    Semantics (transformers `Gemma4AudioFeatureExtractor`): clips of a batch are right-padded with zeros
    to the longest, rounded up to a multiple of `pad_to_multiple_of` samples; `frame_length // 2` zeros are
    prepended ("semicausal" padding, frame i centred on sample i*hop); frames of frame_length+1 samples are
    cut every hop samples; the frame's first frame_length samples (or its pre-emphasized difference) are
    Hann-windowed, zero-padded to fft_length, |rfft| is mapped to mel bins and log(mel + mel_floor) taken.
    A frame is valid when its last sample is real audio; invalid frames are set to 0. padding_side "left"
    (seen in some fine-tunes' processor_config.json) puts the padding before the audio, as transformers does;
    that shifts the frame grid, so features and token counts then differ from the "right" default."""

    sampling_rate: int = SAMPLING_RATE
    feature_size: int = 128
    frame_length: int = 320
    hop_length: int = 160
    fft_overdrive: bool = False
    min_frequency: float = 0.0
    max_frequency: float = 8000.0
    mel_floor: float = 1e-3
    preemphasis: float = 0.0
    preemphasis_htk_flavor: bool = True
    input_scale_factor: float = 1.0
    per_bin_mean: list[float] | None = None
    per_bin_stddev: list[float] | None = None
    padding_value: float = 0.0
    pad_to_multiple_of: int = 128
    padding_side: str = "right"
    fft_length: int = field(init=False)

    def __post_init__(self):
        if self.frame_length <= 0 or self.hop_length <= 0:
            raise ValueError(f"frame_length and hop_length must be positive; got {self.frame_length}, {self.hop_length}")
        if self.padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left'; got {self.padding_side!r}")
        self.fft_length = 2 ** math.ceil(math.log2(self.frame_length)) * (2 if self.fft_overdrive else 1)
        for name in ("per_bin_mean", "per_bin_stddev"):
            value = getattr(self, name)
            if value is not None and len(value) != self.feature_size:
                raise ValueError(f"{name} has {len(value)} entries; feature_size is {self.feature_size}")
        self._window = periodic_hann(self.frame_length)
        self._mel_filters = mel_filters_htk(
            self.fft_length // 2 + 1, self.feature_size, self.sampling_rate, self.min_frequency, self.max_frequency
        )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AudioFeatureExtractor":
        """From processor_config.json's "feature_extractor" block (lengths in samples or *_ms keys)."""
        d = dict(d)
        if d.get("feature_extractor_type", "Gemma4AudioFeatureExtractor") != "Gemma4AudioFeatureExtractor":
            raise ValueError(f"unsupported feature_extractor_type {d['feature_extractor_type']!r}")
        if float(d.pop("dither", 0.0)) != 0.0:
            raise ValueError("feature_extractor.dither != 0 (random noise) is not supported; Gemma 4 uses 0.0")
        rate = int(d.pop("sampling_rate", SAMPLING_RATE))
        if rate != SAMPLING_RATE:
            raise ValueError(f"feature_extractor.sampling_rate {rate} is not supported (Gemma 4 uses 16000)")
        kwargs: dict[str, Any] = {"sampling_rate": rate}
        for name in ("frame_length", "hop_length"):
            ms = d.pop(f"{name}_ms", None)
            samples = d.pop(name, None)
            if ms is not None:
                kwargs[name] = int(round(rate * float(ms) / 1000.0))
            elif samples is not None:
                kwargs[name] = int(samples)
        fft_length = d.pop("fft_length", None)
        for key in ("feature_size", "fft_overdrive", "min_frequency", "max_frequency", "mel_floor", "preemphasis",
                    "preemphasis_htk_flavor", "input_scale_factor", "per_bin_mean", "per_bin_stddev",
                    "padding_value", "pad_to_multiple_of", "padding_side"):
            if key in d:
                kwargs[key] = d.pop(key)
        unknown = set(d) - _FE_IGNORED
        if unknown:
            raise ValueError(f"unsupported feature_extractor settings: {sorted(unknown)}")
        fe = cls(**kwargs)
        if fft_length is not None and int(fft_length) != fe.fft_length:
            raise ValueError(f"feature_extractor.fft_length {fft_length} disagrees with frame_length "
                             f"{fe.frame_length} (-> {fe.fft_length})")
        return fe

    def num_frames(self, num_samples: int) -> int:
        """Feature frames computed for an (already padded) array of num_samples."""
        return max(0, (num_samples + self.frame_length // 2 - (self.frame_length + 1)) // self.hop_length + 1)

    def log_mel(self, waveforms: np.ndarray) -> np.ndarray:
        """(..., samples) float32 -> (..., frames, feature_size) float32 log-mel, no masking."""
        x = np.asarray(waveforms, dtype=np.float32)
        if self.input_scale_factor != 1.0:
            x = x * self.input_scale_factor
        n_frames = self.num_frames(x.shape[-1])
        if n_frames == 0:
            return np.zeros((*x.shape[:-1], 0, self.feature_size), dtype=np.float32)
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(self.frame_length // 2, 0)])
        frames = np.lib.stride_tricks.sliding_window_view(x, self.frame_length + 1, axis=-1)
        frames = frames[..., :: self.hop_length, :][..., :n_frames, :]
        if self.preemphasis > 0.0:
            if self.preemphasis_htk_flavor:  # first sample scaled by (1 - p), the rest x[n] - p x[n-1]
                frames = np.concatenate(
                    [frames[..., :1] * (1.0 - self.preemphasis),
                     frames[..., 1:-1] - self.preemphasis * frames[..., :-2]], axis=-1)
            else:  # x[n+1] - p x[n] over the whole frame_length+1 window
                frames = frames[..., 1:] - self.preemphasis * frames[..., :-1]
        else:
            frames = frames[..., :-1]
        # float32 frames and FFT, float64 mel projection and log: the dtype path of the reference extractor.
        spectrum = np.abs(np.fft.rfft(frames * self._window, n=self.fft_length, axis=-1))
        # One 2-D product (a stacked matmul would call BLAS once per clip).
        mel = (spectrum.reshape(-1, spectrum.shape[-1]) @ self._mel_filters).reshape(*spectrum.shape[:-1], -1)
        log_mel = np.log(mel + np.float64(self.mel_floor))
        if self.per_bin_mean is not None:
            log_mel = log_mel - np.asarray(self.per_bin_mean)
        if self.per_bin_stddev is not None:
            log_mel = log_mel / np.asarray(self.per_bin_stddev)
        return log_mel.astype(np.float32)

    def __call__(self, clips: Sequence[np.ndarray] | np.ndarray) -> AudioFeatures:
        """clips: one mono 16 kHz float waveform (1-D) or a list of them -> AudioFeatures (batched, padded)."""
        if isinstance(clips, np.ndarray) and clips.ndim == 1:
            clips = [clips]
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        if not clips:
            raise AudioError("no audio clips given")
        for i, c in enumerate(clips):
            if c.ndim != 1:
                raise AudioError(f"clip {i}: expected a mono 1-D waveform, got shape {c.shape} (use prepare_waveform)")
            check_clip_length(len(c))
        longest = max(len(c) for c in clips)
        m = self.pad_to_multiple_of or 1
        batch = np.full((len(clips), -(-longest // m) * m), self.padding_value, dtype=np.float32)
        starts = [batch.shape[1] - len(c) if self.padding_side == "left" else 0 for c in clips]
        for i, (c, start) in enumerate(zip(clips, starts)):
            batch[i, start : start + len(c)] = c
        features = self.log_mel(batch)
        mask = np.stack([self.frame_mask(start, len(c), features.shape[1]) for c, start in zip(clips, starts)])
        # The tower keeps every 2nd frame of the mask per stride-2 convolution (Gemma4Processor.replace_audio_token
        # counts the same way). With right padding this is num_audio_soft_tokens(len(clip)).
        stride = 2**SUBSAMPLING_LAYERS
        return AudioFeatures(
            features=features * mask[..., None],
            mask=mask,
            num_soft_tokens=[min(int(m[::stride].sum()), AUDIO_SEQ_LENGTH) for m in mask],
        )

    def frame_mask(self, start: int, num_samples: int, num_frames: int) -> np.ndarray:
        """(num_frames,) bool: frame i is valid iff its last sample, i*hop + frame_length - pad_left, is real
        audio (which occupies [start, start + num_samples) of the padded clip)."""
        last_sample = np.arange(num_frames) * self.hop_length + self.frame_length - self.frame_length // 2
        return (last_sample >= start) & (last_sample < start + num_samples)


def num_audio_soft_tokens(num_samples: int, extractor: AudioFeatureExtractor | None = None) -> int:
    """Number of `<|audio|>` soft tokens for a 16 kHz clip of num_samples (0 for clips under ~10 ms).

    = valid feature frames, sub-sampled twice by the tower's stride-2 convolutions (each keeps every other
    frame: t -> ceil(t / 2)), capped at 750. This is `Gemma4Processor.replace_audio_token`'s count (and its
    `_compute_audio_num_tokens`), and equals the number of True entries of the tower's output mask. It is
    not ceil(duration_ms / 40): e.g. 1000 ms -> 99 valid frames -> 25 tokens (ceil gives 25), but
    1010 ms -> 100 frames -> 25 tokens (ceil gives 26)."""
    fe = extractor or _DEFAULT_EXTRACTOR
    t = fe.num_frames(num_samples)  # frames whose last sample is real audio
    for _ in range(SUBSAMPLING_LAYERS):
        t = (t + 1) // 2
    return min(t, AUDIO_SEQ_LENGTH)


_DEFAULT_EXTRACTOR = AudioFeatureExtractor()
MIN_SAMPLES = _DEFAULT_EXTRACTOR.frame_length // 2 + 1  # 161: the first frame's last sample must be real


def extract_features(
    audio: Sequence[AudioSource | np.ndarray] | AudioSource | np.ndarray,
    sampling_rate: int | None = None,
    extractor: AudioFeatureExtractor | None = None,
) -> AudioFeatures:
    """Convenience: paths/bytes/arrays (one or a list) -> batched AudioFeatures for the audio tower."""
    if isinstance(audio, (str, os.PathLike, bytes, bytearray)) or (isinstance(audio, np.ndarray)):
        audio = [audio]
    waveforms = [prepare_waveform(a, sampling_rate) for a in audio]
    return (extractor or _DEFAULT_EXTRACTOR)(waveforms)
