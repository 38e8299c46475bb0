"""Configuration: presets, Hugging Face field mapping, validation, and parameter counts against HF."""

import json

import pytest

from xlsr_jax.config import HEADS, HF_ARCHITECTURES, PRESETS, ConfigError, Wav2Vec2Config, get_preset
from xlsr_jax.models.heads import abstract_params, count_params

# Published sizes (pretraining model) from ../shared/REFERENCE.md, in millions.
PUBLISHED_M = {"xlsr_300m": 317.4, "xlsr_1b": 965.5, "xlsr_2b": 2162.9}


def _hf_param_count(config: Wav2Vec2Config, head: str) -> int:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.Wav2Vec2Config(**config.to_hf_dict())
    with torch.device("meta"):  # no memory: the 2B model costs nothing
        model = getattr(transformers, HF_ARCHITECTURES[head])(hf_config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_count_equals_hugging_face(preset):
    counts = {}
    for head in HEADS:
        config = get_preset(preset, use_weighted_layer_sum=head == "sequence_classification")
        ours = count_params(abstract_params(config, head))
        theirs = _hf_param_count(config, head)
        counts[head] = (ours, theirs)
        assert ours == theirs, (preset, head, ours, theirs)
    print(preset, counts)
    if preset in PUBLISHED_M:
        assert round(counts["pretraining"][0] / 1e6, 1) == PUBLISHED_M[preset]


def test_hf_config_round_trip():
    transformers = pytest.importorskip("transformers")
    for name, config in PRESETS.items():
        hf = transformers.Wav2Vec2Config(**config.to_hf_dict())
        back = Wav2Vec2Config.from_dict(json.loads(hf.to_json_string()))
        ours_only = {"dtype", "scan_layers", "remat_policy", "feature_grad_mult", "do_normalize", "id2label"}
        for field in Wav2Vec2Config.__dataclass_fields__:
            if field not in ours_only:
                assert getattr(back, field) == getattr(config, field), (name, field)


def test_save_load_and_labels(tmp_path):
    config = get_preset("tiny", num_labels=2, id2label=("yes", "no"), dtype="bfloat16", scan_layers=False)
    config.save(tmp_path / "config.json", head="ctc")
    assert Wav2Vec2Config.load(tmp_path / "config.json") == config
    assert json.loads((tmp_path / "config.json").read_text())["id2label"] == {"0": "yes", "1": "no"}


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"hidden_size": 30}, "not divisible by num_attention_heads"),
        ({"feat_extract_norm": "batch"}, "feat_extract_norm"),
        ({"conv_kernel": (10, 3)}, "same length"),
        ({"dtype": "float16"}, "dtype"),
        ({"remat_policy": "sometimes"}, "remat_policy"),
        ({"hidden_act": "tanh"}, "hidden_act"),
        ({"add_adapter": True}, "adapter"),
        ({"num_labels": 3, "id2label": ("a", "b")}, "id2label"),
    ],
)
def test_validation_messages(changes, message):
    with pytest.raises(ConfigError, match=message):
        get_preset("tiny", **changes)


def test_unknown_preset_and_strict_keys(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'xlsr_3b'"):
        get_preset("xlsr_3b")
    with pytest.raises(ConfigError, match="unknown config keys"):
        Wav2Vec2Config.from_dict({"hiden_size": 3}, strict=True)
    with pytest.raises(ConfigError, match="not found"):
        Wav2Vec2Config.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Wav2Vec2Config.load(tmp_path / "bad.json")


def test_frame_arithmetic():
    config = get_preset("xlsr_300m")
    assert config.downsample == 320
    assert config.num_frames(16000) == 49  # one frame per 20 ms, HF's conv length formula
    assert config.num_frames(320000) == 999
