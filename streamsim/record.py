"""The record codec: the contract between the stream simulator and the trainer.

One Kafka record per sample. Value = a fixed 24-byte big-endian header followed by the raw
uint8 pixels in C,H,W order. The Kafka record timestamp carries the sample's event time
(milliseconds). End-of-stream markers use the same header with ``kind = KIND_EOS``, no
pixels, ``seq`` = number of samples the producer sent on that topic and ``label = -1``.

Header layout (``HEADER``):
    magic    2s   b"SD"
    version  B    FORMAT_VERSION
    kind     B    KIND_SAMPLE or KIND_EOS
    device   H    device id (rank) of the stream
    seq      Q    per-device sequence number, 0, 1, 2, ... (EOS: count of samples sent)
    label    i    class label (EOS: -1)
    shape    3H   channels, height, width (EOS: 0, 0, 0)
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

MAGIC = b"SD"
FORMAT_VERSION = 1
KIND_SAMPLE = 0
KIND_EOS = 1
HEADER = struct.Struct(">2sBBHQiHHH")
HEADER_BYTES = HEADER.size  # 24
# The same header as a numpy record, for encoding many samples at once (``encode_many``).
HEADER_DTYPE = np.dtype([("magic", "S2"), ("version", "u1"), ("kind", "u1"), ("device", ">u2"),
                         ("seq", ">u8"), ("label", ">i4"), ("shape", ">u2", (3,))])
assert HEADER_DTYPE.itemsize == HEADER_BYTES

# Event-time origin of virtually paced streams: Kafka timestamps must be positive epoch ms,
# so virtual stream time t seconds is published as (VIRTUAL_EPOCH_S + t) * 1000.
VIRTUAL_EPOCH_S = 1_000_000_000.0


def event_time_ms(start_ms: float, offset_s):
    """Kafka timestamp of a sample ``offset_s`` seconds into a stream that started at
    ``start_ms``: whole milliseconds, rounded down (a record never claims a later time than
    its schedule; 1e-6 ms absorbs float error in k / rate). The one formula every producer
    and the in-process source use, so Kafka and in-process streams agree exactly. Works on
    numpy arrays."""
    ms = np.floor(start_ms + np.asarray(offset_s, np.float64) * 1000.0 + 1e-6)
    return int(ms) if ms.ndim == 0 else ms.astype(np.int64)


class RecordError(ValueError):
    """A record that failed validation. ``kind`` is a short stable name for counting."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class Sample:
    device: int
    seq: int
    label: int
    pixels: np.ndarray  # uint8, shape (C, H, W)
    event_time_s: float  # from the Kafka timestamp (or the in-process schedule)


@dataclass(frozen=True)
class EndOfStream:
    device: int
    count: int  # samples the producer sent on this topic
    event_time_s: float


def encode(device: int, seq: int, label: int, pixels: np.ndarray) -> bytes:
    """Encode one sample. ``pixels`` must be uint8 with shape (C, H, W)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels must be uint8 (C,H,W), got {pixels.dtype} {pixels.shape}")
    c, h, w = pixels.shape
    header = HEADER.pack(MAGIC, FORMAT_VERSION, KIND_SAMPLE, device, seq, label, c, h, w)
    return header + np.ascontiguousarray(pixels).tobytes()


def encode_many(devices, seqs, labels, pixels: np.ndarray) -> np.ndarray:
    """Encode ``len(seqs)`` samples at once: a uint8 array with one record value per row (row
    ``k`` is byte for byte ``encode(devices[k], seqs[k], labels[k], pixels[k])``; ``devices``
    may be one int for all). ``pixels`` must be uint8 with shape (N, C, H, W)."""
    if pixels.dtype != np.uint8 or pixels.ndim != 4:
        raise ValueError(f"pixels must be uint8 (N,C,H,W), got {pixels.dtype} {pixels.shape}")
    n, c, h, w = pixels.shape
    if len(seqs) != n or len(labels) != n:
        raise ValueError(f"{len(seqs)} seqs and {len(labels)} labels for {n} samples")
    out = np.empty((n, HEADER_BYTES + c * h * w), dtype=np.uint8)
    header = out[:, :HEADER_BYTES].view(HEADER_DTYPE)[:, 0]
    header["magic"] = MAGIC
    header["version"] = FORMAT_VERSION
    header["kind"] = KIND_SAMPLE
    header["device"] = devices
    header["seq"] = seqs
    header["label"] = labels
    header["shape"] = (c, h, w)
    out[:, HEADER_BYTES:] = pixels.reshape(n, -1)
    return out


def encode_eos(device: int, count: int) -> bytes:
    """Encode the end-of-stream marker a producer writes when it finishes a topic."""
    return HEADER.pack(MAGIC, FORMAT_VERSION, KIND_EOS, device, count, -1, 0, 0, 0)


def decode(value: bytes | None, timestamp_ms: int, num_classes: int | None = None,
           expect_shape: tuple[int, int, int] | None = None,
           expect_device: int | None = None) -> Sample | EndOfStream:
    """Decode and validate one record value; raise RecordError naming what is wrong."""
    if value is None or len(value) < HEADER_BYTES:
        raise RecordError("short", f"record of {0 if value is None else len(value)} bytes, "
                                   f"header needs {HEADER_BYTES}")
    magic, version, kind, device, seq, label, c, h, w = HEADER.unpack_from(value)
    if magic != MAGIC:
        raise RecordError("magic", f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise RecordError("version", f"format version {version}, this reader knows "
                                     f"{FORMAT_VERSION}")
    if expect_device is not None and device != expect_device:
        raise RecordError("device", f"device {device} on the stream of device {expect_device}")
    event_time_s = timestamp_ms / 1000.0
    if kind == KIND_EOS:
        if len(value) != HEADER_BYTES:
            raise RecordError("length", f"end-of-stream marker of {len(value)} bytes")
        return EndOfStream(device=device, count=seq, event_time_s=event_time_s)
    if kind != KIND_SAMPLE:
        raise RecordError("kind", f"unknown record kind {kind}")
    if c == 0 or h == 0 or w == 0:
        raise RecordError("shape", f"empty shape {(c, h, w)}")
    if expect_shape is not None and (c, h, w) != tuple(expect_shape):
        raise RecordError("shape", f"shape {(c, h, w)}, expected {tuple(expect_shape)}")
    if len(value) != HEADER_BYTES + c * h * w:
        raise RecordError("length", f"{len(value) - HEADER_BYTES} pixel bytes for shape "
                                    f"{(c, h, w)} ({c * h * w} expected)")
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise RecordError("label", f"label {label} outside [0, {num_classes})")
    # the hot path of every consumer: a view on the value's bytes (read-only, no copy) and
    # the frozen Sample built without five object.__setattr__ calls (same object otherwise)
    sample = _new_object(Sample)
    sample.__dict__.update(device=device, seq=seq, label=label,
                           pixels=_ndarray((c, h, w), _UINT8, value, HEADER_BYTES),
                           event_time_s=event_time_s)
    return sample


_new_object = object.__new__
_ndarray = np.ndarray
_UINT8 = np.dtype(np.uint8)
