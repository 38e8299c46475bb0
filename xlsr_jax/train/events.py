"""TensorBoard event files of scalars, written without TensorFlow, torch or tensorboardX.

An event file is a sequence of TFRecords (length, masked CRC-32C of the length, data, masked CRC-32C
of the data), each holding one serialized `tensorboard.Event` protobuf: a first event with the file
version, then events whose `Summary` holds (tag, simple_value) pairs. Only those fields are written,
encoded here by hand, so writing costs no import: tensorboardX imports torch when it is installed,
~3.6 s of every training process's start on the CI machine.

A local file is appended to and flushed at every write. Object stores (gs://...) cannot append: the
file's whole content is uploaded again at each write, and a new file is started once one holds
`ROLL_BYTES`, so that a long run never uploads more than that per write.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Mapping

from etils import epath

ROLL_BYTES = 1 << 20
_FILE_VERSION = b"brain.Event:2"


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits, value = value & 0x7F, value >> 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def encode_event(wall_time: float, step: int = 0, scalars: Mapping[str, float] | None = None,
                 file_version: bytes | None = None) -> bytes:
    """A serialized `Event`: wall_time (1, double), step (2, int64), file_version (3), summary (5)."""
    event = b"\x09" + struct.pack("<d", wall_time)
    if step:
        event += b"\x10" + _varint(step & 0xFFFFFFFFFFFFFFFF)
    if file_version is not None:
        event += _field(3, file_version)
    if scalars:
        # Summary.value (1): Summary.Value{tag (1), simple_value (2, float)}.
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
                          for tag, value in scalars.items())
        event += _field(5, values)
    return event


class EventWriter:
    """Scalars into `directory/events.out.tfevents.<time>.<host>[.<n>]`, which TensorBoard reads."""

    def __init__(self, directory: str | epath.Path, rewrite: bool | None = None):
        """`rewrite`: upload the whole file at each write (object stores); by default for any `scheme://` path."""
        self._directory = epath.Path(directory)
        self._directory.mkdir(parents=True, exist_ok=True)
        self._remote = "://" in str(directory) if rewrite is None else rewrite
        self._stem = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self._part = 0
        self._file = None
        self._content = b""
        self._start_file()

    def _start_file(self) -> None:
        header = tfrecord(encode_event(time.time(), file_version=_FILE_VERSION))
        name = self._stem if self._part == 0 else f"{self._stem}.{self._part}"
        self._path = self._directory / name
        if self._remote:
            self._content = header
            self._path.write_bytes(self._content)
        else:
            self._file = open(self._path, "ab")
            self._file.write(header)
            self._file.flush()

    def write(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
        """One event holding `scalars` at `step`."""
        if not scalars:
            return
        record = tfrecord(encode_event(time.time() if wall_time is None else wall_time, step, scalars))
        if self._remote:
            if len(self._content) + len(record) > ROLL_BYTES:
                self._part += 1
                self._start_file()
            self._content += record
            self._path.write_bytes(self._content)
        else:
            self._file.write(record)
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
