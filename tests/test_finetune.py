"""Fine-tuning to the user's end: a pretrained small model -> CTC and language ID on the embedded corpus
-> the loop's evaluation equals `xlsr-jax evaluate` -> exports run in `transformers.pipeline` exactly as
`xlsr-jax transcribe` says, on every dev clip.

A CTC model this small sits on the all-blank plateau for several hundred steps (measured in
benchmarks/bench_finetune_learns.py; see BENCHMARKS.md), longer than CI affords, so the pipeline text
comparison runs on a copy of the fine-tuned model whose head is spread out (as in test_hf_pipeline.py):
otherwise both sides would print empty text and agree vacuously. The logits are compared on the
fine-tuned model itself.
"""

import json
import shutil
import threading

import jax
import numpy as np
import pytest

from data_pipelines.audio import load_audio
from data_pipelines.records import DatasetIndex, decode_record
from data_pipelines.sources import PreparedSource
from data_pipelines.vocab import BOS, EOS, Vocabulary
from xlsr_jax.cli import main
from xlsr_jax.experiment import load_experiment
from xlsr_jax.inference import Predictor
from xlsr_jax.model_dir import load_model_dir, save_model_dir
from xlsr_jax.train.checkpoint import Checkpointer
from xlsr_jax.train.loop import train_and_evaluate

pytestmark = pytest.mark.slow
TOL = 1e-4
FAST = ["--config.data.num_buckets=1", "--config.train.log_every=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    train_and_evaluate(load_experiment("experiments/pretrain_xlsr.py:smoke",
                                       ["--config.train.steps=2", "--config.train.eval_every=0", *FAST]), root / "pre")
    assert main(["export", "--workdir", str(root / "pre"), "--output", str(root / "pre_model")]) == 0
    return root, root / "pre_model", root / "pre" / "data"


def _dev_clips(data_dir, tmp_path):
    """The dev split's records written out as FLAC files (what a user would transcribe), with their texts."""
    import soundfile

    source = PreparedSource(data_dir, "dev")
    paths, texts = [], []
    for i in range(len(source)):
        utt = decode_record(source.records[i])
        path = tmp_path / f"{i:03d}_{utt.id.replace('/', '_')}.flac"
        soundfile.write(path, utt.audio, 16000, subtype="PCM_16")
        paths.append(path)
        texts.append(utt.text)
    return paths


def _lines(capsys) -> dict[str, list[str]]:
    out = capsys.readouterr().out
    return {line.split("\t")[0]: line.split("\t")[1:] for line in out.splitlines() if "\t" in line}


def test_ctc_finetune_evaluate_export_and_pipeline(pretrained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root, pre_model, data_dir = pretrained
    config = load_experiment("experiments/finetune_ctc.py:smoke", [
        f"--config.model.init_from={pre_model}", f"--config.data.dir={data_dir}", "--config.train.steps=30",
        "--config.train.eval_every=15", "--config.train.checkpoint_every=15", "--config.optim.total_steps=30",
        "--config.optim.freeze_encoder_steps=4", "--config.optim.peak_lr=5e-3",
        "--config.optim.phase_ratio=(0.1,0.6,0.3)", *FAST])
    traced = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/jaxpr_trace_duration" and "train_step" in str(kwargs.get("fun_name", "")):
            traced.append(threading.current_thread().name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        result = train_and_evaluate(config, root / "ctc")
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    # Both phases' programs were traced and compiled on the loop's background thread: the frozen one while the
    # state initialized, the full one during the frozen steps (the run did not stop at step 5 to compile it).
    assert len(traced) == 2 and all(name.startswith("compile_") for name in traced), traced
    losses = [h["loss"] for h in result.history]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses  # from ~10 to the unigram level
    final = result.eval_history[-1]
    assert final["num_utterances"] == 44 and 0 <= final["blank_ratio"] <= 1 and final["cer"] > 0
    assert {f"cer/{lang}" for lang in DatasetIndex.load(data_dir).languages} <= set(final)
    # The best checkpoint is chosen by the task's metric: WER is what Orbax recorded.
    ckpt = Checkpointer(root / "ctc" / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 30
    ckpt.close()
    saved = json.loads((root / "ctc" / "checkpoints" / "30" / "metrics" / "metrics").read_text())
    assert saved == {"wer": pytest.approx(final["wer"])}
    # Preempted after its step-15 checkpoint, the run resumes exactly: the same losses and parameters.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(root / "ctc", resumed_dir, ignore=lambda d, names: ["30"] if d.endswith("checkpoints") else [])
    resumed = train_and_evaluate(config, resumed_dir)
    assert [h["step"] for h in resumed.history] == list(range(16, 31))
    assert [h["loss"] for h in resumed.history] == losses[15:]
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    model = tmp_path / "ctc_model"
    assert main(["export", "--workdir", str(root / "ctc"), "--output", str(model)]) == 0
    # `xlsr-jax evaluate` on the export reproduces the loop's last evaluation.
    assert main(["evaluate", "--model", str(model), "--data", str(data_dir), "--split", "dev", "--num-buckets", "1",
                 "--batch-size", "8", "--output", str(tmp_path / "eval.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    for key in ("cer", "wer", "blank_ratio"):
        assert report["metrics"][key] == pytest.approx(final[key], abs=1e-6), key
    capsys.readouterr()

    clips = _dev_clips(data_dir, tmp_path)
    # Logits: the exported fine-tuned model in PyTorch equals ours on every dev clip.
    assert main(["convert", "jax-to-hf", "--input", str(model), "--output", str(tmp_path / "hf")]) == 0
    predictor = Predictor.load(model)
    hf_model = transformers.Wav2Vec2ForCTC.from_pretrained(tmp_path / "hf").eval()
    extractor = transformers.AutoFeatureExtractor.from_pretrained(tmp_path / "hf")
    import torch

    worst = 0.0
    for clip in clips:
        wave = load_audio(clip)
        features = extractor(wave, sampling_rate=16000, return_tensors="pt")
        with torch.no_grad():
            theirs = hf_model(**features).logits.numpy()[0]
        worst = max(worst, float(np.max(np.abs(theirs - predictor.ctc_logits(wave)))))
    assert worst < TOL, worst

    # Text: a copy with its head spread out (non-blank, varied output) through pipeline and transcribe.
    cfg, head, params = load_model_dir(model)
    vocab = Vocabulary.load(model)
    lm = dict(params["lm_head"])
    # The plateau model says "blank" (or "|") on every frame: a seeded random head over the fine-tuned encoder
    # makes varied text. <s> and </s> are never CTC targets, and Hugging Face's decoding would print them.
    rng = np.random.default_rng(0)
    lm["kernel"] = rng.normal(0.0, 1.0, np.shape(lm["kernel"])).astype(np.float32)
    lm["bias"] = np.zeros(np.shape(lm["bias"]), np.float32)
    lm["bias"][[vocab.ids[BOS], vocab.ids[EOS]]] = -1e4
    spread = save_model_dir(tmp_path / "spread", cfg, {**params, "lm_head": lm}, head, extra_files=[model / "vocab.json"])
    assert main(["convert", "jax-to-hf", "--input", str(spread), "--output", str(tmp_path / "spread_hf")]) == 0
    assert main(["transcribe", "--model", str(spread), "--quiet", *map(str, clips)]) == 0
    ours = _lines(capsys)
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(tmp_path / "spread_hf"))
    texts = [pipe(load_audio(clip))["text"] for clip in clips]
    assert [ours[str(c)][0] for c in clips] == texts
    assert sum(bool(t.strip()) for t in texts) == len(clips)  # the comparison is not between empty strings


def test_language_id_finetune_evaluate_export_and_pipeline(pretrained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root, pre_model, data_dir = pretrained
    config = load_experiment("experiments/finetune_lid.py:smoke", [
        f"--config.model.init_from={pre_model}", f"--config.data.dir={data_dir}", "--config.train.steps=20",
        "--config.train.eval_every=20", "--config.train.checkpoint_every=20", "--config.optim.total_steps=20",
        "--config.optim.freeze_encoder_steps=4", *FAST])
    result = train_and_evaluate(config, root / "lid")
    final = result.eval_history[-1]
    languages = DatasetIndex.load(data_dir).languages
    assert final["num_utterances"] == 44 and 0 <= final["accuracy"] <= 1
    assert json.loads((root / "lid" / "labels.json").read_text()) == list(languages)

    model = tmp_path / "lid_model"
    assert main(["export", "--workdir", str(root / "lid"), "--output", str(model)]) == 0
    cfg, _, _ = load_model_dir(model)
    assert cfg.id2label == tuple(languages)
    assert main(["evaluate", "--model", str(model), "--data", str(data_dir), "--num-buckets", "1",
                 "--output", str(tmp_path / "eval.json"), "--quiet"]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metrics"]["accuracy"] == pytest.approx(final["accuracy"], abs=1e-9)
    capsys.readouterr()

    clips = _dev_clips(data_dir, tmp_path)
    assert main(["transcribe", "--model", str(model), "--quiet", *map(str, clips)]) == 0
    ours = _lines(capsys)
    assert main(["convert", "jax-to-hf", "--input", str(model), "--output", str(tmp_path / "hf")]) == 0
    pipe = transformers.pipeline("audio-classification", model=str(tmp_path / "hf"), top_k=len(languages))
    predictor = Predictor.load(model)
    worst = 0.0
    for clip in clips:
        scores = pipe(load_audio(clip))
        label, prob = ours[str(clip)]
        assert scores[0]["label"] == label, clip
        assert abs(scores[0]["score"] - float(prob)) < TOL
        probs = predictor.classify(load_audio(clip)).probs
        theirs = np.asarray([next(s["score"] for s in scores if s["label"] == lang) for lang in languages])
        worst = max(worst, float(np.max(np.abs(theirs - np.asarray(probs)))))
    assert worst < TOL, worst
