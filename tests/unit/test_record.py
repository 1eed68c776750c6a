"""The record codec: round trips and every rejection kind."""
import numpy as np
import pytest

from streamsim.record import (FORMAT_VERSION, HEADER, HEADER_BYTES, KIND_SAMPLE, MAGIC,
                              EndOfStream, RecordError, Sample, decode, encode, encode_eos,
                              encode_many)

TS_MS = 1_700_000_000_123


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (3, 224, 224), (1, 1, 1),
                                   (4, 5, 7)])
def test_sample_round_trip(shape):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
    value = encode(device=7, seq=123456789012, label=9, pixels=pixels)
    assert len(value) == HEADER_BYTES + pixels.size
    out = decode(value, TS_MS, num_classes=10, expect_shape=shape, expect_device=7)
    assert isinstance(out, Sample)
    assert (out.device, out.seq, out.label) == (7, 123456789012, 9)
    assert out.pixels.dtype == np.uint8 and out.pixels.shape == shape
    np.testing.assert_array_equal(out.pixels, pixels)
    assert out.event_time_s == pytest.approx(TS_MS / 1000.0)


def test_non_contiguous_pixels_round_trip():
    pixels = np.arange(2 * 6 * 4, dtype=np.uint8).reshape(2, 6, 4)[:, ::2, :]
    out = decode(encode(0, 0, 1, pixels), TS_MS)
    np.testing.assert_array_equal(out.pixels, pixels)


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 28, 28), (2, 3, 5)])
def test_encode_many_rows_are_encode_byte_for_byte(shape):
    rng = np.random.default_rng(1)
    n = 9
    pixels = rng.integers(0, 256, size=(n,) + shape, dtype=np.uint8)
    seqs = np.array([0, 1, 2, 255, 256, 65535, 2 ** 32, 2 ** 40 + 7, 2 ** 63 - 1], np.int64)
    labels = rng.integers(0, 100, size=n)
    devices = np.array([0, 1, 7, 300, 65535, 2, 2, 2, 9])
    for dev in (devices, 7):  # one device per row, or one for all
        rows = encode_many(dev, seqs, labels, pixels)
        assert rows.dtype == np.uint8 and rows.shape == (n, HEADER_BYTES + pixels[0].size)
        for k in range(n):
            d = int(devices[k]) if isinstance(dev, np.ndarray) else dev
            assert rows[k].tobytes() == encode(d, int(seqs[k]), int(labels[k]), pixels[k])
            out = decode(memoryview(rows.reshape(-1))[k * rows.shape[1]:(k + 1) * rows.shape[1]],
                         TS_MS, expect_shape=shape, expect_device=d)
            assert (out.seq, out.label) == (seqs[k], labels[k])
            np.testing.assert_array_equal(out.pixels, pixels[k])


def test_encode_many_rejects_bad_input():
    with pytest.raises(ValueError):
        encode_many(0, [0], [0], np.zeros((1, 3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode_many(0, [0], [0], np.zeros((3, 4, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        encode_many(0, [0, 1], [0], np.zeros((2, 3, 4, 4), dtype=np.uint8))


def test_decoded_sample_is_a_frozen_read_only_view():
    value = encode(2, 3, 4, np.full((1, 2, 2), 9, np.uint8))
    out = decode(value, TS_MS)
    assert out == Sample(device=2, seq=3, label=4, pixels=out.pixels,
                         event_time_s=TS_MS / 1000.0)
    assert "Sample(device=2, seq=3, label=4" in repr(out)
    assert not out.pixels.flags.writeable and out.pixels.base is not None
    with pytest.raises(AttributeError):
        out.seq = 5


def test_encode_rejects_non_uint8_or_wrong_rank():
    with pytest.raises(ValueError):
        encode(0, 0, 0, np.zeros((3, 4, 4), dtype=np.float32))
    with pytest.raises(ValueError):
        encode(0, 0, 0, np.zeros((4, 4), dtype=np.uint8))


def test_eos_round_trip():
    out = decode(encode_eos(device=3, count=4800), TS_MS, num_classes=10,
                 expect_shape=(3, 32, 32), expect_device=3)
    assert isinstance(out, EndOfStream)
    assert (out.device, out.count) == (3, 4800)
    assert out.event_time_s == pytest.approx(TS_MS / 1000.0)


def _good(shape=(3, 4, 4), label=2, device=1):
    return encode(device, 5, label, np.zeros(shape, dtype=np.uint8))


def _header(**fields):
    values = dict(magic=MAGIC, version=FORMAT_VERSION, kind=KIND_SAMPLE, device=1, seq=0,
                  label=0, c=1, h=2, w=2)
    values.update(fields)
    return HEADER.pack(*values.values())


REJECTIONS = [
    ("short", None, {}),
    ("short", b"", {}),
    ("short", _good()[:HEADER_BYTES - 1], {}),
    ("magic", b"XX" + _good()[2:], {}),
    ("version", _header(version=FORMAT_VERSION + 1) + bytes(4), {}),
    ("device", _good(device=2), {"expect_device": 1}),
    ("length", _good()[:-1], {}),
    ("length", _good() + b"\0", {}),
    ("length", encode_eos(1, 10) + b"\0", {}),
    ("kind", _header(kind=7) + bytes(4), {}),
    ("shape", _header(c=0), {}),
    ("shape", _good(shape=(3, 4, 4)), {"expect_shape": (3, 4, 5)}),
    ("label", _good(label=10), {"num_classes": 10}),
    ("label", _good(label=-1), {}),
]


@pytest.mark.parametrize("kind, value, options", REJECTIONS)
def test_every_rejection_kind(kind, value, options):
    with pytest.raises(RecordError) as info:
        decode(value, TS_MS, **options)
    assert info.value.kind == kind
    assert str(info.value).startswith(kind)
    assert isinstance(info.value, ValueError)


def test_rejection_kinds_are_all_covered():
    """Every kind docs/DESIGN.md promises is produced by some input above."""
    assert {kind for kind, _, _ in REJECTIONS} == {"short", "magic", "version", "device",
                                                   "length", "kind", "shape", "label"}
