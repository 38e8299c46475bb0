"""Self-supervised XLS-R pretraining (fairseq `wav2vec2_large_librivox` recipe, pre-LN).

    xlsr-jax train --config experiments/pretrain_xlsr.py:xlsr_300m --workdir runs/300m \\
        --config.data.dir=/data/prepared --config.mesh_preset=v5p-128

Presets: xlsr_300m, xlsr_1b, xlsr_2b (architecture from xlsr_jax.config.PRESETS), and `smoke`
(a tiny model on the embedded corpus, a few CPU steps: what CI runs).
"""

import ml_collections

from xlsr_jax.train.defaults import mesh_section, sharding_section, train_section


def get_config(preset: str | None = None) -> ml_collections.ConfigDict:
    preset = preset or "xlsr_300m"
    c = ml_collections.ConfigDict()
    c.head = "pretraining"
    c.model = ml_collections.ConfigDict()
    c.model.preset = preset if preset != "smoke" else "tiny"
    # Architecture is the preset's; these are numerics and regularization for pretraining.
    c.model.overrides = ml_collections.ConfigDict({
        "dtype": "bfloat16", "remat_policy": "dots", "scan_layers": True,
        "hidden_dropout": 0.1, "attention_dropout": 0.1, "activation_dropout": 0.0, "feat_proj_dropout": 0.1,
        "feat_quantizer_dropout": 0.0, "layerdrop": 0.0, "mask_time_prob": 0.65, "mask_time_length": 10,
        "mask_time_min_masks": 2, "num_negatives": 100, "feature_grad_mult": 1.0, "diversity_loss_weight": 0.1,
    })

    c.data = ml_collections.ConfigDict()
    c.data.dir = ""  # a directory made by `xlsr-jax prepare`
    c.data.train_split = "train"
    c.data.eval_split = "dev"
    c.data.global_batch_size = 256
    # Audio-budget batches (fairseq's max_tokens): padded samples per batch shard (data x fsdp device)
    # per micro-batch; a bucket's global batch is then the most rows that fit. 0: global_batch_size rows.
    c.data.max_tokens = 0
    c.data.max_sample_size = 320_000  # 20 s crops
    c.data.min_sample_size = 32_000  # 2 s
    c.data.num_buckets = 3
    c.data.normalize = True  # XLS-R: fairseq normalize=True
    c.data.mask_prob = 0.65
    c.data.language_alpha = 0.5  # XLS-R language sampling; None for uniform over utterances
    c.data.worker_count = 4
    c.data.seed = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.schedule = "polynomial"
    c.optim.peak_lr = 5e-3 if preset in ("xlsr_300m", "large") else 1e-3  # 1B/2B: lower peak (unverified)
    c.optim.warmup_steps = 32_000
    c.optim.total_steps = 1_000_000
    c.optim.end_lr = 0.0
    c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.98, 1e-6
    c.optim.weight_decay = 0.01
    c.optim.clip_norm = 10.0

    c.objective = ml_collections.ConfigDict()
    c.objective.gumbel_start = 2.0
    c.objective.gumbel_floor = 0.1  # large / XLS-R (0.5 for base)
    c.objective.gumbel_decay = 0.999995
    c.objective.feature_penalty_weight = 0.0  # 10 for base

    c.train = train_section(steps=1_000_000, eval_every=10_000, checkpoint_every=2_000)

    # A named preset from xlsr_jax.parallel.mesh.MESH_PRESETS (v4-8 ... v6e-256, 2-slice, gpu-1x8,
    # gpu-4x8, cpu), or "" to use `mesh` below; -1 fills from the device count.
    c.mesh_preset = "gpu-1x8"
    c.mesh = mesh_section()
    c.sharding = sharding_section()  # logical axis rules (parallel/rules.py defaults)

    if preset == "smoke":
        c.model.overrides.update({"dtype": "float32", "remat_policy": "none", "num_negatives": 20,
                                  "mask_time_length": 5, "hidden_dropout": 0.0, "attention_dropout": 0.0,
                                  "feat_proj_dropout": 0.0})
        c.data.global_batch_size = 8
        c.data.max_sample_size = 48_000
        c.data.min_sample_size = 8_000
        c.data.num_buckets = 2
        c.data.worker_count = 0
        c.optim.peak_lr = 1e-3
        c.optim.warmup_steps = 5
        c.optim.total_steps = 20
        c.objective.gumbel_floor = 0.5
        c.train.steps = 20
        c.train.log_every = 5
        c.train.eval_every = 10
        c.train.eval_batches = 2
        c.train.checkpoint_every = 10
        c.data.dir = "embedded"  # the bundled corpus, prepared into WORKDIR/data on first use
        c.mesh_preset = "cpu"
    return c
