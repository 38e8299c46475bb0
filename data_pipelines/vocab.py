"""Character vocabulary for CTC, stored as Hugging Face `Wav2Vec2CTCTokenizer` `vocab.json`.

Ids: `<pad>`=0 (the CTC blank, as in fairseq/HF CTC checkpoints), `<s>`=1, `</s>`=2, `<unk>`=3,
`|`=4 (the word delimiter that replaces spaces), then the characters of the transcripts in
sorted order. `transformers.Wav2Vec2CTCTokenizer(vocab_file)` loads the file and encodes text to
the same ids as `Vocabulary.encode`.
"""

from __future__ import annotations

import collections
import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from etils import epath

from data_pipelines.errors import UserError

PAD, BOS, EOS, UNK, WORD_DELIMITER = "<pad>", "<s>", "</s>", "<unk>", "|"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, WORD_DELIMITER)
LABEL_PAD = -100  # Hugging Face's ignore index for padded label positions


class Vocabulary:
    """Character <-> id table with CTC-aware decoding."""

    def __init__(self, tokens: Sequence[str]):
        if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise UserError(f"a vocabulary starts with {SPECIAL_TOKENS}, got {tuple(tokens[:5])}")
        if len(set(tokens)) != len(tokens):
            raise UserError("vocabulary tokens must be unique")
        self.tokens = list(tokens)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_id, self.unk_id, self.delimiter_id = self.ids[PAD], self.ids[UNK], self.ids[WORD_DELIMITER]

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def from_texts(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        """Every character seen at least `min_count` times (spaces become `|`), sorted."""
        counts = collections.Counter(ch for text in texts for ch in text if ch != " ")
        chars = sorted(ch for ch, n in counts.items() if n >= min_count and ch not in SPECIAL_TOKENS)
        return cls(list(SPECIAL_TOKENS) + chars)

    def save(self, path: str | pathlib.Path) -> epath.Path:
        """Writes `vocab.json` (into `path` if it is a directory; local or gs://); returns the file path."""
        path = epath.Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        path.write_text(json.dumps(self.ids, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | pathlib.Path) -> Vocabulary:
        """Reads a `vocab.json` (or the one inside a directory; local or gs://)."""
        path = epath.Path(path)
        if path.is_dir():
            path = path / "vocab.json"
        ids = json.loads(path.read_text(encoding="utf-8"))
        tokens = sorted(ids, key=ids.get)
        if [ids[t] for t in tokens] != list(range(len(tokens))):
            raise UserError(f"{path}: ids must be 0..{len(tokens) - 1} without gaps")
        return cls(tokens)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids, one per character; spaces -> `|`, unknown characters -> `<unk>`."""
        get, unk = self.ids.get, self.unk_id
        return np.fromiter(
            (get(WORD_DELIMITER if ch == " " else ch, unk) for ch in text), dtype=np.int32, count=len(text)
        )

    def decode(self, ids: Iterable[int], ctc: bool = False) -> str:
        """Text from ids; `ctc=True` first merges repeats and drops blanks (greedy CTC decoding).

        Special tokens other than `<unk>` are dropped, negative ids (label padding) are ignored.
        """
        ids = [int(i) for i in ids if int(i) >= 0]
        if ctc:
            ids = [i for k, i in enumerate(ids) if k == 0 or i != ids[k - 1]]
        skip = {self.ids[t] for t in (PAD, BOS, EOS)}
        chars = [" " if i == self.delimiter_id else self.tokens[i] for i in ids if i not in skip]
        return "".join(chars).strip()


def pad_labels(
    labels: Sequence[np.ndarray], length: int, pad_value: int = LABEL_PAD
) -> tuple[np.ndarray, np.ndarray]:
    """([B, length] int32 labels right-padded with `pad_value`, [B] int32 lengths); longer rows raise."""
    out = np.full((len(labels), length), pad_value, dtype=np.int32)
    lengths = np.zeros(len(labels), dtype=np.int32)
    for i, row in enumerate(labels):
        if len(row) > length:
            raise ValueError(f"label row {i} has {len(row)} ids, more than the padded length {length}")
        out[i, : len(row)] = row
        lengths[i] = len(row)
    return out, lengths
