"""The fault tests share the helpers of the tests one folder up (`ingest_helpers`)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
