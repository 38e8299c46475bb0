"""`prepare` over files and directories its user cannot read: each one in report.tsv, the rest prepared.

The test machines run as root, which reads anything; as root the case runs in a child process whose
capability bounding set lacks CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (util-linux `setpriv`), so
file permissions apply to it as to any user.
"""

import csv
import os
import shutil
import subprocess
import sys

from data_pipelines.records import DatasetIndex
from ingest_helpers import write_audio

PREPARE = ("from data_pipelines.ingest.prepare import prepare; import sys; "
           "prepare(sys.argv[1], sys.argv[2], workers=0, progress=False)")


def _without_root_reads(argv: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return argv
    setpriv = shutil.which("setpriv")
    assert setpriv, "running as root needs util-linux's setpriv to drop the capability to read anything"
    drop = "-dac_override,-dac_read_search"
    return [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", *argv]


def test_unreadable_files_and_directories_are_reported_and_the_rest_prepared(tmp_path):
    root = tmp_path / "audio"
    good = [write_audio(root / f"ok_{k}.wav", seconds=1.0, seed=k) for k in range(3)]
    locked_file = write_audio(root / "locked.flac", seconds=1.0, seed=5)
    locked_dir = root / "locked_dir"
    write_audio(locked_dir / "inside.wav", seconds=1.0, seed=6)
    locked_file.chmod(0)
    locked_dir.chmod(0)
    try:
        run = subprocess.run(_without_root_reads([sys.executable, "-c", PREPARE, str(root), str(tmp_path / "out")]),
                             capture_output=True, text=True, timeout=300)
    finally:
        locked_file.chmod(0o644)
        locked_dir.chmod(0o755)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(tmp_path / "out" / "report.tsv", newline="") as f:
        rows = {row["path"]: row for row in csv.DictReader(f, delimiter="\t")}
    assert set(rows) == {str(locked_file), str(locked_dir)}
    assert rows[str(locked_file)]["reason"] == "unreadable" and "permission denied" in rows[str(locked_file)]["detail"]
    assert rows[str(locked_dir)]["reason"] == "unreadable" and "cannot be listed" in rows[str(locked_dir)]["detail"]
    index = DatasetIndex.load(tmp_path / "out")
    assert index.splits["train"].total_records == len(good) and index.skipped == {"unreadable": 2}
