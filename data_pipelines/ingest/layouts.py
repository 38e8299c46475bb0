"""Input layouts: turn a folder or manifest on disk into a list of `Item`s to ingest.

Layouts (auto-detected, or forced with `layout=`):

- `corpus`: a directory with `manifest.tsv` (header `path, language, split, text`; `id` optional;
  paths relative to the directory), as the embedded corpus `data_pipelines/corpus/speech`.
- `commonvoice`: a locale directory with `clips/` and `train.tsv`/`dev.tsv`/`test.tsv` (columns
  `path`, `sentence`, `locale`); the split is the table's name; without a `locale` column the
  language is `language`, else the directory's name (Common Voice names it after the locale).
- `fairseq`: a manifest `NAME.tsv` (first line the audio root, then `path<TAB>num_samples`) or a
  directory of them; the split is NAME; transcripts from `NAME.wrd`, else `NAME.ltr`, beside it.
- `librispeech`: `SPEAKER/CHAPTER/SPEAKER-CHAPTER.trans.txt` (lines `ID text`, audio `ID.flac`),
  one level deeper when the input holds several subsets (the subset directory is the split).
- `folder`: any tree of audio files (wav, flac, ogg, mp3); an optional `<stem>.txt` beside a file is
  its transcript.

`split` names the split of layouts without one (folder, fairseq file, one LibriSpeech subset) and,
for layouts with splits, keeps only that split. `language` labels items the layout leaves
unlabeled; `language_from_parent` takes it from each audio file's parent directory name.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import pathlib
from collections.abc import Callable, Sequence

from data_pipelines.errors import UserError

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
UNKNOWN_LANGUAGE = "und"  # ISO 639-2 "undetermined", for data with no language label
DEFAULT_SPLIT = "train"
_CV_SPLITS = ("train", "dev", "test")


@dataclasses.dataclass(frozen=True)
class Item:
    """One input audio file and what the layout says about it."""

    path: str
    id: str
    split: str
    language: str = UNKNOWN_LANGUAGE
    text: str = ""
    # (reason, detail) when it cannot be used whatever its audio: a transcript that is not UTF-8, a
    # directory that cannot be listed; reported like a file that does not decode
    skip: tuple[str, str] | None = None


@dataclasses.dataclass(frozen=True)
class _Options:
    split: str | None
    language: str | None
    language_from_parent: bool

    def language_of(self, audio: pathlib.Path, default: str | None = None) -> str:
        if self.language_from_parent:
            return audio.parent.name
        return self.language or default or UNKNOWN_LANGUAGE


def as_path(path: str | os.PathLike[str]) -> pathlib.Path:
    """A local path, or an `etils.epath.Path` for a bucket URL (gs://...: listed and read through gcsfs,
    decoded by `prepare --runner` workers; the local path reads local files only)."""
    if is_remote(path):
        from etils import epath

        return epath.Path(str(path))
    return pathlib.Path(path)


def is_remote(path: str | os.PathLike[str]) -> bool:
    return "://" in str(path)


def _text(path: pathlib.Path) -> str:
    """A manifest or transcript file as text; one that is not UTF-8 is the user's to convert."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e}); convert it, e.g. iconv -f LATIN1 -t UTF-8") from e


def _read_tsv(path: pathlib.Path) -> list[dict[str, str]]:
    # QUOTE_NONE: Common Voice sentences contain bare quotes that the default dialect would eat.
    return list(csv.DictReader(io.StringIO(_text(path), newline=""), delimiter="\t", quoting=csv.QUOTE_NONE))


def _require_columns(path: pathlib.Path, rows: list[dict[str, str]], columns: Sequence[str]) -> None:
    if rows and (missing := [c for c in columns if c not in rows[0]]):
        raise UserError(f"{path}: missing column(s) {missing}; it has {sorted(rows[0])}")


def _entry(root: pathlib.Path, rel: str, manifest: pathlib.Path) -> tuple[pathlib.Path, tuple[str, str] | None]:
    """(root / rel, a skip when the entry leads outside `root`: "../" climbing out, or an absolute path)."""
    audio = root / rel
    if os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == os.pardir:
        return audio, ("outside_root", f"{manifest.name} lists {rel!r}, outside its audio root {root}")
    return audio, None


def _is_fairseq_manifest(path: pathlib.Path) -> bool:
    with path.open(encoding="utf-8", errors="replace") as f:  # a guess at the layout: never fails on bytes
        first, second = f.readline(), f.readline()
    return bool(first.strip()) and "\t" not in first and (not second or len(second.split("\t")) == 2)


def read_corpus(root: pathlib.Path, opts: _Options) -> list[Item]:
    """`manifest.tsv` with path, language, split, text (and optional id) columns."""
    manifest = root / "manifest.tsv" if root.is_dir() else root
    base = manifest.parent
    rows = _read_tsv(manifest)
    _require_columns(manifest, rows, ["path"])
    items = []
    for row in rows:
        # An absolute path is allowed here (the manifest's directory is not declared a root); "../" is not.
        audio, skip = _entry(base, row["path"], manifest) if not os.path.isabs(row["path"]) else (
            pathlib.Path(row["path"]), None)
        split = row.get("split") or opts.split or DEFAULT_SPLIT
        language = row.get("language") or opts.language_of(audio)
        items.append(Item(str(audio), row.get("id") or audio.stem, split, language, row.get("text") or "", skip))
    return items


def read_commonvoice(root: pathlib.Path, opts: _Options) -> list[Item]:
    """Common Voice locale directory: clips/ plus train/dev/test.tsv."""
    tables = [root / f"{s}.tsv" for s in _CV_SPLITS if (root / f"{s}.tsv").is_file()]
    if not (root / "clips").is_dir() or not tables:
        raise UserError(f"{root} is not a Common Voice directory: needs clips/ and train.tsv, dev.tsv "
                         f"or test.tsv")
    items = []
    for table in tables:
        rows = _read_tsv(table)
        _require_columns(table, rows, ["path", "sentence"])
        for row in rows:
            audio, skip = _entry(root / "clips", row["path"], table)
            language = row.get("locale") or opts.language_of(audio, default=root.name)
            items.append(Item(str(audio), audio.stem, table.stem, language, row["sentence"].strip(), skip))
    return items


def _fairseq_transcripts(manifest: pathlib.Path, n: int) -> list[str]:
    wrd, ltr = manifest.with_suffix(".wrd"), manifest.with_suffix(".ltr")
    if wrd.is_file():
        lines = [line.strip() for line in _text(wrd).splitlines()]
    elif ltr.is_file():
        # Letter targets: "H E L L O | W O R L D |" -> "HELLO WORLD".
        lines = [" ".join(line.replace(" ", "").split("|")).strip()
                 for line in _text(ltr).splitlines()]
    else:
        return [""] * n
    if len(lines) != n:
        source = wrd if wrd.is_file() else ltr
        raise UserError(f"{source}: {len(lines)} transcript lines for {n} manifest entries")
    return lines


def _read_fairseq_file(manifest: pathlib.Path, opts: _Options) -> list[Item]:
    lines = _text(manifest).splitlines()
    if not lines or "\t" in lines[0]:
        raise UserError(f"{manifest} is not a fairseq manifest: the first line must be the audio root "
                         f"directory")
    root = as_path(lines[0].strip())
    if not is_remote(root) and not root.is_absolute():
        root = manifest.parent / lines[0].strip()
    entries = [line for line in lines[1:] if line.strip()]
    texts = _fairseq_transcripts(manifest, len(entries))
    items = []
    for line, text in zip(entries, texts):
        rel = line.split("\t")[0]
        audio, skip = _entry(root, rel, manifest)
        uid = os.path.splitext(rel)[0]
        items.append(Item(str(audio), uid, opts.split or manifest.stem, opts.language_of(audio), text, skip))
    return items


def read_fairseq(root: pathlib.Path, opts: _Options) -> list[Item]:
    """A fairseq manifest .tsv, or a directory holding several (train.tsv, valid.tsv, ...)."""
    if root.is_file():
        return _read_fairseq_file(root, opts)
    manifests = [p for p in sorted(root.glob("*.tsv")) if _is_fairseq_manifest(p)]
    if not manifests:
        raise UserError(f"{root} holds no fairseq manifest (*.tsv whose first line is the audio root)")
    # Several manifests: each is a split, so `split` filters rather than renames.
    per_file = _Options(None, opts.language, opts.language_from_parent)
    return [item for m in manifests for item in _read_fairseq_file(m, per_file)]


def read_librispeech(root: pathlib.Path, opts: _Options) -> list[Item]:
    """LibriSpeech: */*/*.trans.txt (one subset) or */*/*/*.trans.txt (subsets as splits)."""
    single = sorted(root.glob("*/*/*.trans.txt"))
    transcripts = single or sorted(root.glob("*/*/*/*.trans.txt"))
    if not transcripts:
        raise UserError(f"{root} is not a LibriSpeech directory: no SPEAKER/CHAPTER/*.trans.txt found")
    items = []
    for trans in transcripts:
        split = (opts.split or root.name) if single else trans.parents[2].name
        for line in _text(trans).splitlines():
            if not line.strip():
                continue
            uid, _, text = line.strip().partition(" ")
            audio = trans.parent / f"{uid}.flac"
            items.append(Item(str(audio), uid, split, opts.language_of(audio, default="en"), text.strip()))
    return items


def _audio_files(root: pathlib.Path) -> tuple[list[pathlib.Path], list[OSError]]:
    """(audio files under `root`, the errors of directories that could not be listed)."""
    errors: list[OSError] = []
    files = []
    # os.walk, not Path.rglob: rglob passes over a directory it cannot list without a word. Neither
    # follows links to directories; broken or looping file links are kept, so that they are reported.
    for parent, _, names in os.walk(root, onerror=errors.append):
        for name in names:
            p = pathlib.Path(parent, name)
            if p.suffix.lower() in AUDIO_EXTENSIONS and (p.is_file() or (p.is_symlink() and not p.exists())):
                files.append(p)
    return sorted(files), errors


def _remote_audio_files(root: pathlib.Path) -> list[pathlib.Path]:
    """Audio objects under a bucket URL, from one recursive listing (fsspec: gcsfs for gs://)."""
    import fsspec

    fs, _, (base,) = fsspec.get_fs_token_paths(str(root))
    return sorted(as_path(fs.unstrip_protocol(p)) for p in fs.find(base)
                  if pathlib.PurePosixPath(p).suffix.lower() in AUDIO_EXTENSIONS)


def read_folder(root: pathlib.Path, opts: _Options) -> list[Item]:
    """Every audio file under `root` (or `root` itself when it is one file); a directory that cannot be
    listed is an item that is skipped and reported."""
    if root.is_file():
        files, errors = [root], []
    elif is_remote(root):  # a bucket has no directories to be refused
        files, errors = _remote_audio_files(root), []
    else:
        files, errors = _audio_files(root)
    if not files and not errors:
        raise UserError(f"{root} holds no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    base = root.parent if root.is_file() else root
    split = opts.split or DEFAULT_SPLIT
    items = []
    for audio in files:
        sidecar = audio.with_suffix(".txt")
        text, skip = "", None
        if sidecar.is_file():
            try:
                text = sidecar.read_bytes().decode("utf-8").strip()
            except UnicodeDecodeError as e:  # this file is skipped and reported, the others go on
                skip = ("bad_text", f"transcript {sidecar.name} is not UTF-8 ({e})")
        items.append(Item(str(audio), _relative_id(audio.with_suffix(""), base), split, opts.language_of(audio), text,
                          skip))
    for err in errors:
        detail = f"a directory that cannot be listed ({err.strerror}): its files are left out"
        items.append(Item(str(err.filename), _relative_id(pathlib.Path(err.filename), base), split, UNKNOWN_LANGUAGE,
                          skip=("unreadable", detail)))
    return items


def _relative_id(path: pathlib.Path, base: pathlib.Path) -> str:
    # An id is text in the records: a name that is not UTF-8 keeps its odd bytes as \xNN escapes.
    return os.fsencode(path.relative_to(base).as_posix()).decode("utf-8", "backslashreplace")


READERS: dict[str, Callable[[pathlib.Path, _Options], list[Item]]] = {
    "corpus": read_corpus,
    "commonvoice": read_commonvoice,
    "fairseq": read_fairseq,
    "librispeech": read_librispeech,
    "folder": read_folder,
}
LAYOUTS = tuple(READERS)


def detect_layout(path: str | os.PathLike[str]) -> str:
    """Names the layout of `path`, or raises ValueError saying what was looked for."""
    root = as_path(path)
    if not root.exists():
        raise FileNotFoundError(f"input {root} does not exist")
    if root.is_file():
        if root.suffix.lower() in AUDIO_EXTENSIONS:
            return "folder"
        if root.suffix == ".tsv":
            return "fairseq" if _is_fairseq_manifest(root) else "corpus"
    else:
        if (root / "manifest.tsv").is_file():
            return "corpus"
        if (root / "clips").is_dir() and any((root / f"{s}.tsv").is_file() for s in _CV_SPLITS):
            return "commonvoice"
        if any(_is_fairseq_manifest(p) for p in root.glob("*.tsv")):
            return "fairseq"
        if next(root.glob("*/*/*.trans.txt"), None) or next(root.glob("*/*/*/*.trans.txt"), None):
            return "librispeech"
        if is_remote(root) and _remote_audio_files(root):
            return "folder"
        if not is_remote(root) and any(p.suffix.lower() in AUDIO_EXTENSIONS for p in root.rglob("*")):
            return "folder"
    raise UserError(
        f"no input layout matches {root}: expected a directory with manifest.tsv (corpus), clips/ + "
        f"train/dev/test.tsv (commonvoice), a fairseq manifest .tsv, */*/*.trans.txt (librispeech) or "
        f"audio files ({', '.join(AUDIO_EXTENSIONS)}); force one with --layout {{{','.join(LAYOUTS)}}}")


def discover(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    layout: str | None = None,
    split: str | None = None,
    language: str | None = None,
    language_from_parent: bool = False,
) -> tuple[list[Item], list[str]]:
    """Lists the items of every input; returns (items sorted by split and id, layout per input)."""
    if layout is not None and layout not in READERS:
        raise UserError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if language is not None and language_from_parent:
        raise UserError("give either a language or language_from_parent, not both")
    paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not paths:
        raise UserError("no inputs given")
    opts = _Options(split, language, language_from_parent)
    items: list[Item] = []
    layouts = []
    for path in paths:
        name = layout or detect_layout(path)
        root = as_path(path)
        if not root.exists():
            raise FileNotFoundError(f"input {root} does not exist")
        found = READERS[name](root, opts)
        if split is not None:
            found = [it for it in found if it.split == split]
        items.extend(found)
        layouts.append(name)
    seen: dict[tuple[str, str], str] = {}
    first: dict[str, Item] = {}
    for k, item in enumerate(items):
        if (prev := seen.setdefault((item.split, item.id), item.path)) != item.path:
            raise UserError(f"two inputs share the id {item.id!r} in split {item.split!r}: {prev} and "
                             f"{item.path}")
        # The same file twice (a manifest listing it again, in another split, or two inputs): the first
        # listing is kept, so a file never trains twice per epoch nor leaks from train into dev.
        kept = first.setdefault(os.path.normpath(item.path), item)
        if kept is not item and item.skip is None:
            items[k] = dataclasses.replace(item, skip=("duplicate", f"already listed as {kept.id!r} in split "
                                                                    f"{kept.split!r}"))
    if not items:
        where = ", ".join(map(str, paths)) + (f" for split {split!r}" if split else "")
        raise UserError(f"no audio found in {where}")
    return sorted(items, key=lambda it: (it.split, it.id)), layouts
