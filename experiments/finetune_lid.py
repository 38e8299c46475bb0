"""Language ID: fine-tune a pretrained XLS-R encoder with an utterance classification head.

    xlsr-jax train --config experiments/finetune_lid.py:xlsr_300m --workdir runs/lid \\
        --config.model.init_from=MODEL_DIR --config.data.dir=/data/prepared_with_languages

The labels are the prepared data set's languages (dataset.json), kept in WORKDIR/labels.json and
exported as the model's `id2label`. The head mean-pools the projected frames over real frames
(padding excluded) and classifies; `--config.model.overrides.use_weighted_layer_sum=True` pools a
learned softmax-weighted sum of every layer's output instead of the last layer (as in SUPERB).
Evaluation reports accuracy (overall and per language) and the confusion matrix; the best
checkpoint is kept by accuracy.

The XLS-R paper fine-tunes LID on VoxLingua107 without publishing every hyperparameter; these
follow its CTC recipe (tri-stage schedule, frozen conv encoder, the encoder frozen for the first
10 % of updates, SpecAugment) with a shorter run and milder masking, since a whole utterance has
one label. Presets: xlsr_300m, xlsr_1b, xlsr_2b and `smoke` (random tiny encoder, embedded corpus).
"""

import ml_collections

from xlsr_jax.train.defaults import mesh_section, sharding_section, train_section


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "xlsr_300m"
    smoke = preset == "smoke"
    c = ml_collections.ConfigDict()
    c.head = "sequence_classification"
    c.model = ml_collections.ConfigDict()
    c.model.preset = "tiny" if smoke else preset
    c.model.init_from = ""  # a pretrained model directory (xlsr-jax export / convert); "" = random init
    c.model.overrides = ml_collections.ConfigDict({
        "dtype": "bfloat16", "remat_policy": "dots", "scan_layers": True,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.1, "feat_proj_dropout": 0.0,
        "final_dropout": 0.0, "layerdrop": 0.1, "feature_grad_mult": 0.0,
        "apply_spec_augment": True, "mask_time_prob": 0.3, "mask_time_length": 10, "mask_time_min_masks": 2,
        "mask_feature_prob": 0.1, "mask_feature_length": 64, "mask_feature_min_masks": 0,
        "use_weighted_layer_sum": False, "classifier_proj_size": 256,
    })

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""
    c.data.train_split = "train"
    c.data.eval_split = "dev"
    c.data.global_batch_size = 64
    # Audio-budget batches (fairseq's max_tokens): padded samples per batch shard (data x fsdp device)
    # per micro-batch; a bucket's global batch is then the most rows that fit. 0: global_batch_size rows.
    c.data.max_tokens = 0
    c.data.max_sample_size = 160_000  # 10 s random crops: any part of an utterance has its language
    c.data.min_sample_size = 16_000
    c.data.num_buckets = 4
    c.data.normalize = True
    c.data.language_alpha = None  # a float samples languages by (records / total) ** alpha: rebalances labels
    c.data.worker_count = 4
    c.data.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "tri_stage"
    c.optim.peak_lr = 5e-5
    c.optim.total_steps = 10_000
    c.optim.warmup_steps = 0  # tri_stage uses phase_ratio
    c.optim.phase_ratio = (0.1, 0.4, 0.5)
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-8
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 0.0
    c.optim.freeze_feature_encoder = True
    c.optim.freeze_encoder_steps = 1_000  # only the head trains first

    c.objective = ml_collections.ConfigDict()

    c.train = train_section(steps=10_000, eval_every=1_000, checkpoint_every=1_000)
    c.train.eval_batches = 0  # the whole eval split

    c.mesh_preset = "gpu-1x8"
    c.mesh = mesh_section()
    c.sharding = sharding_section()
    if smoke:
        c.model.overrides.update({"dtype": "float32", "remat_policy": "none", "layerdrop": 0.0,
                                  "mask_time_length": 5, "mask_feature_length": 4, "feature_grad_mult": 1.0,
                                  "classifier_proj_size": 32})
        c.data.dir = "embedded"
        c.data.global_batch_size = 8
        c.data.max_sample_size = 48_000
        c.data.min_sample_size = 8_000
        c.data.num_buckets = 1
        c.data.worker_count = 0
        c.optim.peak_lr = 2e-3
        c.optim.total_steps = 30
        c.optim.freeze_feature_encoder = False
        c.optim.freeze_encoder_steps = 5
        c.train.steps = 30
        c.train.log_every = 5
        c.train.eval_every = 15
        c.train.checkpoint_every = 15
        c.mesh_preset = "cpu"
    return c
