"""Audio processing parity with transformers: decoding/resampling (`audio_utils.load_audio`, soundfile backend),
log-mel features (`Gemma4AudioFeatureExtractor`) and soft-token counts (`Gemma4Processor`), on speech made by
espeak-ng and converted by sox (8/16/44.1/48 kHz, mono/stereo, WAV/FLAC) and soundfile (MP3)."""

from __future__ import annotations

import math
import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from mlx_gemma4.processing.audio import (
    MAX_SAMPLES,
    MIN_SAMPLES,
    AudioError,
    AudioFeatureExtractor,
    decode_audio,
    extract_features,
    load_audio,
    num_audio_soft_tokens,
    prepare_waveform,
)

sf = pytest.importorskip("soundfile")
fe_mod = pytest.importorskip("transformers.models.gemma4.feature_extraction_gemma4")
from transformers.audio_utils import load_audio as hf_load_audio  # noqa: E402
from transformers.models.gemma4.processing_gemma4 import Gemma4Processor  # noqa: E402

RATES = (8000, 16000, 44100, 48000)
SENTENCE = "Gemma four listens: seven quick zebras jumped over the lazy brown dogs."


def _hf_extractor():
    return fe_mod.Gemma4AudioFeatureExtractor()


def _hf_features(waveforms: list[np.ndarray]):
    out = _hf_extractor()(list(waveforms), return_tensors="np")
    return out["input_features"], out["input_features_mask"]


def _hf_processor_token_counts(waveforms: list[np.ndarray]) -> list[int]:
    """Gemma4Processor's own placeholder expansion (replace_audio_token on the extractor's output), called on a
    stand-in `self` carrying only what it reads (AutoProcessor needs torchvision, which this CPU torch lacks)."""
    fe = _hf_extractor()
    proc = SimpleNamespace(feature_extractor=fe, audio_seq_length=750, boa_token="<B>", eoa_token="<E>",
                           audio_token="@")
    outputs = fe(list(waveforms), return_tensors="np")
    return [Gemma4Processor.replace_audio_token(proc, outputs, i).count("@") for i in range(len(waveforms))]


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """dict name -> path of the same spoken sentence: 'src' (espeak-ng, 22.05 kHz), m<rate>.wav (mono),
    s<rate>.wav (stereo: right = 0.5 x left), m16000.flac, m44100.flac, m22050.mp3."""
    if shutil.which("espeak-ng") is None or shutil.which("sox") is None:
        pytest.skip("espeak-ng and sox are needed to make test speech (apt-get install espeak-ng sox)")
    d = tmp_path_factory.mktemp("speech")
    paths = {"src": d / "src.wav"}
    subprocess.run(["espeak-ng", "-w", str(paths["src"]), SENTENCE], check=True, capture_output=True)
    for rate in RATES:
        for kind, remix in (("m", []), ("s", ["remix", "1", "1v0.5"])):
            p = d / f"{kind}{rate}.wav"
            subprocess.run(["sox", "-D", str(paths["src"]), "-r", str(rate), str(p), *remix], check=True)
            paths[p.name] = p
    for rate in (16000, 44100):
        p = d / f"m{rate}.flac"
        subprocess.run(["sox", "-D", str(paths["src"]), "-r", str(rate), str(p)], check=True)
        paths[p.name] = p
    if "MP3" in sf.available_formats():
        data, rate = sf.read(paths["src"], dtype="float32")
        sf.write(d / "m22050.mp3", data, rate, format="MP3")
        paths["m22050.mp3"] = d / "m22050.mp3"
    return paths


# ---------------------------------------------------------------------------------------------------------
# Features at 16 kHz: equal to transformers
# ---------------------------------------------------------------------------------------------------------


def test_features_equal_transformers_at_16k(speech):
    wave, rate = sf.read(speech["m16000.wav"], dtype="float32")
    assert rate == 16000
    clips = [wave, wave[:12345], wave[: MIN_SAMPLES]]  # a batch: padding to the longest, masks per clip
    ours = AudioFeatureExtractor()(clips)
    ref, ref_mask = _hf_features(clips)
    assert ours.features.shape == ref.shape and ours.features.dtype == np.float32
    np.testing.assert_array_equal(ours.mask, ref_mask)
    assert np.abs(ours.features - ref).max() <= 1e-5
    assert ours.mask[0].sum() > 100 and ours.features[0][ours.mask[0]].std() > 0.5  # real speech, not silence


def test_features_equal_transformers_with_optional_settings(speech):
    """Pre-emphasis (both flavours), input scaling, per-bin normalisation and FFT overdrive, not used by the
    published config but accepted by from_dict, must also match the reference."""
    wave, _ = sf.read(speech["m16000.wav"], dtype="float32")
    wave = wave[:20000]
    rng = np.random.default_rng(0)
    for settings in (
        dict(preemphasis=0.97, preemphasis_htk_flavor=True),
        dict(preemphasis=0.9, preemphasis_htk_flavor=False, input_scale_factor=2.0),
        dict(per_bin_mean=list(rng.normal(size=128)), per_bin_stddev=list(rng.uniform(0.5, 2, size=128))),
        dict(fft_overdrive=True, mel_floor=1e-5),
    ):
        ours = AudioFeatureExtractor.from_dict(settings)([wave])
        ref = fe_mod.Gemma4AudioFeatureExtractor(**settings)([wave], return_tensors="np")["input_features"]
        assert np.abs(ours.features - ref).max() <= 1e-5, settings


# processor_config.json "feature_extractor" block of google/gemma-4-*-it (shared/reference/gemma4/processor.json)
PUBLISHED_FEATURE_EXTRACTOR = {
    "dither": 0.0, "feature_extractor_type": "Gemma4AudioFeatureExtractor", "feature_size": 128,
    "fft_length": 512, "fft_overdrive": False, "frame_length": 320, "hop_length": 160, "input_scale_factor": 1.0,
    "max_frequency": 8000.0, "mel_floor": 0.001, "min_frequency": 0.0, "padding_side": "right",
    "padding_value": 0.0, "per_bin_mean": None, "per_bin_stddev": None, "preemphasis": 0.0,
    "preemphasis_htk_flavor": True, "return_attention_mask": True, "sampling_rate": 16000,
}


def test_left_padding_equals_transformers(speech):
    """padding_side "left" (some fine-tunes ship it) shifts the frame grid; features, masks and the processor's
    token counts must still match transformers for a padded batch."""
    wave, _ = sf.read(speech["m16000.wav"], dtype="float32")
    clips = [wave[:9000], wave[:4321], wave[:16000]]
    ours = AudioFeatureExtractor.from_dict({"padding_side": "left"})(clips)
    hf = fe_mod.Gemma4AudioFeatureExtractor(padding_side="left")
    ref = hf(clips, return_tensors="np")
    np.testing.assert_array_equal(ours.mask, ref["input_features_mask"])
    assert np.abs(ours.features - ref["input_features"]).max() <= 1e-5
    proc = SimpleNamespace(feature_extractor=hf, audio_seq_length=750, boa_token="<B>", eoa_token="<E>",
                           audio_token="@")
    assert ours.num_soft_tokens == [Gemma4Processor.replace_audio_token(proc, ref, i).count("@") for i in range(3)]


def test_from_dict_reads_published_processor_config():
    d = PUBLISHED_FEATURE_EXTRACTOR
    fe = AudioFeatureExtractor.from_dict(d)
    assert (fe.frame_length, fe.hop_length, fe.fft_length, fe.feature_size) == (320, 160, 512, 128)
    wave = np.sin(np.arange(9000) * 0.05).astype(np.float32)
    ref = _hf_features([wave])[0]
    assert np.abs(fe([wave]).features - ref).max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# Decoding, downmix, resampling
# ---------------------------------------------------------------------------------------------------------

FILES = [f"{k}{r}.wav" for r in RATES for k in "ms"] + ["m16000.flac", "m44100.flac", "m22050.mp3"]


@pytest.mark.parametrize("name", FILES)
def test_load_and_features_equal_transformers_pipeline(speech, name):
    """File -> waveform equals transformers' load_audio(backend="soundfile") (soxr HQ), features equal."""
    if name not in speech:
        pytest.skip(f"{name}: this libsndfile cannot write MP3")
    ref_wave = hf_load_audio(str(speech[name]), sampling_rate=16000, backend="soundfile")
    wave = load_audio(speech[name])
    assert wave.dtype == np.float32 and wave.shape == ref_wave.shape
    assert np.abs(wave - ref_wave).max() <= 1e-6
    ours = extract_features(speech[name])
    ref, ref_mask = _hf_features([ref_wave])
    np.testing.assert_array_equal(ours.mask, ref_mask)
    assert np.abs(ours.features - ref).max() <= 1e-5
    assert ours.num_soft_tokens == _hf_processor_token_counts([ref_wave])


@pytest.mark.parametrize("rate", RATES)
def test_stereo_downmix_is_channel_mean(speech, rate):
    raw, file_rate = sf.read(speech[f"s{rate}.wav"], dtype="float32", always_2d=True)
    assert raw.shape[1] == 2 and file_rate == rate
    assert np.abs(raw[:, 1] - 0.5 * raw[:, 0]).max() < 1e-3 and np.abs(raw[:, 0]).max() > 0.3  # right = left / 2
    mono, got_rate = decode_audio(speech[f"s{rate}.wav"])
    assert got_rate == rate
    np.testing.assert_allclose(mono, raw.mean(axis=1), atol=1e-7)
    # same numbers as the (mono) prepare_waveform path on the array, resampled identically
    np.testing.assert_allclose(prepare_waveform(raw, sampling_rate=rate), load_audio(speech[f"s{rate}.wav"]),
                               atol=1e-7)


# Measured on this sentence (transformers 5.24, soxr 1.1, sox 14.4): 44.1/48 kHz vs sox-made 16 kHz, all
# 128 bins: max 0.57, mean 0.0034, p99 0.055 (log-mel units; features span -6.9..2.8). 8 kHz, bins < 80
# (< ~3.2 kHz, below the 8 kHz file's band edge): max 0.27, mean 0.0026, p99 0.042.
RESAMPLE_BOUNDS = {8000: (80, 0.5, 0.01, 0.1), 44100: (128, 1.0, 0.01, 0.1), 48000: (128, 1.0, 0.01, 0.1)}


@pytest.mark.parametrize("rate", sorted(RESAMPLE_BOUNDS))
def test_resampled_features_close_to_native_16k(speech, rate):
    """The same sentence delivered at another rate and resampled by us gives nearly the 16 kHz features."""
    bins, max_bound, mean_bound, p99_bound = RESAMPLE_BOUNDS[rate]
    native = extract_features(speech["m16000.wav"])
    other = extract_features(speech[f"m{rate}.wav"])
    assert other.features.shape == native.features.shape and other.num_soft_tokens == native.num_soft_tokens
    valid = native.mask[0] & other.mask[0]
    diff = np.abs(other.features[0, :, :bins] - native.features[0, :, :bins])[valid]
    assert diff.max() <= max_bound and diff.mean() <= mean_bound and np.quantile(diff, 0.99) <= p99_bound, (
        diff.max(), diff.mean(), np.quantile(diff, 0.99))


def test_mp3_close_to_wav(speech):
    if "m22050.mp3" not in speech:
        pytest.skip("this libsndfile cannot write MP3 (needs libsndfile >= 1.1 with LAME)")
    wav, mp3 = extract_features(speech["src"]), extract_features(speech["m22050.mp3"])
    assert mp3.num_soft_tokens == wav.num_soft_tokens
    diff = np.abs(mp3.features - wav.features)[wav.mask & mp3.mask]
    assert diff.mean() < 0.5  # lossy codec: close on average (measured ~0.1), not equal


def test_flac_equals_wav_at_16k(speech):
    a, b = extract_features(speech["m16000.wav"]), extract_features(speech["m16000.flac"])
    assert np.abs(a.features - b.features).max() <= 1e-6


# ---------------------------------------------------------------------------------------------------------
# Soft-token counts
# ---------------------------------------------------------------------------------------------------------


def test_token_counts_equal_processor_expansion():
    """One batch through transformers' extractor + Gemma4Processor.replace_audio_token (the count its __call__
    puts in the prompt): one whole 40 ms period of clip lengths in 1 ms steps, and lengths around 1 s."""
    lengths = list(range(MIN_SAMPLES, MIN_SAMPLES + 640, 16)) + list(range(15_990, 16_330, 17))
    rng = np.random.default_rng(0)
    clips = [rng.normal(scale=0.1, size=n).astype(np.float32) for n in lengths]
    ref = _hf_processor_token_counts(clips)
    assert [num_audio_soft_tokens(n) for n in lengths] == ref
    assert AudioFeatureExtractor()(clips).num_soft_tokens == ref
    assert len(set(ref)) >= 3  # several token counts, including each boundary of the period


def test_token_counts_equal_processor_formula_every_length():
    """Every length up to 1 s sample by sample, then every 997th sample up to 30 s, against
    Gemma4Processor._compute_audio_num_tokens; and ceil(ms / 40) is wrong on about a quarter of whole-ms clips."""
    proc = SimpleNamespace(feature_extractor=_hf_extractor(), audio_seq_length=750)
    for n in [*range(0, 16_001), *range(16_001, MAX_SAMPLES + 1, 997), MAX_SAMPLES - 1, MAX_SAMPLES]:
        assert num_audio_soft_tokens(n) == Gemma4Processor._compute_audio_num_tokens(proc, np.zeros(n), 16000), n
    assert num_audio_soft_tokens(MAX_SAMPLES) == 750
    assert num_audio_soft_tokens(MIN_SAMPLES) == 1 and num_audio_soft_tokens(MIN_SAMPLES - 1) == 0
    ms = np.arange(1, 30_001)
    wrong = np.mean([num_audio_soft_tokens(16 * m) != math.ceil(m / 40) for m in ms])
    assert 0.2 < wrong < 0.3, wrong


def test_30_seconds_is_750_tokens_like_processor():
    clip = np.full(MAX_SAMPLES, 0.01, dtype=np.float32)
    assert AudioFeatureExtractor()([clip]).num_soft_tokens == [750] == _hf_processor_token_counts([clip])


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_and_unsupported_files(tmp_path):
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(range(256)) * 3)
    text = tmp_path / "notes.mp3"
    text.write_text("this is not audio at all\n" * 20)
    for path in (corrupt, text):
        with pytest.raises(AudioError, match="cannot decode"):
            load_audio(path)
    with pytest.raises(AudioError, match="cannot decode"):
        load_audio(b"\x00\x01garbage" * 50)
    with pytest.raises(AudioError, match="directory"):
        load_audio(tmp_path)
    with pytest.raises(AudioError, match="empty"):
        load_audio(b"")


def test_zero_length_and_too_short_audio(tmp_path):
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0,), dtype=np.float32), 16000)
    with pytest.raises(AudioError, match="zero length|no audio"):
        extract_features(empty)
    with pytest.raises(AudioError, match="empty"):
        extract_features(np.zeros(0, dtype=np.float32))
    with pytest.raises(AudioError, match="too short"):
        extract_features(np.zeros(MIN_SAMPLES - 1, dtype=np.float32))
    with pytest.raises(AudioError, match="too short"):
        AudioFeatureExtractor()([np.zeros(100, dtype=np.float32)])


def test_too_long_audio_is_rejected_not_truncated():
    with pytest.raises(AudioError, match="at most 30 s"):
        extract_features(np.zeros(MAX_SAMPLES + 1, dtype=np.float32))
    with pytest.raises(AudioError, match="at most 30 s"):  # 31 s at 48 kHz, after resampling
        extract_features(np.zeros(31 * 48000, dtype=np.float32), sampling_rate=48000)


def test_bad_arrays_and_settings():
    with pytest.raises(AudioError, match="NaN"):
        extract_features(np.full(4000, np.nan, dtype=np.float32))
    with pytest.raises(AudioError, match="shape"):
        extract_features(np.zeros((2, 3, 4000), dtype=np.float32))
    with pytest.raises(AudioError, match="channels, samples"):
        extract_features(np.zeros((2, 4000), dtype=np.float32))
    with pytest.raises(AudioError, match="integer"):
        extract_features(np.zeros(4000, dtype=np.int16))
    with pytest.raises(AudioError, match="mono"):
        AudioFeatureExtractor()([np.zeros((4000, 2), dtype=np.float32)])
    with pytest.raises(AudioError, match="sampling_rate"):
        prepare_waveform(b"RIFF", sampling_rate=16000)
    with pytest.raises(ValueError, match="dither"):
        AudioFeatureExtractor.from_dict({"dither": 1e-4})
    with pytest.raises(ValueError, match="unsupported"):
        AudioFeatureExtractor.from_dict({"window": "hamming"})
    with pytest.raises(ValueError, match="sampling_rate"):
        AudioFeatureExtractor.from_dict({"sampling_rate": 22050})
    with pytest.raises(ValueError, match="padding_side"):
        AudioFeatureExtractor.from_dict({"padding_side": "center"})
    with pytest.raises(ValueError, match="fft_length"):
        AudioFeatureExtractor.from_dict({"fft_length": 1024})
