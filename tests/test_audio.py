"""Tests for data_pipelines.audio: decoding, resampling, mixing, error reporting, normalize, padding."""

from __future__ import annotations

import pathlib

import numpy as np
import pytest
import soundfile
import soxr

from data_pipelines.audio import SAMPLE_RATE, AudioError, load_audio, load_batch, normalize, pad_batch
from data_pipelines.corpus import TRANSCRIPTS, sample_paths


def _sine(freq: float, rate: int, n: int, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _dominant_freq(x: np.ndarray, rate: int) -> float:
    # Hann window keeps leakage from a non-integer number of periods from moving the peak.
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / rate)[np.argmax(spectrum)])


def _band_magnitude(x: np.ndarray, rate: int, freq: float, width: float = 20.0) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(spectrum[np.abs(freqs - freq) < width].max())


# --- decoding ---------------------------------------------------------------------------------


def test_wav_16k_round_trip(tmp_path: pathlib.Path) -> None:
    x = _sine(440.0, SAMPLE_RATE, 8000)
    path = tmp_path / "sine.wav"
    soundfile.write(path, x, SAMPLE_RATE, subtype="PCM_16")
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1e-4)


def test_float_wav_round_trip_is_exact(tmp_path: pathlib.Path) -> None:
    x = _sine(300.0, SAMPLE_RATE, 4000)
    path = tmp_path / "sine_float.wav"
    soundfile.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    np.testing.assert_array_equal(load_audio(str(path)), x)


def test_stereo_44k_is_mixed_to_mono_and_resampled(tmp_path: pathlib.Path) -> None:
    rate, n = 44_100, 30_013
    common = _sine(440.0, rate, n, amplitude=0.5)
    differ = _sine(3000.0, rate, n, amplitude=0.3)
    # The 3 kHz tone has opposite sign per channel: it cancels in the mean and would dominate
    # (or at least show up) if only one channel were kept.
    stereo = np.stack([common + differ, common - differ], axis=1)
    path = tmp_path / "stereo.wav"
    soundfile.write(path, stereo, rate, subtype="FLOAT")

    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert abs(len(y) - round(n * SAMPLE_RATE / rate)) <= 1

    assert _dominant_freq(y, SAMPLE_RATE) == pytest.approx(440.0, rel=0.01)
    assert _band_magnitude(y, SAMPLE_RATE, 3000.0) < 1e-3 * _band_magnitude(y, SAMPLE_RATE, 440.0)
    # Amplitude of the mixed sine survives resampling (RMS of 0.5 * sin is 0.5 / sqrt 2).
    assert np.sqrt(np.mean(y[500:-500] ** 2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.01)

    expected = soxr.resample(stereo.mean(axis=1, dtype=np.float32), rate, SAMPLE_RATE, quality="HQ")
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_first_channel_alone_differs_from_mix(tmp_path: pathlib.Path) -> None:
    rate, n = 16_000, 4000
    left, right = _sine(200.0, rate, n), np.zeros(n, np.float32)
    path = tmp_path / "lr.wav"
    soundfile.write(path, np.stack([left, right], axis=1), rate, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), left / 2, atol=1e-7)


def test_target_rate_other_than_16k(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sine.wav"
    soundfile.write(path, _sine(1000.0, SAMPLE_RATE, 16_000), SAMPLE_RATE, subtype="FLOAT")
    y = load_audio(path, target_rate=8000)
    assert abs(len(y) - 8000) <= 1
    assert _dominant_freq(y, 8000) == pytest.approx(1000.0, rel=0.01)


@pytest.mark.parametrize(
    ("suffix", "subtype", "atol"),
    [
        ("flac", "PCM_16", 1e-4),
        ("flac", "PCM_24", 1e-6),
        # Vorbis is lossy: check the signal, not the samples.
        ("ogg", "VORBIS", None),
    ],
)
def test_compressed_formats_read(
    tmp_path: pathlib.Path, suffix: str, subtype: str, atol: float | None
) -> None:
    x = _sine(523.0, SAMPLE_RATE, 16_000)
    path = tmp_path / f"sine.{suffix}"
    soundfile.write(path, x, SAMPLE_RATE, subtype=subtype)
    y = load_audio(path)
    assert y.dtype == np.float32 and y.ndim == 1
    assert len(y) == len(x)
    if atol is not None:
        np.testing.assert_allclose(y, x, atol=atol)
    assert _dominant_freq(y, SAMPLE_RATE) == pytest.approx(523.0, rel=0.01)
    assert np.sqrt(np.mean(y**2)) == pytest.approx(0.5 / np.sqrt(2), rel=0.05)


def test_ogg_at_48k_is_resampled(tmp_path: pathlib.Path) -> None:
    rate, n = 48_000, 24_000
    path = tmp_path / "sine48.ogg"
    soundfile.write(path, _sine(880.0, rate, n), rate, subtype="VORBIS")
    y = load_audio(path)
    assert abs(len(y) - round(n * SAMPLE_RATE / rate)) <= 1
    assert _dominant_freq(y, SAMPLE_RATE) == pytest.approx(880.0, rel=0.01)


# --- errors -----------------------------------------------------------------------------------


def test_missing_file(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "nope.wav"
    with pytest.raises(AudioError, match="no such file") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert info.value.path == str(path)


def test_directory(tmp_path: pathlib.Path) -> None:
    with pytest.raises(AudioError, match="directory") as info:
        load_audio(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_random_bytes(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "noise.wav"
    path.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(AudioError, match="cannot decode") as info:
        load_audio(path)
    assert str(path) in str(info.value)
    # The libsndfile error is kept as the cause for debugging.
    assert isinstance(info.value.__cause__, RuntimeError)


def test_truncated_header(tmp_path: pathlib.Path) -> None:
    full = tmp_path / "full.wav"
    soundfile.write(full, _sine(440.0, SAMPLE_RATE, 1000), SAMPLE_RATE, subtype="PCM_16")
    path = tmp_path / "header.wav"
    path.write_bytes(full.read_bytes()[:20])
    with pytest.raises(AudioError, match="cannot decode") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_audio_error_is_a_value_error(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        load_audio(tmp_path / "missing.flac")


def test_zero_length_wav(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="zero samples") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_wav_truncated_mid_data_reads_the_frames_present(tmp_path: pathlib.Path) -> None:
    # libsndfile trusts the data present over the header's length and returns the complete frames
    # without an error; a partially written file is still usable audio, so that is what we keep.
    x = _sine(440.0, SAMPLE_RATE, 16_000)
    path = tmp_path / "cut.wav"
    soundfile.write(path, x, SAMPLE_RATE, subtype="PCM_16")
    data = path.read_bytes()
    header = len(data) - 2 * len(x)
    assert header == 44
    path.write_bytes(data[: header + 10_001])  # 5000 whole PCM_16 frames and one stray byte

    y = load_audio(path)
    assert len(y) == 5000
    np.testing.assert_allclose(y, x[:5000], atol=1e-4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(tmp_path: pathlib.Path, bad: float) -> None:
    x = _sine(440.0, SAMPLE_RATE, 1000)
    x[123] = bad
    path = tmp_path / "bad.wav"
    soundfile.write(path, x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(AudioError, match="non-finite") as info:
        load_audio(path)
    assert str(path) in str(info.value)


def test_bad_target_rate(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="target_rate"):
        load_audio(tmp_path / "x.wav", target_rate=0)


# --- normalize --------------------------------------------------------------------------------


def test_normalize_formula() -> None:
    x = np.random.default_rng(1).normal(0.3, 0.05, size=5000).astype(np.float32)
    y = normalize(x)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x - x.mean()) / np.sqrt(x.var() + 1e-7), rtol=1e-6, atol=1e-6)
    assert abs(float(y.mean())) < 1e-5
    assert float(y.std()) == pytest.approx(1.0, abs=1e-4)


def test_normalize_silence_stays_finite() -> None:
    # The epsilon is what keeps all-zero (padding-only or silent) input from dividing by zero.
    y = normalize(np.zeros(100, np.float32))
    np.testing.assert_array_equal(y, np.zeros(100, np.float32))


def test_normalize_matches_hugging_face() -> None:
    transformers = pytest.importorskip("transformers")  # the optional `torch` extra
    x = np.random.default_rng(2).uniform(-0.4, 0.6, size=12_345).astype(np.float32)
    extractor = transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True
    )
    hf = extractor(x, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values[0]
    assert hf.shape == x.shape
    np.testing.assert_allclose(normalize(x), hf, atol=1e-5)


# --- padding and batches ----------------------------------------------------------------------


def test_pad_batch_shapes_and_mask() -> None:
    waves = [np.ones(5, np.float32), 2 * np.ones(3, np.float32), 3 * np.ones(7, np.float32)]
    batch, mask = pad_batch(waves)
    assert batch.shape == mask.shape == (3, 7)
    assert batch.dtype == np.float32 and mask.dtype == np.int32
    np.testing.assert_array_equal(mask.sum(axis=1), [5, 3, 7])
    np.testing.assert_array_equal(mask[1], [1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch[1], [2, 2, 2, 0, 0, 0, 0])
    np.testing.assert_array_equal(batch[2], np.full(7, 3.0))
    assert batch[mask == 0].sum() == 0


@pytest.mark.parametrize(("multiple", "expected"), [(None, 7), (1, 7), (4, 8), (7, 7), (320, 320)])
def test_pad_batch_multiple(multiple: int | None, expected: int) -> None:
    batch, mask = pad_batch([np.ones(7, np.float32), np.ones(2, np.float32)], pad_to_multiple_of=multiple)
    assert batch.shape == (2, expected)
    np.testing.assert_array_equal(mask.sum(axis=1), [7, 2])


def test_pad_batch_errors() -> None:
    with pytest.raises(ValueError, match="empty"):
        pad_batch([])
    with pytest.raises(ValueError, match="1-D"):
        pad_batch([np.ones((2, 3), np.float32)])
    with pytest.raises(ValueError, match="positive"):
        pad_batch([np.ones(3, np.float32)], pad_to_multiple_of=0)


def test_load_batch_normalizes_before_padding(tmp_path: pathlib.Path) -> None:
    paths = []
    for i, (freq, n) in enumerate([(300.0, 4000), (500.0, 2500)]):
        path = tmp_path / f"{i}.wav"
        soundfile.write(path, _sine(freq, SAMPLE_RATE, n, amplitude=0.1) + 0.05, SAMPLE_RATE, subtype="FLOAT")
        paths.append(path)

    raw, mask, lengths = load_batch(paths)
    assert lengths == [4000, 2500]
    assert raw.shape == (2, 4000)
    np.testing.assert_array_equal(mask.sum(axis=1), lengths)

    normed, _, _ = load_batch(paths, do_normalize=True)
    for row, length, path in zip(normed, lengths, paths):
        np.testing.assert_allclose(row[:length], normalize(load_audio(path)), atol=1e-6)
        # Statistics come from the real samples only, and padding stays exactly zero.
        assert abs(float(row[:length].mean())) < 1e-5
        assert float(row[:length].std()) == pytest.approx(1.0, abs=1e-3)
        assert np.all(row[length:] == 0)


# --- bundled corpus ---------------------------------------------------------------------------


def test_bundled_samples() -> None:
    paths = sample_paths()
    assert [p.name for p in paths] == ["cmn_0001.flac", "de_0001.flac", "en_0001.flac"]
    for path in paths:
        assert path.is_file()
        assert path.stat().st_size < 100_000
        info = soundfile.info(path)
        assert (info.samplerate, info.channels, info.format) == (SAMPLE_RATE, 1, "FLAC")
        wave = load_audio(path)
        assert 0.5 <= len(wave) / SAMPLE_RATE <= 10.0
        assert 0.05 < np.abs(wave).max() <= 1.0  # speech, not silence, and not clipped past full scale

    rows = [line.split("\t") for line in TRANSCRIPTS.read_text(encoding="utf-8").splitlines()]
    assert rows[0] == ["file", "language", "text"]
    assert {r[0]: r[1] for r in rows[1:]} == {p.name: p.name.split("_")[0] for p in paths}

