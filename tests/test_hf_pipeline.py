"""`transformers.pipeline` on a `jax_to_hf` export says what our JAX model says, on real speech clips."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_helpers import torch, transformers

from data_pipelines.audio import SAMPLE_RATE, load_audio, normalize
from data_pipelines.corpus import corpus_dir, manifest_path
from data_pipelines.vocab import BOS, EOS, Vocabulary
from xlsr_jax.config import get_preset
from xlsr_jax.convert.hf import jax_to_hf
from xlsr_jax.model_dir import save_model_dir
from xlsr_jax.models.heads import build_model, init_params

# Each test initializes, compiles and loads a pipeline: ~20-45 s on 2 busy CPU cores.
pytestmark = pytest.mark.slow
TOL = 1e-4
CLIPS = ("en/dev/en_0004.flac", "de/dev/de_0004.flac", "cmn/dev/cmn_0004.flac")
# Every clip is cut to its first 1.5 s (all are longer): one shape, so our model compiles once and runs
# the clips as one unpadded batch, while the pipeline runs them one at a time.
CLIP_SAMPLES = 24_000
LANGUAGES = ("en", "de", "cmn")
# Both feature-extractor settings: layer-norm convs with normalized audio and an attention mask, and
# group-norm convs on raw audio without one.
PRESETS = ("tiny", "tiny_base")


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.fixture(scope="module")
def waves() -> list[np.ndarray]:
    return [load_audio(corpus_dir() / clip)[:CLIP_SAMPLES] for clip in CLIPS]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    with open(manifest_path(), encoding="utf-8") as f:
        return Vocabulary.from_texts(row["text"] for row in csv.DictReader(f, delimiter="\t"))


def _our_logits(config, head, params, waves) -> np.ndarray:
    """Our model's float32 logits on what our inference feeds it (normalized when the config says so)."""
    audio = np.stack([normalize(w) if config.do_normalize else w for w in waves])
    mask = jnp.ones(audio.shape, jnp.int32) if config.feat_extract_norm == "layer" else None
    apply = jax.jit(build_model(config, head).apply)
    return np.asarray(apply({"params": params}, jnp.asarray(audio), mask).logits)


def _hf_logits(pipe, wave) -> np.ndarray:
    """The exported model's float32 logits on the pipeline's own feature-extractor output."""
    features = pipe.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="pt")
    if pipe.feature_extractor.do_normalize:  # HF normalizes exactly as data_pipelines.audio does
        assert _max_diff(features["input_values"][0].numpy(), normalize(wave)) < 1e-6
    with torch.no_grad():
        return pipe.model(**features).logits.numpy()[0]


@pytest.mark.parametrize("preset", PRESETS)
def test_asr_pipeline_matches_our_greedy_decoding(tmp_path, preset, vocab, waves):
    config = get_preset(preset, vocab_size=len(vocab), pad_token_id=vocab.pad_id)
    params = init_params(config, "ctc", seed=0)
    head = params["lm_head"]
    # A random head's logits are ~N(0, 0.1): scaling the kernel spreads them (~N(0, 5)) so the argmax is
    # decided by margins far above float error and the text changes from frame to frame (non-empty,
    # varied output). <s> and </s> never occur in CTC targets, so a trained model never emits them;
    # Hugging Face's CTC decoding would print them while Vocabulary.decode drops them: keep them out.
    head["kernel"] = head["kernel"] * 50.0
    head["bias"] = head["bias"].at[vocab.ids[BOS]].set(-50.0).at[vocab.ids[EOS]].set(-50.0)
    # The random head ranks `|` ~15 below each frame's best token (median): lifting it by that much makes
    # it win on some frames, so the word delimiter -> space mapping is compared too.
    head["bias"] = head["bias"].at[vocab.delimiter_id].set(15.0)
    vocab_file = vocab.save(tmp_path)
    model_dir = save_model_dir(tmp_path / "model", config, params, "ctc", extra_files=[vocab_file])
    hf_dir = jax_to_hf(model_dir, tmp_path / "hf")

    pipe = transformers.pipeline("automatic-speech-recognition", model=str(hf_dir))
    assert isinstance(pipe.tokenizer, transformers.Wav2Vec2CTCTokenizer)
    assert pipe.feature_extractor.return_attention_mask == (config.feat_extract_norm == "layer")
    texts = [out["text"] for out in pipe(list(waves))]

    ours = _our_logits(config, "ctc", params, waves)
    assert ours.shape[1] == config.num_frames(CLIP_SAMPLES)  # unpadded: every frame is a real frame
    expected = [vocab.decode(row.argmax(-1), ctc=True) for row in ours]
    diffs = [_max_diff(_hf_logits(pipe, wave), row) for wave, row in zip(waves, ours)]
    top2 = np.sort(ours, axis=-1)[..., -2:]
    margin = float(np.min(top2[..., 1] - top2[..., 0]))
    print(f"{preset}: max |logit diff| per clip {diffs}, smallest top-2 margin {margin:.3g}, texts {texts}")
    assert max(diffs) < TOL, diffs
    # Every frame's best token leads by more than twice the logit difference: no argmax flips by noise.
    assert margin > 2 * max(diffs), (margin, diffs)
    assert texts == expected
    assert all(len(t) > 3 for t in texts) and any(" " in t for t in texts), texts  # real text was compared


def test_audio_classification_pipeline_matches_our_scores(tmp_path, waves):
    config = get_preset("tiny", num_labels=len(LANGUAGES), id2label=LANGUAGES, use_weighted_layer_sum=True)
    params = init_params(config, "sequence_classification", seed=0)
    # Random classifier scores are all ~1/3; spreading the logits makes the ranking of labels a real
    # check (neighbouring scores differ by far more than the tolerance).
    params["classifier"]["kernel"] = params["classifier"]["kernel"] * 200.0
    model_dir = save_model_dir(tmp_path / "model", config, params, "sequence_classification")
    hf_dir = jax_to_hf(model_dir, tmp_path / "hf")

    pipe = transformers.pipeline("audio-classification", model=str(hf_dir))
    assert pipe.model.config.id2label == dict(enumerate(LANGUAGES))
    results = pipe(list(waves), top_k=len(LANGUAGES))

    ours = _our_logits(config, "sequence_classification", params, waves)
    diffs, gaps, top = [], [], []
    for wave, logits, result in zip(waves, ours, results):
        diffs.append(_max_diff(_hf_logits(pipe, wave), logits))
        scores = np.asarray(jax.nn.softmax(logits))
        order = np.argsort(-scores)
        assert [r["label"] for r in result] == [LANGUAGES[i] for i in order]
        diffs.append(_max_diff([r["score"] for r in result], scores[order]))
        gaps.append(float(np.min(-np.diff(scores[order]))))
        top.append(LANGUAGES[order[0]])
    print(f"max |logit or score diff| {max(diffs):.3g}, smallest score gap {min(gaps):.3g}, top labels {top}")
    assert max(diffs) < TOL, diffs
    assert min(gaps) > 2 * max(diffs), (gaps, diffs)  # the label ranking was decided by margins, not noise
