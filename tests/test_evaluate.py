"""`xlsr-jax evaluate`: the numbers equal a hand computation from `Predictor` over the same records."""

import csv
import json

import flax.linen as nn
import jax
import jiwer
import numpy as np
import pytest

from data_pipelines.corpus import manifest_path
from data_pipelines.sources import PreparedSource
from data_pipelines.vocab import SPECIAL_TOKENS, Vocabulary
from xlsr_jax.cli import main
from xlsr_jax.config import HF_ARCHITECTURES, ConfigError, get_preset
from xlsr_jax.inference import Predictor
from xlsr_jax.model_dir import ModelDirError, save_model_dir
from xlsr_jax.models.heads import abstract_params, init_params
from xlsr_jax.tasks import evaluation_task

# One padded length: one compiled program per evaluation (compiles dominate on CPU).
FAST = ["--num-buckets", "1", "--quiet"]


@pytest.fixture(scope="module")
def dev(data_dir):
    """(float waveforms, transcripts, language names) of every dev record, read straight from the shards."""
    source = PreparedSource(data_dir, "dev")
    records = source.read(range(len(source)))
    waves = [pcm.astype(np.float32) / 32768.0 for pcm, _ in records]
    return waves, [text for _, text in records], [source.languages[i] for i in source.language_ids]


@pytest.fixture(scope="module")
def ctc_model(tmp_path_factory):
    """(model directory, vocabulary) of a tiny random CTC model that spells words, with blanks between."""
    tmp = tmp_path_factory.mktemp("ctc")
    with open(manifest_path(), newline="") as f:
        vocab = Vocabulary.from_texts(row["text"] for row in csv.DictReader(f, delimiter="\t"))
    vocab_file = vocab.save(tmp / "vocab.json")
    config = get_preset("tiny", vocab_size=len(vocab), pad_token_id=0)
    params = init_params(config, "ctc", seed=0)
    # A freshly initialized lm_head spells one character on every frame. A wide one varies from frame
    # to frame; the bias makes about a third of the frames blanks and a sixth word delimiters, so the
    # hypotheses have words and blanks (WER and blank ratio depend on the decoding, not just CER).
    kernel = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = np.random.default_rng(0).normal(size=kernel.shape).astype(np.float32)
    bias = np.zeros(len(vocab), np.float32)
    bias[vocab.pad_id], bias[vocab.delimiter_id] = 14.0, 9.0
    params["lm_head"]["bias"] = bias
    return save_model_dir(tmp / "model", config, params, "ctc", extra_files=[vocab_file]), vocab


@pytest.fixture(scope="module")
def cls_model(tmp_path_factory, dev):
    """(model directory, labels, intended label per dev clip) of a language-ID model that orders the
    languages its own way (the data set lists them sorted, the model reversed, plus one the data set
    lacks) and is right about most dev clips by construction."""
    tmp = tmp_path_factory.mktemp("cls")
    waves, _, langs = dev
    labels = tuple(sorted(set(langs), reverse=True)) + ("xx",)
    intended = [labels[(labels.index(x) + 1) % len(labels)] if i % 5 == 0 else x for i, x in enumerate(langs)]
    # Read each clip's pooled projector features p through a probe whose classifier is the identity: the
    # Predictor returns log_softmax(p) = p - c. Then fit a classifier to the intended labels by least
    # squares on features centered over dimensions (which removes c) and over clips.
    rng = np.random.default_rng(1)
    encoder = init_params(get_preset("tiny"), "base", seed=0)["wav2vec2"]
    probe_config = get_preset("tiny", num_labels=get_preset("tiny").classifier_proj_size)
    width = probe_config.num_labels
    shapes = nn.meta.unbox(abstract_params(probe_config, "sequence_classification"))
    params = {"wav2vec2": encoder,
              "projector": jax.tree_util.tree_map(lambda a: rng.normal(size=a.shape).astype(np.float32),
                                                  shapes["projector"]),
              "classifier": {"kernel": np.eye(width, dtype=np.float32), "bias": np.zeros(width, np.float32)}}
    probe = save_model_dir(tmp / "probe", probe_config, params, "sequence_classification")
    features = np.stack(Predictor.load(probe).run(waves))  # [clips, width]
    features -= features.mean(1, keepdims=True)
    mean = features.mean(0)
    targets = 10.0 * np.eye(len(labels))[[labels.index(x) for x in intended]]
    # Centering over dimensions leaves a null direction (all ones) with a singular value at rounding level:
    # cut it (rcond), or its huge weights turn the two paths' last-bit differences into other predictions.
    weights = np.linalg.lstsq(features - mean, targets - targets.mean(0), rcond=1e-4)[0]  # [width, labels]
    params["classifier"] = {"kernel": (weights - weights.mean(0)).astype(np.float32),  # columns sum to 0
                            "bias": (targets.mean(0) - mean @ weights).astype(np.float32)}
    config = get_preset("tiny", num_labels=len(labels), id2label=labels)
    return save_model_dir(tmp / "model", config, params, "sequence_classification"), labels, intended


def run(argv, capsys):
    """(exit status, stdout lines, stderr) of one `xlsr-jax` command."""
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out.splitlines(), err


def table_value(lines, name):
    """The value printed after `name` at the start of a line of the overall table."""
    [line] = [x for x in lines if x.split() and x.split()[0] == name]
    return float(line.split()[1])


def language_rows(lines, languages):
    """{language: [values]} from the per-language table (after its `language` header, up to a blank line)."""
    start = next(i for i, x in enumerate(lines) if x.startswith("language"))
    stop = lines.index("", start)
    rows = {x.split()[0]: [float(v) for v in x.split()[1:]] for x in lines[start + 1 : stop]}
    assert set(rows) <= set(languages)
    return rows


@pytest.mark.slow
def test_ctc_scores_equal_predictor_transcripts_and_jiwer(ctc_model, data_dir, dev, tmp_path, capsys):
    ctc, vocab = ctc_model
    waves, texts, langs = dev
    out = tmp_path / "ctc.json"
    status, lines, _ = run(["evaluate", "--model", str(ctc), "--data", str(data_dir), "--output", str(out), *FAST],
                           capsys)
    assert status == 0 and lines[-1] == f"wrote {out}"

    predictor = Predictor.load(ctc)
    logits = predictor.run(waves)
    hyps = [predictor.decode(x) for x in logits]
    refs = [" ".join(t.split()) for t in texts]  # the vocabulary is lowercase, like the transcripts
    assert sum(len(h.split()) for h in hyps) > len(hyps)  # the hypotheses have words, not one run of letters
    blank_ratio = np.mean(np.concatenate([np.argmax(x, -1) == vocab.pad_id for x in logits]))
    assert 0.1 < blank_ratio < 0.9

    report = json.loads(out.read_text())
    m = report["metrics"]
    assert m["num_utterances"] == len(waves) == 44 and m["infeasible"] == 0
    assert m["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-9)
    assert m["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-9)
    assert m["blank_ratio"] == pytest.approx(blank_ratio, abs=1e-9)
    assert m["wer"] != 1.0  # more hypothesis words than reference words somewhere: WER measures the decoding
    for lang in sorted(set(langs)):
        rows = [i for i, x in enumerate(langs) if x == lang]
        assert report["per_language"][lang]["wer"] == pytest.approx(jiwer.wer([refs[i] for i in rows],
                                                                              [hyps[i] for i in rows]), abs=1e-9)
        assert report["per_language"][lang]["cer"] == pytest.approx(jiwer.cer([refs[i] for i in rows],
                                                                              [hyps[i] for i in rows]), abs=1e-9)
    # Examples pair a record's reference with that record's hypothesis.
    assert report["examples"] and all(hyps[refs.index(e["reference"])] == e["hypothesis"]
                                      for e in report["examples"])

    # The printed table shows the file's numbers (to 4 decimals), first the WER the best checkpoint is chosen by.
    assert lines[2].split()[0] == "wer"
    for name, key in (("wer", "wer"), ("cer", "cer"), ("blank_ratio", "blank_ratio"), ("loss", "loss"),
                      ("num_utterances", "num_utterances")):
        assert table_value(lines, name) == pytest.approx(m[key], abs=5.01e-5)
    printed = language_rows(lines, report["per_language"])
    assert len(printed) == 11
    for lang, (wer, cer) in printed.items():
        assert (wer, cer) == pytest.approx((report["per_language"][lang]["wer"],
                                            report["per_language"][lang]["cer"]), abs=5.01e-5)


@pytest.mark.slow
def test_language_id_maps_labels_by_name(cls_model, data_dir, dev, capsys):
    cls, labels, intended = cls_model
    waves, _, langs = dev
    status, lines, _ = run(["evaluate", "--model", str(cls), "--data", str(data_dir), "--batch-size", "16", *FAST],
                           capsys)
    out = cls / f"eval_{data_dir.name}_dev.json"  # the default output
    assert status == 0 and lines[-1] == f"wrote {out}"
    report = json.loads(out.read_text())

    predictor = Predictor.load(cls)
    log_probs = predictor.run(waves)
    predicted = [predictor.to_classification(x).label for x in log_probs]
    assert predicted == intended  # the fitted classifier says what it was fitted to: a meaningful score
    confusion = np.zeros((len(labels), len(labels)), int)
    for true, pred in zip(langs, predicted):
        confusion[labels.index(true), labels.index(pred)] += 1
    accuracy = np.mean([t == p for t, p in zip(langs, predicted)])
    assert accuracy == pytest.approx(35 / 44)  # every fifth clip is given the next label
    assert report["confusion"] == {"labels": list(labels), "matrix": confusion.tolist()}
    assert report["metrics"]["accuracy"] == pytest.approx(accuracy, abs=1e-9)
    # Its padded batches compute what the Predictor computes clip by clip: the same loss.
    nll = [np.logaddexp.reduce(x) - x[labels.index(lang)] for x, lang in zip(log_probs, langs)]
    assert report["metrics"]["loss"] == pytest.approx(np.mean(nll), abs=1e-5)
    assert report["metrics"]["num_utterances"] == 44
    for lang in set(langs):
        assert report["per_language"][lang]["accuracy"] == pytest.approx(
            np.mean([p == lang for t, p in zip(langs, predicted) if t == lang]), abs=1e-9)
    assert "xx" not in report["per_language"]  # a label without utterances has no accuracy
    # Matching labels by position instead of by name would score these records almost all wrong.
    data_languages = sorted(set(langs))
    assert np.mean([data_languages.index(t) == labels.index(p) for t, p in zip(langs, predicted)]) < 0.2

    assert table_value(lines, "accuracy") == pytest.approx(accuracy, abs=5.01e-5)
    assert lines[2].split()[0] == "accuracy"
    assert table_value(lines, "loss") == pytest.approx(report["metrics"]["loss"], abs=5.01e-5)
    for lang, (acc,) in language_rows(lines, data_languages).items():
        assert acc == pytest.approx(report["per_language"][lang]["accuracy"], abs=5.01e-5)
    # The printed confusion matrix: the labels that occur, counts as in the file.
    head = lines.index("confusion (rows: true, columns: predicted):")
    used = [i for i in range(len(labels)) if confusion[i].sum() + confusion[:, i].sum()]
    assert lines[head + 1].split()[1:] == [labels[i] for i in used]
    for row, i in zip(lines[head + 2 :], used):
        assert row.split() == [labels[i], *(str(confusion[i, j]) for j in used)]


def test_languages_the_model_does_not_know_are_named(data_dir, dev, tmp_path):
    known = tuple(x for x in sorted(set(dev[2])) if x not in ("sv", "pl"))
    config = get_preset("tiny", num_labels=len(known), id2label=known)
    with pytest.raises(ConfigError, match=r"split 'dev' of .* has language\(s\) \['pl', 'sv'\] the model does not "
                                          "know"):
        evaluation_task("sequence_classification", config, tmp_path, data_dir, "dev")
    with pytest.raises(ConfigError, match="no id2label"):
        evaluation_task("sequence_classification", get_preset("tiny", num_labels=2), tmp_path, data_dir, "dev")


def test_lowercase_auto_follows_the_vocabulary(ctc_model, data_dir, tmp_path):
    ctc, vocab = ctc_model
    config = get_preset("tiny", vocab_size=len(vocab))
    assert evaluation_task("ctc", config, ctc, data_dir, "dev").eval_targets.lowercase  # no capitals to spell
    assert not evaluation_task("ctc", config, ctc, data_dir, "dev", lowercase=False).eval_targets.lowercase
    cased = Vocabulary([*SPECIAL_TOKENS, "A", "b"])
    cased.save(tmp_path / "vocab.json")
    cased_config = get_preset("tiny", vocab_size=len(cased))
    assert not evaluation_task("ctc", cased_config, tmp_path, data_dir, "dev").eval_targets.lowercase
    with pytest.raises(ModelDirError, match="has 7 tokens, the model vocab_size=32"):
        evaluation_task("ctc", get_preset("tiny", vocab_size=32), tmp_path, data_dir, "dev")


def test_bad_inputs_are_one_line_errors(ctc_model, data_dir, tmp_path, capsys):
    ctc, _ = ctc_model
    config = get_preset("tiny")
    (tmp_path / "pretraining").mkdir()
    config.save(tmp_path / "pretraining" / "config.json", head="pretraining",
                architectures=[HF_ARCHITECTURES["pretraining"]])
    (tmp_path / "novocab").mkdir()
    config.save(tmp_path / "novocab" / "config.json", head="ctc", architectures=[HF_ARCHITECTURES["ctc"]])
    cases = [
        (["--model", str(ctc), "--data", str(tmp_path / "missing")], f"data directory {tmp_path / 'missing'} does "
                                                                        "not exist"),
        (["--model", str(ctc), "--data", str(tmp_path)], "is not a prepared data set: no dataset.json"),
        (["--model", str(ctc), "--data", str(data_dir), "--split", "test"],
         f"{data_dir} has no split 'test'; its splits are ['dev', 'train']"),
        (["--model", str(tmp_path / "pretraining"), "--data", str(data_dir)],
         "has a 'pretraining' head, which makes no predictions to score"),
        (["--model", str(tmp_path / "novocab"), "--data", str(data_dir)], "CTC model directory without vocab.json"),
        (["--model", str(tmp_path), "--data", str(data_dir)], "not an xlsr-jax model directory"),
        (["--model", str(ctc), "--data", str(data_dir), "--batch-size", "12"],
         f"batch size 12 does not split over {jax.local_device_count()} device(s)"),
    ]
    for args, message in cases:
        status, lines, err = run(["evaluate", *args, "--quiet"], capsys)
        assert status == 2 and not lines
        assert err.count("\n") == 1 and err.startswith("xlsr-jax evaluate: error: ") and message in err, err
