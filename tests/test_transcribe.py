"""`xlsr-jax transcribe` and `xlsr_jax.inference`: one pass on short files, exact stitching on long ones."""

import csv

import flax.linen as nn
import jax
import numpy as np
import pytest
import soundfile

from data_pipelines.audio import SAMPLE_RATE, load_audio, normalize
from data_pipelines.corpus import corpus_dir, manifest_path
from data_pipelines.vocab import Vocabulary
from xlsr_jax.cli import main
from xlsr_jax.config import HF_ARCHITECTURES, get_preset
from xlsr_jax.inference import Predictor, chunk_frames, plan_windows, receptive_field
from xlsr_jax.model_dir import save_model_dir
from xlsr_jax.models.heads import abstract_params, init_params

# 1 s windows with 0.2 s margins: 50-frame windows that keep 30 frames each away from the ends, so a
# 2.5 s file (124 frames) runs as 4 windows of the tiny model.
CHUNK, OVERLAP = 1.0, 0.2
LONG_ARGS = ["--chunk-seconds", str(CHUNK), "--overlap-seconds", str(OVERLAP), "--batch-size", "4"]
LABELS = ("en", "de", "fr")


def single_pass(predictor, wave):
    """Logits of one unpadded, unmasked forward pass over the whole (normalized) waveform."""
    wave = normalize(wave) if predictor.config.do_normalize else wave
    return np.asarray(_single_pass(predictor.params, wave[None], predictor.model))[0]


_single_pass = jax.jit(lambda params, audio, model: model.apply({"params": params}, audio).logits,
                       static_argnums=2)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """A 2.2 s English dev clip (shorter than the default 30 s chunk) and 2.5 s of concatenated speech."""
    folder = tmp_path_factory.mktemp("clips")
    dev = sorted((corpus_dir() / "en" / "dev").glob("*.flac"))
    speech = np.concatenate([load_audio(p) for p in dev])
    assert speech.size > 2.5 * SAMPLE_RATE
    soundfile.write(folder / "long.wav", speech[: int(2.5 * SAMPLE_RATE)], SAMPLE_RATE, subtype="FLOAT")
    return dev[0], folder / "long.wav"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny random CTC model (with vocab.json) and a 3-label classifier sharing its encoder."""
    tmp = tmp_path_factory.mktemp("models")
    with open(manifest_path(), newline="") as f:
        texts = [row["text"] for row in csv.DictReader(f, delimiter="\t")]
    vocab = Vocabulary.from_texts(texts)
    vocab_file = vocab.save(tmp / "vocab.json")
    rng = np.random.default_rng(0)

    config = get_preset("tiny", vocab_size=len(vocab), pad_token_id=0)
    params = init_params(config, "ctc", seed=0)
    # A freshly initialized lm_head (std 0.02) spells the same character on every frame; a wide
    # one makes the argmax change from frame to frame, so decoding differences would show.
    params["lm_head"]["kernel"] = rng.normal(size=params["lm_head"]["kernel"].shape).astype(np.float32)
    ctc = save_model_dir(tmp / "ctc", config, params, "ctc", extra_files=[vocab_file])

    cls_config = get_preset("tiny", num_labels=len(LABELS), id2label=LABELS)
    shapes = nn.meta.unbox(abstract_params(cls_config, "sequence_classification"))
    cls_params = {
        name: params["wav2vec2"] if name == "wav2vec2"
        else jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32), tree)
        for name, tree in shapes.items()
    }  # fmt: skip
    cls = save_model_dir(tmp / "cls", cls_config, cls_params, "sequence_classification")
    return ctc, cls, vocab


# ---- window planning: pure bookkeeping -------------------------------------------------------------


@pytest.mark.parametrize("chunk_s,overlap_s", [(1.0, 0.2), (1.0, 0.0), (0.5, 0.24), (30.0, 5.0)])
def test_windows_tile_every_frame_once(chunk_s, overlap_s):
    config = get_preset("tiny")
    hop, field = config.downsample, receptive_field(config)
    assert (hop, field) == (320, 400)
    chunk, overlap = chunk_frames(config, chunk_s, overlap_s)
    window = chunk * hop + field - hop
    step = max(37, window // 997)  # a few thousand lengths per setting, at every offset within a hop
    assert np.gcd(step, hop) == 1
    edges = [window - 1, window, window + hop - 1, window + hop, 31 * window + 5]
    lengths = [*range(field, 3 * window, step), *edges]
    for n in lengths:
        total = config.num_frames(n)
        plan = plan_windows(config, n, chunk, overlap)
        kept = np.concatenate([w.start // hop + np.arange(w.keep_start, w.keep_stop) for w in plan])
        np.testing.assert_array_equal(kept, np.arange(total))  # no frame lost, none twice, in order
        if total <= chunk:
            assert plan == [plan[0]] and (plan[0].start, plan[0].length) == (0, n)  # whole file, one pass
            continue
        for k, w in enumerate(plan):
            assert w.start % hop == 0 and w.length == window and w.start + w.length <= n
            assert config.num_frames(w.length) == chunk  # the window makes exactly its own frames
            assert w.keep_start >= (overlap if k > 0 else 0)  # left context of every kept frame
            assert chunk - w.keep_stop >= (overlap if k < len(plan) - 1 else 0)  # right context
        assert plan[-1].start // hop + chunk == total  # the last window ends at the last frame


def test_bad_chunking_is_refused():
    config = get_preset("tiny")
    with pytest.raises(ValueError, match="more than twice"):
        chunk_frames(config, 1.0, 0.5)
    with pytest.raises(ValueError, match="less than one frame"):
        chunk_frames(config, 0.001, 0.0)
    with pytest.raises(ValueError, match="too short: 399 samples"):
        plan_windows(config, 399, 50, 10)


# ---- CTC -----------------------------------------------------------------------------------------


def test_short_file_is_one_forward_pass(model_dirs, clips, capsys):
    ctc, _, vocab = model_dirs
    short, _ = clips
    predictor = Predictor.load(ctc)
    wave = load_audio(short)
    assert len(predictor.windows(wave.size)) == 1
    ours = predictor.ctc_logits(wave)
    theirs = single_pass(predictor, wave)
    assert ours.shape == theirs.shape == (predictor.config.num_frames(wave.size), len(vocab))
    # Ours is padded to a whole second with an attention mask; only float rounding may differ.
    assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()
    text = vocab.decode(theirs.argmax(-1), ctc=True)
    assert len(set(text)) > 3  # the wide lm_head makes a varied transcript, not one repeated character
    assert predictor.transcribe(wave) == text
    assert main(["transcribe", "--model", str(ctc), "--quiet", str(short)]) == 0
    assert capsys.readouterr().out == f"{short}\t{text}\n"


def test_long_file_is_stitched_exactly(model_dirs, clips, capsys):
    ctc, _, vocab = model_dirs
    _, long = clips
    predictor = Predictor.load(ctc, chunk_seconds=CHUNK, overlap_seconds=OVERLAP, batch_size=4)
    wave = load_audio(long)
    total = predictor.config.num_frames(wave.size)
    plan = predictor.windows(wave.size)
    assert len(plan) == 4 and {w.length for w in plan} == {predictor.window_samples}  # one program
    chunked = predictor.ctc_logits(wave)
    assert chunked.shape == (total, len(vocab))

    # Each kept frame is that window's own output at that frame: run the windows ourselves.
    norm = normalize(wave)
    windows = np.stack([norm[w.start : w.start + w.length] for w in plan])
    per_window = predictor.forward(windows, np.ones(windows.shape, np.int32))
    hop = predictor.config.downsample
    for w, logits in zip(plan, per_window):
        first = w.start // hop + w.keep_start
        np.testing.assert_array_equal(chunked[first : first + w.kept], logits[w.keep_start : w.keep_stop])

    # Against one pass over the whole file the conv features are identical (they see 400 samples) and
    # the positional conv (16 frames wide) stays inside the 10-frame margins; only attention to frames
    # outside a window differs, so kept frames must stay much closer to their own frame of the single
    # pass than to its neighbour (which is what a frame lost or repeated would give).
    full = single_pass(predictor, wave)
    aligned = np.abs(chunked - full).mean()
    shifted = min(np.abs(chunked[1:] - full[:-1]).mean(), np.abs(chunked[:-1] - full[1:]).mean())
    assert aligned < 0.01 * np.abs(full).mean() and aligned < 0.01 * shifted, (aligned, shifted)
    agree = chunked.argmax(-1) == full.argmax(-1)
    assert agree.mean() > 0.95 and agree[-10:].all()  # same greedy path, up to the file's end

    text = vocab.decode(chunked.argmax(-1), ctc=True)
    assert main(["transcribe", "--model", str(ctc), "--quiet", *LONG_ARGS, str(long)]) == 0
    assert capsys.readouterr().out == f"{long}\t{text}\n"


# ---- classification ---------------------------------------------------------------------------------


def test_classification(model_dirs, clips, capsys):
    _, cls, _ = model_dirs
    short, long = clips
    predictor = Predictor.load(cls)
    assert predictor.labels == LABELS
    wave = load_audio(short)
    label, prob, probs = predictor.classify(wave)
    logits = single_pass(predictor, wave)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(probs, expected, atol=1e-5)  # one window: the single pass's softmax
    assert probs.sum() == pytest.approx(1.0) and (label, prob) == (LABELS[probs.argmax()], probs.max())

    chunked = Predictor.load(cls, chunk_seconds=CHUNK, overlap_seconds=OVERLAP, batch_size=4)
    long_wave = load_audio(long)
    plan = chunked.windows(long_wave.size)
    norm = normalize(long_wave)
    windows = np.stack([norm[w.start : w.start + w.length] for w in plan])
    per_window = chunked.forward(windows, np.ones(windows.shape, np.int32))
    log_probs = per_window - np.log(np.exp(per_window).sum(-1, keepdims=True))
    weights = np.array([w.kept for w in plan], np.float64)
    assert weights.sum() == chunked.config.num_frames(long_wave.size)  # each frame weighs once
    mean = (weights[:, None] * log_probs).sum(0) / weights.sum()
    long_label, long_prob, long_probs = chunked.classify(long_wave)
    np.testing.assert_allclose(long_probs, np.exp(mean) / np.exp(mean).sum(), atol=1e-6)
    assert long_probs.sum() == pytest.approx(1.0)

    assert main(["transcribe", "--model", str(cls), "--quiet", str(short)]) == 0
    assert main(["transcribe", "--model", str(cls), "--quiet", *LONG_ARGS, str(long)]) == 0
    assert capsys.readouterr().out == f"{short}\t{label}\t{prob:.4f}\n{long}\t{long_label}\t{long_prob:.4f}\n"


def test_labels_fall_back_to_hf_names():
    config = get_preset("tiny", num_labels=2)
    assert Predictor(config, "sequence_classification", params={}).labels == ("LABEL_0", "LABEL_1")


# ---- errors ---------------------------------------------------------------------------------------


def test_bad_files_are_reported_and_the_rest_still_run(model_dirs, clips, tmp_path, capsys):
    ctc, _, _ = model_dirs
    short, _ = clips
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"RIFF not really a wave file" * 10)
    tiny = tmp_path / "tiny.wav"
    soundfile.write(tiny, np.zeros(300, np.float32), SAMPLE_RATE)
    missing = tmp_path / "missing.wav"
    args = ["transcribe", "--model", str(ctc), "--quiet", str(missing), str(short), str(junk), str(tiny)]
    assert main(args) == 1
    out, err = capsys.readouterr()
    text = Predictor.load(ctc).transcribe(load_audio(short))
    assert out == f"{short}\t{text}\n"
    lines = err.strip().splitlines()
    assert lines[0] == f"xlsr-jax transcribe: error: {missing}: no such file"
    assert lines[1].startswith(f"xlsr-jax transcribe: error: {junk}: cannot decode audio")
    assert lines[2].startswith(f"xlsr-jax transcribe: error: {tiny}: too short: 300 samples make no frame")
    assert lines[3] == f"xlsr-jax transcribe: 3 of 4 file(s) failed: {missing}, {junk}, {tiny}"
    assert len(lines) == 4


def test_unusable_model_dirs_are_one_line_errors(model_dirs, clips, tmp_path, capsys):
    ctc, _, _ = model_dirs
    short, _ = clips
    config = get_preset("tiny")
    for head in ("base", "pretraining"):
        (tmp_path / head).mkdir()
        config.save(tmp_path / head / "config.json", head=head, architectures=[HF_ARCHITECTURES[head]])
        assert main(["transcribe", "--model", str(tmp_path / head), str(short)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"has a '{head}' head, which makes no transcript or label" in err
    (tmp_path / "novocab").mkdir()
    config.save(tmp_path / "novocab" / "config.json", head="ctc", architectures=[HF_ARCHITECTURES["ctc"]])
    assert main(["transcribe", "--model", str(tmp_path / "novocab"), str(short)]) == 2
    assert "CTC model directory without vocab.json" in capsys.readouterr().err
    assert main(["transcribe", "--model", str(tmp_path), str(short)]) == 2
    assert "not an xlsr-jax model directory" in capsys.readouterr().err
    assert main(["transcribe", "--model", str(ctc), "--chunk-seconds", "1", "--overlap-seconds", "0.5",
                 str(short)]) == 2
    assert "must be more than twice overlap_seconds" in capsys.readouterr().err
