"""Character vocabulary: Hugging Face vocab.json layout, identical encoding and CTC decoding."""

import json

import numpy as np
import pytest

from data_pipelines.vocab import LABEL_PAD, Vocabulary, pad_labels

TEXTS = ["hello world", "ça va, très bien!", "grüße aus köln", "nǐ hǎo shìjiè", "привет мир"]
PROBES = TEXTS + ["hello  world", " leading and trailing ", "unknown: XYZ 42 ☃", "a|b", ""]


def test_vocab_json_layout(tmp_path):
    vocab = Vocabulary.from_texts(TEXTS)
    ids = json.loads(vocab.save(tmp_path).read_text(encoding="utf-8"))
    assert [ids[t] for t in ("<pad>", "<s>", "</s>", "<unk>", "|")] == [0, 1, 2, 3, 4]
    assert sorted(ids.values()) == list(range(len(ids))) and " " not in ids
    assert set(ids) - {"<pad>", "<s>", "</s>", "<unk>", "|"} == set("".join(TEXTS)) - {" "}
    assert Vocabulary.load(tmp_path).tokens == vocab.tokens


def test_huggingface_tokenizer_loads_it_and_encodes_identically(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the `torch` extra provides transformers")
    vocab = Vocabulary.from_texts(TEXTS)
    tokenizer = transformers.Wav2Vec2CTCTokenizer(str(vocab.save(tmp_path)))
    assert (
        tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 3 and tokenizer.word_delimiter_token == "|"
    )
    for text in PROBES:
        ids = vocab.encode(text)
        assert ids.dtype == np.int32
        assert ids.tolist() == tokenizer(text).input_ids, text
        assert vocab.decode(ids) == tokenizer.decode(ids.tolist(), group_tokens=False), text
    # Greedy CTC output: blanks (0) between and around repeated characters, repeats merged.
    h, e, l, o = vocab.encode("helo").tolist()
    frames = [0, h, h, 0, e, l, 0, l, o, 4, 4, 0, h, 0]
    assert vocab.decode(frames, ctc=True) == tokenizer.decode(frames) == "hello h"


def test_unknown_characters_and_label_padding():
    vocab = Vocabulary.from_texts(["abc"])
    np.testing.assert_array_equal(vocab.encode("ab x"), [5, 6, 4, vocab.unk_id])
    labels, lengths = pad_labels([vocab.encode("abc"), vocab.encode("a")], 5)
    np.testing.assert_array_equal(labels, [[5, 6, 7, LABEL_PAD, LABEL_PAD], [5] + [LABEL_PAD] * 4])
    np.testing.assert_array_equal(lengths, [3, 1])
    assert vocab.decode(labels[0]) == "abc"  # -100 padding is ignored
    with pytest.raises(ValueError):
        pad_labels([vocab.encode("abcabc")], 5)
