"""Directory-level conversion: HF dir -> xlsr-jax model dir -> HF dir, via the CLI and the Python API."""

import json
import pathlib

import huggingface_hub
import jax
import numpy as np
import pytest
from hf_helpers import batch, hf_forward, random_hf_model, state_dict, transformers

from xlsr_jax.cli import main
from xlsr_jax.config import HF_ARCHITECTURES, get_preset
from xlsr_jax.convert.hf import HUB_ALLOW_PATTERNS, ConversionError, hf_to_jax, jax_to_hf, resolve_hf_input
from xlsr_jax.model_dir import ModelDirError, load_model_dir, read_config


def _save_hf(tmp_path, config, head, legacy=False):
    model = random_hf_model(config, head)
    out = tmp_path / f"hf_{head}"
    model.save_pretrained(out)
    if legacy:  # rewrite the positional-conv weight-norm keys the pre-parametrizations way
        from safetensors.numpy import load_file, save_file

        sd = load_file(out / "model.safetensors")
        prefix = "" if head == "base" else "wav2vec2."
        base = prefix + "encoder.pos_conv_embed.conv."
        sd[base + "weight_g"] = sd.pop(base + "parametrizations.weight.original0")
        sd[base + "weight_v"] = sd.pop(base + "parametrizations.weight.original1")
        save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    return model, out


HEAD_CONFIGS = [
    ("base", get_preset("tiny")),
    ("ctc", get_preset("tiny_base")),
    ("sequence_classification", get_preset("tiny", num_labels=3, id2label=("en", "de", "cmn"),
                                           use_weighted_layer_sum=True)),
    ("pretraining", get_preset("tiny")),
]


@pytest.mark.parametrize("head,config", HEAD_CONFIGS, ids=[h for h, _ in HEAD_CONFIGS])
@pytest.mark.parametrize("legacy", [False, True], ids=["parametrizations", "weight_g_v"])
def test_hf_dir_round_trip(tmp_path, head, config, legacy):
    model, hf_dir = _save_hf(tmp_path, config, head, legacy=legacy)
    model_dir = hf_to_jax(hf_dir, tmp_path / "ours")
    cfg, got_head, _ = load_model_dir(model_dir)
    assert got_head == head
    assert cfg.to_hf_dict() == config.to_hf_dict() | {"id2label": cfg.to_hf_dict()["id2label"],
                                                       "label2id": cfg.to_hf_dict()["label2id"]}
    out = jax_to_hf(model_dir, tmp_path / "back", legacy_weight_norm=legacy)
    cls = getattr(transformers, HF_ARCHITECTURES[head])
    reloaded, info = cls.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    original, back = state_dict(model), state_dict(reloaded)
    assert sorted(original) == sorted(back)
    for key in original:
        np.testing.assert_array_equal(back[key], original[key], err_msg=key)
    if head == "sequence_classification":
        assert reloaded.config.id2label == {0: "en", 1: "de", 2: "cmn"}
    # The re-exported model computes what the original does.
    audio, mask = batch()
    a, b = hf_forward(model.eval(), audio, mask), hf_forward(reloaded.eval(), audio, mask)
    first = "logits" if head in ("ctc", "sequence_classification") else (
        "projected_states" if head == "pretraining" else "last_hidden_state")
    np.testing.assert_array_equal(getattr(a, first).numpy(), getattr(b, first).numpy())


def test_cli_convert_both_ways_and_errors(tmp_path, capsys):
    _, hf_dir = _save_hf(tmp_path, get_preset("tiny"), "ctc")
    (hf_dir / "vocab.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}))
    assert main(["convert", "hf-to-jax", "--input", str(hf_dir), "--output", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "vocab.json").is_file()
    assert read_config(tmp_path / "m")[1] == "ctc"
    assert main(["convert", "jax-to-hf", "--input", str(tmp_path / "m"), "--output", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "vocab.json").read_text())["<pad>"] == 0
    prep = json.loads((tmp_path / "h" / "preprocessor_config.json").read_text())
    assert prep["do_normalize"] is True and prep["return_attention_mask"] is True
    transformers.Wav2Vec2Processor.from_pretrained(tmp_path / "h")  # tokenizer + feature extractor load

    # Refuses to overwrite; a missing input and a non-model directory give one clear line each.
    capsys.readouterr()
    assert main(["convert", "hf-to-jax", "--input", str(hf_dir), "--output", str(tmp_path / "m")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["convert", "hf-to-jax", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "x")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["convert", "jax-to-hf", "--input", str(hf_dir), "--output", str(tmp_path / "y")]) == 2
    assert "convert it first" in capsys.readouterr().err.lower()


def test_unrolled_load_of_stacked_dir(tmp_path):
    config = get_preset("tiny")
    _, hf_dir = _save_hf(tmp_path, config, "base")
    model_dir = hf_to_jax(hf_dir, tmp_path / "ours")
    _, _, params = load_model_dir(model_dir, scan_layers=False)
    assert "layers_1" in params["wav2vec2"]["encoder"] and "layers" not in params["wav2vec2"]["encoder"]
    with pytest.raises(ModelDirError):
        load_model_dir(tmp_path / "missing")


def test_half_precision_checkpoint_keeps_float32_compute(tmp_path):
    """transformers 5 stores the storage dtype as "dtype"; it must not become our compute dtype."""
    import torch

    model = random_hf_model(get_preset("tiny"), "base").to(torch.float16)
    model.save_pretrained(tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text()).get("dtype") == "float16"
    cfg, _, params = load_model_dir(hf_to_jax(tmp_path / "hf", tmp_path / "ours"))
    assert cfg.dtype == "float32"
    leaf = params["wav2vec2"]["encoder"]["layers"]["attention"]["q_proj"]["kernel"]
    assert leaf.dtype == np.float32


# ---- Hub model ids, through the local Hugging Face cache -----------------------------------------

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _offline_hub_cache(tmp_path, monkeypatch):
    """An empty HF_HUB_CACHE under tmp_path, offline."""
    import huggingface_hub.constants

    cache = tmp_path / "hub_cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, when it is imported (transformers already did that):
    # its module copies must change too for this process to see them.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def _add_to_hub_cache(cache, repo_id, hf_dir, commit=COMMIT):
    """Lay `hf_dir` out as the Hub cache does: blobs, a snapshot of symlinks to them, refs/main."""
    import hashlib
    import os

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in sorted(hf_dir.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _assert_logits_match(model, model_dirs, head):
    """Every converted directory computes the PyTorch model's logits (one compiled forward for all)."""
    import jax
    import jax.numpy as jnp

    from xlsr_jax.models.heads import build_model

    audio, mask = batch()
    theirs = hf_forward(model, audio, mask).logits.numpy()
    apply = None
    for model_dir in model_dirs:
        cfg, got_head, params = load_model_dir(model_dir)
        assert got_head == head
        apply = apply or jax.jit(build_model(cfg, head).apply)
        ours = apply({"params": params}, jnp.asarray(audio), jnp.asarray(mask))
        diff = float(np.max(np.abs(np.asarray(ours.logits) - theirs)))
        print(f"{model_dir.name}: max |logit diff| vs PyTorch {diff:.3g}")
        assert diff < 1e-4, diff


def test_hub_id_from_offline_cache(tmp_path, monkeypatch):
    model, hf_dir = _save_hf(tmp_path, get_preset("tiny"), "ctc")
    (hf_dir / "vocab.json").write_text(json.dumps({"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4}))
    cache = _offline_hub_cache(tmp_path, monkeypatch)
    snapshot = _add_to_hub_cache(cache, "org/tiny-ctc", hf_dir)
    assert resolve_hf_input("org/tiny-ctc") == snapshot
    assert resolve_hf_input(f"org/tiny-ctc@{COMMIT}") == snapshot

    model_dir = hf_to_jax("org/tiny-ctc", tmp_path / "ours")
    assert (model_dir / "vocab.json").is_file() and not (model_dir / "vocab.json").is_symlink()
    # The CLI takes the same id, with a revision.
    out = tmp_path / "ours_cli"
    assert main(["convert", "hf-to-jax", "--input", f"org/tiny-ctc@{COMMIT}", "--output", str(out)]) == 0
    _assert_logits_match(model, [model_dir, out], "ctc")
    # A local directory of the same name wins over the Hub id.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "tiny-ctc").symlink_to(hf_dir)
    assert resolve_hf_input("org/tiny-ctc") == pathlib.Path("org/tiny-ctc")


def test_hub_id_offline_miss_says_how_to_fetch(tmp_path, monkeypatch, capsys):
    cache = _offline_hub_cache(tmp_path, monkeypatch)
    repo = "facebook/wav2vec2-xls-r-300m"
    for name, fetch in [(repo, f"hf download {repo}"),
                        (f"{repo}@v1.0", f"hf download {repo} --revision v1.0")]:
        capsys.readouterr()
        assert main(["convert", "hf-to-jax", "--input", name, "--output", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err  # one line, no traceback
        for part in ("is not a local directory", "not in the local cache", str(cache), "HF_HUB_OFFLINE=0",
                     fetch, f"from huggingface_hub import snapshot_download; snapshot_download('{repo}'"):
            assert part in err, (part, err)
    assert not (tmp_path / "m").exists()
    # Not an id (an absolute path, or one dot-relative) is read as a directory: the old message stays.
    with pytest.raises(ModelDirError, match="no config.json"):
        hf_to_jax(tmp_path / "nope", tmp_path / "m")


def test_hub_id_download_fetches_only_conversion_files(tmp_path, monkeypatch):
    """Online (HF_HUB_OFFLINE unset): a cache miss downloads config, weights and tokenizer files only."""
    _, hf_dir = _save_hf(tmp_path, get_preset("tiny"), "base")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, local_files_only=False, allow_patterns=None):
        calls.append((repo_id, revision, local_files_only, allow_patterns))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        if revision == "gone":
            raise OSError("connection refused")
        return str(hf_dir)

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_hf_input("org/tiny") == hf_dir
    assert calls == [("org/tiny", None, True, None), ("org/tiny", None, False, list(HUB_ALLOW_PATTERNS))]
    assert {"config.json", "model.safetensors", "vocab.json", "preprocessor_config.json"} <= set(
        HUB_ALLOW_PATTERNS)
    failed = r"download failed \(OSError: connection refused\).*hf download org/tiny --revision gone"
    with pytest.raises(ConversionError, match=failed):
        resolve_hf_input("org/tiny@gone")


# ---- what jax-to-hf writes for pipelines ---------------------------------------------------------


def _our_ctc_dir(path, vocab_tokens=None, extra=()):
    """A CTC model directory written by us (random weights), with our vocab.json when tokens are given."""
    from data_pipelines.vocab import Vocabulary
    from xlsr_jax.convert.hf import state_dict_to_params
    from xlsr_jax.model_dir import save_model_dir

    config = get_preset("tiny", vocab_size=8)
    params = state_dict_to_params(state_dict(random_hf_model(config, "ctc")), config, "ctc")
    path.mkdir(parents=True, exist_ok=True)
    files = list(extra)
    if vocab_tokens is not None:
        files.append(Vocabulary(vocab_tokens).save(path))
    return save_model_dir(path / "model", config, params, "ctc", extra_files=files)


def test_jax_to_hf_writes_a_ctc_tokenizer(tmp_path, caplog):
    from data_pipelines.vocab import SPECIAL_TOKENS, Vocabulary

    vocab = Vocabulary([*SPECIAL_TOKENS, "a", "b", "ß"])
    model_dir = _our_ctc_dir(tmp_path / "1", vocab.tokens)
    out = jax_to_hf(model_dir, tmp_path / "hf")
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "Wav2Vec2CTCTokenizer"
    for loader in (transformers.AutoTokenizer, transformers.Wav2Vec2CTCTokenizer):
        tok = loader.from_pretrained(out)
        assert isinstance(tok, transformers.Wav2Vec2CTCTokenizer)
        assert (tok.pad_token_id, tok.bos_token, tok.eos_token, tok.unk_token, tok.word_delimiter_token) == (
            0, "<s>", "</s>", "<unk>", "|")
        assert tok("ab ßa").input_ids == vocab.encode("ab ßa").tolist()
        ids = [5, 5, 0, 6, 4, 4, 7, 0, 7, 5]
        assert tok.decode(ids) == vocab.decode(ids, ctc=True) == "ab ßßa"
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(processor, transformers.Wav2Vec2Processor)
    assert processor.feature_extractor.do_normalize and processor.feature_extractor.return_attention_mask

    # Tokenizer files that came with the model (from Hugging Face) are kept as they are.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "Wav2Vec2CTCTokenizer", "do_lower_case": True}))
    model_dir = _our_ctc_dir(tmp_path / "2", vocab.tokens, extra=[theirs / "tokenizer_config.json"])
    out = jax_to_hf(model_dir, tmp_path / "hf2")
    assert (out / "tokenizer_config.json").read_text() == (theirs / "tokenizer_config.json").read_text()
    assert transformers.AutoTokenizer.from_pretrained(out).do_lower_case

    # No vocab.json: exported anyway, with a warning that pipelines need a tokenizer.
    with caplog.at_level("WARNING", logger="xlsr_jax.convert.hf"):
        out = jax_to_hf(_our_ctc_dir(tmp_path / "3"), tmp_path / "hf3")
    assert not (out / "tokenizer_config.json").exists() and (out / "model.safetensors").is_file()
    assert "has no tokenizer" in caplog.text and "vocab.json" in caplog.text

    # A vocabulary larger than the CTC head cannot be this model's.
    big = _our_ctc_dir(tmp_path / "4", [*SPECIAL_TOKENS, *"abcdefgh"])
    with pytest.raises(ConversionError, match="13 tokens but the CTC head has vocab_size=8"):
        jax_to_hf(big, tmp_path / "hf4")
    assert not (tmp_path / "hf4").exists()


def test_legacy_pytorch_model_bin_converts_and_a_code_running_one_is_refused(tmp_path, capsys):
    import os

    import torch

    hf = random_hf_model(get_preset("tiny"), "pretraining")
    hf.save_pretrained(tmp_path / "new")
    legacy = tmp_path / "legacy"
    hf.save_pretrained(legacy)
    (legacy / "model.safetensors").unlink()
    torch.save(hf.state_dict(), legacy / "pytorch_model.bin")  # what transformers < 4.35 wrote
    _, _, want = load_model_dir(hf_to_jax(tmp_path / "new", tmp_path / "from_new"))
    _, _, got = load_model_dir(hf_to_jax(legacy, tmp_path / "from_legacy"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    marker = tmp_path / "code-ran"

    class RunsCode:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"wav2vec2.masked_spec_embed": RunsCode()}, legacy / "pytorch_model.bin")
    capsys.readouterr()
    assert main(["convert", "hf-to-jax", "--input", str(legacy), "--output", str(tmp_path / "evil")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pytorch_model.bin pickles posix.system" in err[0] and "--trust-pickle" in err[0], err
    assert not marker.exists() and not (tmp_path / "evil").exists()
