"""Model configuration: one dataclass whose field names follow `transformers.Wav2Vec2Config`.

A Hugging Face `config.json` maps onto `Wav2Vec2Config` field by field; the fields after the
"xlsr-jax only" marker are ours (compute dtype, layer scan, rematerialization) and are dropped
when exporting to Hugging Face.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

from data_pipelines.errors import UserError

# The conv feature encoder shared by every wav2vec 2.0 / XLS-R size: 320x downsampling.
_CONV_DIM = (512,) * 7
_CONV_KERNEL = (10, 3, 3, 3, 3, 2, 2)
_CONV_STRIDE = (5, 2, 2, 2, 2, 2, 2)

HEADS = ("base", "ctc", "sequence_classification", "pretraining")
HF_ARCHITECTURES = {
    "base": "Wav2Vec2Model",
    "ctc": "Wav2Vec2ForCTC",
    "sequence_classification": "Wav2Vec2ForSequenceClassification",
    "pretraining": "Wav2Vec2ForPreTraining",
}
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# Self-attention kernels: "xla" materializes the [T, T] scores (any backend, attention dropout);
# "cudnn" is cuDNN's fused flash attention (NVIDIA GPUs, bfloat16, head_dim <= 128 and a multiple of 8,
# no attention dropout); "splash" is the Pallas splash (flash) attention kernel for TPUs (no attention
# dropout; off a TPU it runs in Pallas' interpreter, for tests); "auto" takes cudnn on a GPU and splash
# on a TPU where they apply, and xla elsewhere.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "splash")
DTYPES = ("float32", "bfloat16")


class ConfigError(UserError):
    """A configuration value that cannot work, with a message saying which and why."""


@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
    """Architecture and numerics of a wav2vec 2.0 / XLS-R model (Hugging Face field names)."""

    vocab_size: int = 32
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    activation_dropout: float = 0.1
    attention_dropout: float = 0.1
    feat_proj_dropout: float = 0.0
    feat_quantizer_dropout: float = 0.0
    final_dropout: float = 0.1
    layerdrop: float = 0.1
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-5
    feat_extract_norm: str = "group"
    feat_extract_activation: str = "gelu"
    conv_dim: tuple[int, ...] = _CONV_DIM
    conv_stride: tuple[int, ...] = _CONV_STRIDE
    conv_kernel: tuple[int, ...] = _CONV_KERNEL
    conv_bias: bool = False
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    do_stable_layer_norm: bool = False
    apply_spec_augment: bool = True
    mask_time_prob: float = 0.05
    mask_time_length: int = 10
    mask_time_min_masks: int = 2
    mask_feature_prob: float = 0.0
    mask_feature_length: int = 10
    mask_feature_min_masks: int = 0
    num_codevectors_per_group: int = 320
    num_codevector_groups: int = 2
    contrastive_logits_temperature: float = 0.1
    num_negatives: int = 100
    codevector_dim: int = 256
    proj_codevector_dim: int = 256
    diversity_loss_weight: float = 0.1
    ctc_loss_reduction: str = "sum"
    ctc_zero_infinity: bool = False
    use_weighted_layer_sum: bool = False
    classifier_proj_size: int = 256
    num_labels: int = 2
    id2label: tuple[str, ...] = ()
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    add_adapter: bool = False
    # Hugging Face keeps this in preprocessor_config.json (Wav2Vec2FeatureExtractor); XLS-R uses True.
    do_normalize: bool = True
    # ---- xlsr-jax only ----
    dtype: str = "float32"  # compute dtype; parameters are always float32
    scan_layers: bool = True  # nn.scan over the transformer layers (fast compile) or unrolled
    remat_policy: str = "none"  # rematerialization of each transformer layer, see REMAT_POLICIES
    # Rematerialize the conv feature encoder's norms and activations in the backward pass, keeping each
    # layer's input and conv output (its activations dominate the step's memory at long crops). With
    # `norm_act_remat` it drops only each conv layer's GELU input.
    conv_remat: bool = False
    # Keep only the inputs of each norm and activation (GELU, LayerNorm) for the backward pass and recompute
    # their internals there, as PyTorch's kernels do; autodiff would keep 2-3 intermediates of each. Not
    # inside what `remat_policy` or `conv_remat` already rematerializes.
    norm_act_remat: bool = True
    attention_impl: str = "auto"  # see ATTENTION_IMPLS
    # fairseq's feature_grad_mult: gradient scale into the conv encoder (0 freezes it).
    feature_grad_mult: float = 1.0

    def __post_init__(self):
        self.validate()

    # -- derived values -------------------------------------------------------------------------
    @property
    def num_feat_extract_layers(self) -> int:
        return len(self.conv_dim)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def has_masked_spec_embed(self) -> bool:
        """Hugging Face creates `masked_spec_embed` only when some masking probability is set."""
        return self.mask_time_prob > 0.0 or self.mask_feature_prob > 0.0

    @property
    def downsample(self) -> int:
        return math.prod(self.conv_stride)

    def num_frames(self, num_samples):
        """Frames the conv stack makes from `num_samples` audio samples (int or integer array)."""
        length = num_samples
        for kernel, stride in zip(self.conv_kernel, self.conv_stride):
            length = (length - kernel) // stride + 1
        return length

    def validate(self) -> None:
        """Raise `ConfigError` for values that cannot build a model."""
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.hidden_size % self.num_conv_pos_embedding_groups:
            problems.append(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_conv_pos_embedding_groups={self.num_conv_pos_embedding_groups}"
            )
        if not len(self.conv_dim) == len(self.conv_kernel) == len(self.conv_stride):
            problems.append(
                "conv_dim, conv_kernel and conv_stride must have the same length, got "
                f"{len(self.conv_dim)}, {len(self.conv_kernel)}, {len(self.conv_stride)}"
            )
        if self.feat_extract_norm not in ("group", "layer"):
            problems.append(f"feat_extract_norm must be 'group' or 'layer', got {self.feat_extract_norm!r}")
        if self.codevector_dim % self.num_codevector_groups:
            problems.append(
                f"codevector_dim={self.codevector_dim} is not divisible by "
                f"num_codevector_groups={self.num_codevector_groups}"
            )
        for name in ("hidden_act", "feat_extract_activation"):
            if getattr(self, name) not in ACTIVATIONS:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {sorted(ACTIVATIONS)}")
        if self.dtype not in DTYPES:
            problems.append(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.remat_policy not in REMAT_POLICIES:
            problems.append(f"remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            problems.append(f"attention_impl must be one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        elif self.attention_impl == "cudnn":
            if self.dtype != "bfloat16":
                problems.append(f"attention_impl='cudnn' needs dtype='bfloat16', got {self.dtype!r}")
            if self.head_dim > 128 or self.head_dim % 8:
                problems.append(f"attention_impl='cudnn' needs head_dim <= 128 and a multiple of 8, "
                                f"got {self.head_dim}")
        if self.add_adapter:
            problems.append("add_adapter=True (the Wav2Vec2 adapter for seq2seq) is not supported")
        if self.id2label and len(self.id2label) != self.num_labels:
            problems.append(f"id2label has {len(self.id2label)} labels but num_labels={self.num_labels}")
        if problems:
            raise ConfigError("invalid Wav2Vec2Config: " + "; ".join(problems))

    def replace(self, **changes: Any) -> Wav2Vec2Config:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)

    # -- serialization --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; tuples become lists and `id2label` becomes Hugging Face's {"0": ...} map."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "id2label":
                value = {str(i): label for i, label in enumerate(value)}
            elif isinstance(value, tuple):
                value = list(value)
            out[field.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], strict: bool = False) -> Wav2Vec2Config:
        """Build from a (Hugging Face or xlsr-jax) config dict; unknown keys are ignored unless strict."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known) - _HF_BOOKKEEPING_KEYS)
        if strict and unknown:
            raise ConfigError(f"unknown config keys: {unknown}")
        kwargs = {}
        for name, value in data.items():
            if name not in known:
                continue
            if name == "id2label":
                if isinstance(value, dict):
                    value = tuple(value[k] for k in sorted(value, key=int))
                else:
                    value = tuple(value)
            elif isinstance(value, list):
                value = tuple(value)
            kwargs[name] = value
        if "id2label" in kwargs and kwargs["id2label"] and "num_labels" not in data:
            kwargs["num_labels"] = len(kwargs["id2label"])
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """Only the fields `transformers.Wav2Vec2Config` knows."""
        out = self.to_dict()
        for name in _OURS:
            out.pop(name)
        if not self.id2label:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        out["label2id"] = {label: int(i) for i, label in out["id2label"].items()}
        out.pop("num_labels")
        out["model_type"] = "wav2vec2"
        return out

    def save(self, path: str | pathlib.Path, **extra: Any) -> None:
        """Write `config.json` (our fields plus `extra`, e.g. the head's architecture)."""
        data = {**extra, **self.to_dict()}
        pathlib.Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Wav2Vec2Config:
        """Read a `config.json` written by us or by Hugging Face."""
        path = pathlib.Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


ACTIVATIONS = ("gelu", "gelu_new", "relu", "swish", "silu")

_OURS = ("dtype", "scan_layers", "remat_policy", "conv_remat", "norm_act_remat", "attention_impl",
         "feature_grad_mult", "do_normalize")
_HF_BOOKKEEPING_KEYS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype_hf",
        "label2id", "_name_or_path", "tdnn_dim", "tdnn_kernel", "tdnn_dilation",
        "xvector_output_dim", "adapter_kernel_size", "adapter_stride", "num_adapter_layers",
        "output_hidden_size", "adapter_attn_dim", "feat_extract_dropout", "gradient_checkpointing",
        "head", "xlsr_jax_version",
    }
)  # fmt: skip


def _xlsr(layers: int, hidden: int, ffn: int, codevector_dim: int) -> Wav2Vec2Config:
    # XLS-R / LV-60: LayerNorm after every conv, conv bias, pre-LN transformer (fairseq
    # layer_norm_first); dropouts are the fairseq pretraining defaults (0.1, layerdrop 0.0 for
    # pretraining is set by the experiment config, this is the architecture).
    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=16,
        intermediate_size=ffn,
        feat_extract_norm="layer",
        conv_bias=True,
        do_stable_layer_norm=True,
        codevector_dim=codevector_dim,
        proj_codevector_dim=codevector_dim,
        do_normalize=True,
    )


PRESETS: dict[str, Wav2Vec2Config] = {
    # wav2vec 2.0 BASE: GroupNorm on conv layer 0, no conv bias, post-LN transformer.
    "base": Wav2Vec2Config(do_normalize=False),
    "large": _xlsr(24, 1024, 4096, 768),
    "xlsr_300m": _xlsr(24, 1024, 4096, 768),
    "xlsr_1b": _xlsr(48, 1280, 5120, 1024),
    "xlsr_2b": _xlsr(48, 1920, 7680, 1024),
    # Tiny presets for tests and smoke runs: full conv stack (so 320x framing holds), tiny widths.
    "tiny": Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        codevector_dim=16, proj_codevector_dim=12, num_codevectors_per_group=8,
        feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True,
    ),
    "tiny_base": Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        conv_dim=(32,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        codevector_dim=16, proj_codevector_dim=12, num_codevectors_per_group=8,
        do_normalize=False,
    ),
}  # fmt: skip


def get_preset(name: str, **overrides: Any) -> Wav2Vec2Config:
    """A named architecture preset, optionally with some fields overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
