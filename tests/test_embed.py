"""`xlsr-jax embed`, `init` and `presets`: outputs equal Hugging Face's, errors are one clear line."""

import numpy as np
import pytest
import soundfile
from hf_helpers import hf_forward, random_hf_model, transformers

from data_pipelines.audio import load_audio, normalize
from xlsr_jax.cli import main
from xlsr_jax.config import get_preset
from xlsr_jax.convert.hf import hf_to_jax
from xlsr_jax.model_dir import read_config

TOL = 1e-4


def _write_clips(folder):
    """Three clips: 16 kHz mono wav, 44.1 kHz stereo flac, 22.05 kHz ogg, of different lengths."""
    rng = np.random.RandomState(3)
    folder.mkdir()
    t = np.arange(int(1.3 * 16000)) / 16000
    soundfile.write(folder / "a.wav", (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * rng.randn(t.size)), 16000)
    stereo = 0.2 * rng.randn(int(0.7 * 44100), 2)
    soundfile.write(folder / "b.flac", stereo, 44100)
    soundfile.write(folder / "c.ogg", 0.2 * rng.randn(int(2.1 * 22050)), 22050)
    return [folder / "a.wav", folder / "b.flac", folder / "c.ogg"]


@pytest.fixture(scope="module", params=["tiny", "tiny_base"])
def converted(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    config = get_preset(request.param)
    hf = random_hf_model(config, "ctc")
    hf.save_pretrained(tmp / "hf")
    # Real HF directories carry the feature extractor's settings; do_normalize comes from there.
    transformers.Wav2Vec2FeatureExtractor(do_normalize=config.do_normalize).save_pretrained(tmp / "hf")
    return config, hf, hf_to_jax(tmp / "hf", tmp / "model"), _write_clips(tmp / "clips")


@pytest.mark.parametrize("layer", [None, 1, -3])
def test_embed_equals_hugging_face(converted, tmp_path, layer):
    config, hf, model_dir, clips = converted
    assert read_config(model_dir)[0].do_normalize == config.do_normalize
    args = ["embed", "--model", str(model_dir), "--output", str(tmp_path / "out"), "--batch-size", "2"]
    if layer is not None:
        args += ["--layer", str(layer)]
    assert main(args + [str(c) for c in clips]) == 0
    for clip in clips:
        ours = np.load(tmp_path / "out" / (clip.stem + ".npy"))
        wave = load_audio(clip)
        if config.do_normalize:
            wave = normalize(wave)
        out = hf_forward(hf.wav2vec2, wave[None], np.ones((1, wave.size), np.int32))
        theirs = (out.last_hidden_state if layer is None else out.hidden_states[layer])[0].numpy()
        assert ours.shape == theirs.shape == (config.num_frames(wave.size), config.hidden_size)
        assert np.abs(ours - theirs).max() < TOL, (clip.name, np.abs(ours - theirs).max())


def test_embed_errors(converted, tmp_path, capsys):
    _, _, model_dir, clips = converted
    out = str(tmp_path / "out")
    assert main(["embed", "--model", str(model_dir), "--output", out, str(tmp_path / "missing.wav")]) == 2
    assert "missing.wav: no such file" in capsys.readouterr().err
    (tmp_path / "junk.wav").write_bytes(b"RIFF not really a wave file" * 10)
    assert main(["embed", "--model", str(model_dir), "--output", out, str(tmp_path / "junk.wav")]) == 2
    assert "junk.wav: cannot decode" in capsys.readouterr().err
    assert main(["embed", "--model", str(model_dir), "--output", out, "--layer", "9", str(clips[0])]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["embed", "--model", str(tmp_path), "--output", out, str(clips[0])]) == 2
    assert "not an xlsr-jax model directory" in capsys.readouterr().err
    twin = tmp_path / "other"
    twin.mkdir()
    (twin / "a.wav").write_bytes(clips[0].read_bytes())
    assert main(["embed", "--model", str(model_dir), "--output", out, str(clips[0]), str(twin / "a.wav")]) == 2
    assert "both write a.npy" in capsys.readouterr().err


def test_init_and_presets(tmp_path, capsys):
    assert main(["init", "--preset", "tiny", "--head", "ctc", "--output", str(tmp_path / "m")]) == 0
    assert "39,824" not in capsys.readouterr().out  # the CTC head adds lm_head parameters
    assert main(["presets"]) == 0
    assert "2,162,932,352" in capsys.readouterr().out
