"""Self-supervised wav2vec 2.0 / XLS-R pretraining, as published (the recipe table with every
value's source is experiments/README.md; tests/test_recipes.py checks these presets against it).

    xlsr-jax train --config experiments/pretrain_xlsr.py:xlsr_300m --workdir runs/300m \\
        --config.data.dir=/data/prepared --config.mesh_preset=v5p-128 --config.train.accum_steps=2

Presets: base (wav2vec 2.0 BASE, LibriSpeech), large (wav2vec 2.0 LARGE, LV-60), xlsr_300m,
xlsr_1b, xlsr_2b (architectures from xlsr_jax.config.PRESETS), and `smoke` (a tiny model on the
embedded corpus, a few CPU steps: what CI runs).

Batches are an audio budget, fairseq's `max_tokens`: `data.max_tokens` padded samples per batch
shard (data x fsdp device) per micro-batch. The recipes' update is max_tokens x their GPU count
(64 for base, 128 for large and XLS-R); the presets reach it on their default 8-device mesh with
`train.accum_steps`. On another mesh, keep data x fsdp x accum_steps at that GPU count to keep
the recipe's audio per update (e.g. v5p-128, 64 chips of fsdp: accum_steps=2).
"""

import ml_collections

from xlsr_jax.train.defaults import mesh_section, sharding_section, train_section

PRESETS = ("base", "large", "xlsr_300m", "xlsr_1b", "xlsr_2b", "smoke")
# The GPUs each recipe's update was computed on (fairseq distributed_world_size).
RECIPE_GPUS = {"base": 64, "large": 128, "xlsr_300m": 128, "xlsr_1b": 128, "xlsr_2b": 128}
DEFAULT_MESH_SHARDS = 8  # gpu-1x8: fsdp over 8 devices


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "xlsr_300m"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} of experiments/pretrain_xlsr.py; choose one of {PRESETS}")
    base = preset == "base"
    c = ml_collections.ConfigDict()
    c.head = "pretraining"
    c.model = ml_collections.ConfigDict()
    c.model.preset = preset if preset != "smoke" else "tiny"
    # Architecture is the preset's; these are numerics and the recipe's regularization. fairseq's
    # dropout / attention_dropout / dropout_input / dropout_features / encoder_layerdrop are Hugging
    # Face's hidden_dropout / attention_dropout / feat_proj_dropout / feat_quantizer_dropout / layerdrop.
    c.model.overrides = ml_collections.ConfigDict({
        "dtype": "bfloat16", "remat_policy": "dots", "scan_layers": True,
        "hidden_dropout": 0.1 if base else 0.0, "attention_dropout": 0.1 if base else 0.0,
        "activation_dropout": 0.0, "feat_proj_dropout": 0.1 if base else 0.0,
        "feat_quantizer_dropout": 0.1 if base else 0.0, "layerdrop": 0.05 if base else 0.0,
        "mask_time_prob": 0.65, "mask_time_length": 10, "mask_time_min_masks": 2, "num_negatives": 100,
        "feature_grad_mult": 0.1 if base else 1.0, "diversity_loss_weight": 0.1,
    })

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # a directory made by `xlsr-jax prepare`
    c.data.train_split = "train"
    c.data.eval_split = "dev"
    # Audio-budget batches (fairseq's max_tokens): padded samples per batch shard (data x fsdp device)
    # per micro-batch; a bucket's global batch is then the most rows that fit. 0: global_batch_size rows.
    c.data.max_tokens = 1_400_000 if base else 1_200_000
    c.data.global_batch_size = 256  # evaluation batches (and training batches when max_tokens is 0)
    c.data.max_sample_size = 250_000 if base else 320_000  # 15.6 s / 20 s crops
    c.data.min_sample_size = 32_000  # 2 s
    c.data.num_buckets = 4 if base else 3
    # Group norm (base) normalizes the first conv over time, padding included: crop every batch to its
    # bucket instead (fairseq pads nothing in pretraining; its TPU configs pad to 3 buckets, as we do
    # for the layer-norm models).
    c.data.crop_to_bucket = base
    c.data.normalize = not base
    c.data.mask_prob = 0.65
    # XLS-R samples languages by hours with alpha 0.5; the monolingual recipes sample utterances uniformly.
    c.data.language_alpha = None if preset in ("base", "large") else 0.5
    c.data.language_sampling = "hours"
    c.data.worker_count = 4
    c.data.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "polynomial"
    c.optim.peak_lr = {"base": 5e-4, "xlsr_1b": 1e-3, "xlsr_2b": 1e-3}.get(preset, 5e-3)
    c.optim.warmup_steps = 32_000
    c.optim.total_steps = 400_000 if base else 1_000_000
    c.optim.end_lr = 0.0
    c.optim.power = 1.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.01
    c.optim.decay_all_params = True  # fairseq's Adam decays biases and norm scales too
    c.optim.clip_norm = 0.0  # fairseq's default: no clipping

    c.objective = ml_collections.ConfigDict()
    c.objective.gumbel_start = 2.0
    c.objective.gumbel_floor = 0.5 if base else 0.1
    c.objective.gumbel_decay = 0.999995
    c.objective.feature_penalty_weight = 10.0 if base else 0.0
    c.objective.perplexity_groups = -1  # one codebook perplexity per batch shard, as fairseq's per GPU

    c.train = train_section(steps=c.optim.total_steps, eval_every=10_000, checkpoint_every=2_000)
    if preset in RECIPE_GPUS:
        c.train.accum_steps = RECIPE_GPUS[preset] // DEFAULT_MESH_SHARDS

    # A named preset from xlsr_jax.parallel.mesh.MESH_PRESETS (v4-8 ... v6e-256, 2-slice, gpu-1x8,
    # gpu-4x8, cpu), or "" to use `mesh` below; -1 fills from the device count.
    c.mesh_preset = "gpu-1x8"
    c.mesh = mesh_section()
    c.sharding = sharding_section()  # logical axis rules (parallel/rules.py defaults)

    if preset == "smoke":
        c.model.overrides.update({"dtype": "float32", "remat_policy": "none", "num_negatives": 20,
                                  "mask_time_length": 5})
        c.data.max_tokens = 0
        c.data.language_sampling = "records"  # the embedded corpus' clips are alike in length
        c.data.global_batch_size = 8
        c.data.max_sample_size = 48_000
        c.data.min_sample_size = 8_000
        c.data.num_buckets = 2
        c.data.worker_count = 0
        c.optim.peak_lr = 1e-3
        c.optim.warmup_steps = 5
        c.optim.total_steps = 20
        c.optim.clip_norm = 10.0
        c.optim.decay_all_params = False
        c.objective.gumbel_floor = 0.5
        c.objective.perplexity_groups = 1  # one batch-wide perplexity: the loss is the same on every mesh
        c.train.steps = 20
        c.train.log_every = 5
        c.train.eval_every = 10
        c.train.eval_batches = 2
        c.train.checkpoint_every = 10
        c.data.dir = "embedded"  # the bundled corpus, prepared into WORKDIR/data on first use
        c.mesh_preset = "cpu"
    return c
