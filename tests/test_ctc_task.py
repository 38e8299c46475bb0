"""CTC fine-tuning pieces: the feasibility rule, the frozen phase, SpecAugment channel masks, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from data_pipelines import synthetic
from data_pipelines.batching import EvalPlan
from data_pipelines.pipeline import PipelineConfig, eval_dataset
from data_pipelines.sources import PreparedSource
from data_pipelines.vocab import Vocabulary
from xlsr_jax.config import get_preset
from xlsr_jax.models.heads import build_model
from xlsr_jax.objectives.ctc import CtcObjective, ctc_feasible, per_utterance_loss
from xlsr_jax.parallel.mesh import build_mesh
from xlsr_jax.parallel.rules import logical_sharding
from xlsr_jax.tasks import ctc as ctc_task
from xlsr_jax.train.optim import make_optimizer
from xlsr_jax.train.state import create_train_state
from xlsr_jax.train.step import jit_train_step, make_train_step

VOCAB = Vocabulary.from_texts(["abc de"])
CONFIG = get_preset("tiny", hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0,
                    final_dropout=0.0, mask_time_prob=0.0, vocab_size=len(VOCAB), pad_token_id=0)


def test_repeated_labels_need_a_blank_between_them():
    a, b = VOCAB.ids["a"], VOCAB.ids["b"]
    labels = jnp.asarray([[a, a, b, -100], [a, b, a, -100], [a, a, a, a]])
    # "aab" needs a, blank, a, b = 4 frames; "aba" needs 3; "aaaa" needs 7.
    np.testing.assert_array_equal(ctc_feasible(labels, jnp.asarray([3, 3, 6])), [False, True, False])
    np.testing.assert_array_equal(ctc_feasible(labels, jnp.asarray([4, 3, 7])), [True, True, True])

    # The loss of an infeasible row is zeroed (optax gives it a huge finite value); the others are optax's.
    logits = jax.random.normal(jax.random.key(0), (3, 3, len(VOCAB)))
    frames = jnp.ones((3, 3), bool)
    per_utt, feasible = per_utterance_loss(logits, frames, labels[:, :3].at[2].set(-100).at[2, 0].set(a))
    reference = optax.ctc_loss(logits, jnp.zeros((3, 3)), jnp.maximum(labels[:, :3], 0),
                               (labels[:, :3] < 0).astype(jnp.float32))
    assert not feasible[0] and feasible[1] and per_utt[0] == 0.0 and reference[0] > 1e4
    np.testing.assert_allclose(per_utt[1], reference[1], rtol=1e-6)


def _ctc_batch(b=4, n=8000, seed=0):
    rng = np.random.default_rng(seed)
    mask = np.ones((b, n), np.int32)
    mask[1, n - 1600:] = 0
    labels = np.full((b, 6), -100, np.int32)
    for r in range(b):
        labels[r, : 2 + r] = rng.integers(4, len(VOCAB), 2 + r)
    return {"input_values": (rng.standard_normal((b, n)) * mask).astype(np.float32), "attention_mask": mask,
            "labels": labels}


def test_sentence_avg_divides_by_feasible_utterances():
    model = build_model(CONFIG, "ctc")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8000)))["params"]
    batch = _ctc_batch()
    per_token = CtcObjective()(model, params, batch, 0, None, deterministic=True)
    per_utt = CtcObjective(sentence_avg=True)(model, params, batch, 0, None, deterministic=True)
    assert per_token[1] == (batch["labels"] >= 0).sum() and per_utt[1] == 4.0
    np.testing.assert_allclose(per_token[0], per_utt[0], rtol=1e-6)


def _count_primitive(jaxpr, name):
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else ():
            count += _count_primitive(sub, name)
        for param in eqn.params.values():
            for j in param if isinstance(param, (tuple, list)) else (param,):
                if isinstance(j, jax.extend.core.ClosedJaxpr):
                    count += _count_primitive(j.jaxpr, name)
                elif isinstance(j, jax.extend.core.Jaxpr):
                    count += _count_primitive(j, name)
    return count


OPTIM = dict(schedule="polynomial", peak_lr=1e-2, warmup_steps=0, total_steps=20, weight_decay=0.0,
             freeze_encoder_steps=2)


def test_frozen_phase_computes_no_encoder_gradient_and_starts_fresh_moments(cpu_devices):
    mesh = build_mesh({"ici": {"data": 1}}, cpu_devices[:1])
    model = build_model(CONFIG, "ctc")
    optimizer, schedule = make_optimizer(OPTIM)
    state, shardings = create_train_state(model, optimizer, mesh, seed=0)
    step = make_train_step(model, optimizer, schedule, CtcObjective(), mesh=mesh, param_shardings=shardings.params,
                           frozen_subtree="wav2vec2", frozen_until=OPTIM["freeze_encoder_steps"])
    batch = _ctc_batch()

    # Two programs, no run-time branch: the frozen one holds only the encoder's forward convolutions.
    def convs(frozen):
        jaxpr = jax.make_jaxpr(lambda s, b: step(s, b, frozen=frozen))(state, batch).jaxpr
        branched = [e for e in jaxpr.eqns if e.primitive.name == "cond"
                    and any(_count_primitive(b.jaxpr, "conv_general_dilated") for b in e.params["branches"])]
        assert not branched, "the model runs inside a run-time branch"
        return _count_primitive(jaxpr, "conv_general_dilated")

    forward = _count_primitive(jax.make_jaxpr(lambda p: model.apply(
        {"params": p}, batch["input_values"], batch["attention_mask"]))(state.params).jaxpr, "conv_general_dilated")
    assert convs(True) == forward and convs(False) >= 2 * forward, (convs(True), convs(False))

    jstep = jit_train_step(step, shardings, logical_sharding(("batch",), mesh))
    encoder0 = jax.device_get(state.params["wav2vec2"])
    head0 = jax.device_get(state.params["lm_head"])
    for _ in range(2):
        state, metrics = jstep(state, batch, True)  # frozen
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state.params["wav2vec2"]), encoder0)
    assert not np.allclose(jax.device_get(state.params["lm_head"]["kernel"]), head0["kernel"])
    encoder_adam = state.opt_state[0].inner_states["encoder"].inner_state.inner_state[0]
    assert int(encoder_adam.count) == 0 and float(optax.tree.norm(encoder_adam.mu)) == 0.0

    state, _ = jstep(state, batch, False)  # step 2: the encoder trains, its AdamW state starts now
    encoder_adam = state.opt_state[0].inner_states["encoder"].inner_state.inner_state[0]
    head_adam = state.opt_state[0].inner_states["trainable"].inner_state[0]
    assert int(encoder_adam.count) == 1 and int(head_adam.count) == 3
    assert float(optax.tree.norm(encoder_adam.mu)) > 0
    moved = jax.tree_util.tree_map(lambda a, b: not np.array_equal(a, b),
                                   jax.device_get(state.params["wav2vec2"]["encoder"]), encoder0["encoder"])
    assert any(jax.tree_util.tree_leaves(moved))
    # Fresh bias correction: the first update of an Adam state is lr * sign(g) (|m_hat / sqrt(v_hat)| = 1).
    assert float(metrics["learning_rate"]) > 0


def test_channel_masks_come_from_the_pipeline_and_change_the_output():
    cfg = CONFIG.replace(mask_time_prob=0.2, mask_time_length=2, mask_feature_prob=0.3, mask_feature_length=4)
    targets = ctc_task.CtcTargets(VOCAB, model=cfg, seed=0)
    raw = {"input_values": np.zeros((4, 16000), np.float32), "attention_mask": np.ones((4, 16000), np.int32),
           "lengths": np.full(4, 16000), "texts": ["abc"] * 4, "language_id": np.zeros(4, np.int32),
           "positions": np.arange(4)}
    out = targets(raw, np.random.default_rng(0))
    channels = out["mask_feature_indices"]
    assert channels.shape == (4, cfg.hidden_size) and channels.dtype == bool
    assert 0 < channels.mean() < 1 and not (channels == channels[0]).all()  # per row, not one mask for all
    assert out["mask_time_indices"].shape == (4, cfg.num_frames(16000))
    assert set(ctc_task.batch_axes(cfg, train=True)) >= {"mask_feature_indices", "mask_time_indices"}

    # The objective passes them to the model: masking every channel changes the loss.
    model = build_model(cfg, "ctc")
    params = model.init(jax.random.key(0), jnp.zeros((1, 8000)))["params"]
    batch = _ctc_batch()
    rng = jax.random.key(1)
    plain = CtcObjective()(model, params, batch, 0, rng)[0]
    masked = CtcObjective()(model, params, {**batch, "mask_feature_indices": np.ones((4, cfg.hidden_size), bool)},
                            0, rng)[0]
    assert abs(float(plain) - float(masked)) > 1e-3


def test_evaluator_scores_wer_cer_per_language_and_blank_ratio():
    vocab = Vocabulary.from_texts(["hello world", "hallo welt"])
    evaluator = ctc_task.CtcEvaluator(vocab, ["en", "de"])
    refs = ["hello world", "hallo welt", "hello"]
    hyps = ["hello word", "", "hello"]

    def frames_of(text):  # a per-frame id sequence that decodes to `text` (blank between letters)
        ids = [0]
        for ch in text:
            ids += [vocab.ids["|" if ch == " " else ch], 0]
        return ids

    rows = [frames_of(h) for h in hyps]
    width = max(map(len, rows)) + 2
    ids = np.zeros((4, width), np.int32)  # a 4th row pads the batch (valid=False)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = row
    outputs = {"ids": ids, "frames": np.asarray([len(r) for r in rows] + [width]),
               "loss": np.asarray([1.0, 2.0, 3.0, 100.0]), "feasible": np.asarray([True, True, False, True]),
               "tokens": np.asarray([11, 10, 5, 1])}
    batch = {"texts": refs + ["hello"], "language_id": np.asarray([0, 1, 0, 0]),
             "valid": np.asarray([True, True, True, False])}
    evaluator.add(batch, outputs)
    m = evaluator.result(evaluator.counts())
    import jiwer

    assert m["wer"] == pytest.approx((1 + 2 + 0) / 5) and m["wer/de"] == 1.0 and m["wer/en"] == pytest.approx(1 / 3)
    assert m["cer"] == pytest.approx((jiwer.process_characters(refs[0], hyps[0]).substitutions
                                      + jiwer.process_characters(refs[0], hyps[0]).deletions + 10 + 0) / 26)
    assert m["loss"] == pytest.approx(3.0 / 21) and m["infeasible"] == 1 and m["num_utterances"] == 3
    blank = sum(int(np.sum(ids[r, : len(rows[r])] == 0)) for r in range(3)) / sum(map(len, rows))
    assert m["blank_ratio"] == pytest.approx(blank)

    all_blank = ctc_task.CtcEvaluator(vocab, ["en", "de"])
    all_blank.add(batch, {**outputs, "ids": np.zeros_like(ids)})
    m = all_blank.result(all_blank.counts())
    assert m["cer"] == 1.0 and m["wer"] == 1.0 and m["blank_ratio"] == 1.0


def test_eval_dataset_reads_every_record_once_on_every_host(tmp_path):
    utts = synthetic.synthetic_utterances(11, (0.2, 0.9))
    synthetic.write_prepared_dir(tmp_path, {"dev": utts})
    source = PreparedSource(tmp_path, "dev")
    config = PipelineConfig(batch_size=2, num_buckets=2, read_threads=0, max_sample_size=1000, min_sample_size=10**5)
    seen, shapes = [], set()
    hosts = [list(eval_dataset(source, config, ctc_task.CtcTargets(VOCAB), shard_index=h, shard_count=2))
             for h in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == -(-11 // 4)
    for b0, b1 in zip(*hosts):
        for b in (b0, b1):
            shapes.add(b["input_values"].shape[1])
            for row in np.flatnonzero(b["valid"]):
                seen.append(int(b["lengths"][row]))
                assert b["attention_mask"][row].sum() == b["lengths"][row]  # never cropped (max_sample_size ignored)
    assert sorted(seen) == sorted(source.lengths.tolist()) and len(shapes) <= 2
    plan = EvalPlan(source.lengths, np.asarray([10**6]), 4)
    assert plan.valid(2).tolist() == [True, True, True, False]
