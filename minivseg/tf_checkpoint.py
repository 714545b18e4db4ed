"""Read a TensorFlow checkpoint (a tensor bundle) into numpy arrays, without TensorFlow.

A checkpoint ``PREFIX`` is ``PREFIX.index``, a leveldb table that maps each tensor name to a
serialized ``BundleEntryProto``, plus the raw tensor bytes in ``PREFIX.data-0000S-of-0000N``.
The format comes from TensorFlow's ``core/protobuf/tensor_bundle.proto`` and
``core/util/tensor_bundle/tensor_bundle.cc`` and from leveldb's ``doc/table_format.md``:

- the ``.index`` ends in a 48-byte footer: the metaindex and index block handles (each a varint
  offset and a varint size), zero padding, the magic number 0xdb4775248b80fb57 (fixed64);
- a block holds entries ``varint shared, varint unshared, varint value_size, key[shared:],
  value`` (a key keeps ``shared`` bytes of the key before it), then the uint32 offsets of the
  restart entries (shared == 0) and their count; a 5-byte trailer follows each block: the
  compression type (0 none, 1 snappy) and the masked crc32c of block + type byte;
- the index block maps a key >= every key of a data block to that block's handle; the data
  blocks map "" to a ``BundleHeaderProto`` (num_shards, endianness, version) and each tensor
  name to a ``BundleEntryProto`` (dtype, shape, shard_id, offset, size, masked crc32c, slices);
- a DT_STRING tensor is stored as varint64 lengths, a 4-byte checksum of them, then the bytes.

Deliberate differences from TF's BundleReader: snappy blocks (TF writes uncompressed tables),
partitioned variables (entries with slices, e.g. from ``MaxShardSizePolicy``) and quantized,
float8, int4 and variant dtypes raise `CheckpointFormatError`; the metaindex block (empty in
TF's tables) is not read; bfloat16 comes back as float32 (exact), DT_STRING as an object array
of ``bytes``; arrays are in native byte order. ``verify=True`` (the default, as in TF) checks the
crc32c of every block and tensor, at ~250 MB/s on one core (16384 lanes at once in numpy).
"""

import collections
import contextlib
import functools
import os
from typing import NamedTuple

import numpy as np

MAGIC = 0xDB4775248B80FB57
FOOTER_SIZE = 48
# DataType enum of core/framework/types.proto -> (TF dtype name, numpy dtype on disk).
DTYPES = {
    1: ("float32", "f4"), 2: ("float64", "f8"), 3: ("int32", "i4"), 4: ("uint8", "u1"),
    5: ("int16", "i2"), 6: ("int8", "i1"), 7: ("string", None), 8: ("complex64", "c8"),
    9: ("int64", "i8"), 10: ("bool", "?"), 14: ("bfloat16", "u2"), 17: ("uint16", "u2"),
    18: ("complex128", "c16"), 19: ("float16", "f2"), 22: ("uint32", "u4"), 23: ("uint64", "u8"),
}  # fmt: skip
_Entry = collections.namedtuple("_Entry", "dtype shape shard offset size crc num_slices")


class CheckpointFormatError(ValueError):
    """A checkpoint file is missing, truncated, corrupted or uses a feature this reader lacks."""


class VariableInfo(NamedTuple):
    dtype: str  # TF's dtype name: "float32", "bfloat16", "string", ...
    shape: tuple[int, ...]


def list_variables(prefix) -> dict[str, VariableInfo]:
    """{name: (TF dtype name, shape)} of every tensor in the checkpoint; reads only the index."""
    entries = _read_index(os.fspath(prefix).removesuffix(".index"), verify=False)[1]
    return {name: VariableInfo(_dtype(e)[0], e.shape) for name, e in entries.items()}


def load_variables(prefix, names=None, *, verify: bool = True) -> dict[str, np.ndarray]:
    """{name: array} of every tensor (or of ``names``), reading one byte range at a time.

    bfloat16 comes back as float32, DT_STRING as an object array of bytes; ``verify`` checks
    the crc32c of the index blocks and of every tensor read.
    """
    prefix = os.fspath(prefix).removesuffix(".index")  # also accept PREFIX.index
    header, entries = _read_index(prefix, verify)
    if names is not None:
        if missing := sorted(set(names) - set(entries)):
            raise KeyError(f"{prefix} has no variable(s) {missing}")
        entries = {name: entries[name] for name in names}
    order = ">" if header.get(2, 0) == 1 else "<"  # BundleHeaderProto.Endianness: BIG = 1
    num_shards, out, files = header.get(1, 1), {}, {}
    with contextlib.ExitStack() as stack:
        for name, e in sorted(entries.items(), key=lambda item: (item[1].shard, item[1].offset)):
            dtype_name, code = _dtype(e)
            unsupported = f"partitioned into {e.num_slices} slices" if e.num_slices else None
            if code is None and dtype_name != "string":
                unsupported = f"of dtype {dtype_name}"
            if unsupported:
                raise CheckpointFormatError(
                    f"{prefix}.index: {name!r} is {unsupported}, which this reader does not support"
                )
            if e.shard not in files:
                path = f"{prefix}.data-{e.shard:05d}-of-{num_shards:05d}"
                if e.shard >= num_shards or not os.path.isfile(path):
                    raise CheckpointFormatError(f"{path} is missing (it holds {name!r})")
                files[e.shard] = stack.enter_context(open(path, "rb"))
            out[name] = _tensor(files[e.shard], name, e, order, verify)
    return {name: out[name] for name in entries}


def _dtype(e: _Entry) -> tuple[str, str | None]:
    return DTYPES.get(e.dtype, (f"DataType {e.dtype}", None))


def _varint(buf, pos: int) -> tuple[int, int]:
    """(value, position after it) of the little-endian base-128 varint at ``buf[pos]``."""
    value = shift = 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _fields(buf) -> list[tuple[int, int | bytes]]:
    """[(field number, value)] of a protobuf message: ints for varint/fixed, bytes for the rest."""
    fields, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):  # fixed64, fixed32
            width = 8 if wire == 1 else 4
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = bytes(buf[pos : pos + length]), pos + length
        else:
            raise CheckpointFormatError(f"protobuf wire type {wire} is not valid here")
        fields.append((key >> 3, value))
    if pos != len(buf):
        raise CheckpointFormatError("a protobuf record runs past its end")
    return fields


def _entry(buf) -> _Entry:
    """Decode a BundleEntryProto (field 2 is a TensorShapeProto: repeated Dim{int64 size = 1})."""
    value, dims, num_slices = {1: 0, 3: 0, 4: 0, 5: 0, 6: 0}, (), 0
    for number, field in _fields(buf):
        if number == 2:
            dims = tuple(dict(_fields(dim)).get(1, 0) for n, dim in _fields(field) if n == 2)
        elif number == 7:
            num_slices += 1
        else:
            value[number] = field
    return _Entry(value[1], dims, value[3], value[4], value[5], value[6], num_slices)


def _block(index: bytes, handle: bytes, verify: bool) -> bytes:
    """The contents of the block at ``handle`` (varint offset, varint size), trailer checked."""
    offset, pos = _varint(handle, 0)
    size, _ = _varint(handle, pos)
    end = offset + size
    if end + 5 > len(index) - FOOTER_SIZE:
        raise CheckpointFormatError(f"block [{offset}, {end}) runs past the table: truncated")
    if index[end] != 0:  # leveldb's CompressionType: 0 none, 1 snappy
        kind = {1: "snappy-compressed"}.get(index[end], f"of compression type {index[end]}")
        raise CheckpointFormatError(f"block at {offset} is {kind}; only uncompressed is supported")
    stored = int.from_bytes(index[end + 1 : end + 5], "little")
    if verify and mask(crc32c(index[offset : end + 1])) != stored:
        raise CheckpointFormatError(f"block at {offset} fails its crc32c check: corrupted")
    return index[offset:end]


def _block_entries(block: bytes) -> list[tuple[bytes, bytes]]:
    """[(key, value)] of one block, keys rebuilt from the shared-prefix compression."""
    num_restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * num_restarts
    if end < 0:
        raise CheckpointFormatError("a block's restart array runs past the block")
    restarts = set(np.frombuffer(block, "<u4", num_restarts, end).tolist())
    entries, key, pos = [], b"", 0
    while pos < end:
        restarts.discard(pos)
        shared, pos = _varint(block, pos)
        unshared, pos = _varint(block, pos)
        value_size, pos = _varint(block, pos)
        if shared > len(key):
            raise CheckpointFormatError("a key shares more bytes than the key before it has")
        key, pos = key[:shared] + block[pos : pos + unshared], pos + unshared
        entries.append((key, block[pos : pos + value_size]))
        pos += value_size
    if pos != end or restarts:
        raise CheckpointFormatError("a block's entries do not match its restart array")
    return entries


def _read_index(prefix: str, verify: bool) -> tuple[dict, dict[str, _Entry]]:
    """(BundleHeaderProto fields, {tensor name: entry}) from ``PREFIX.index``."""
    path = f"{prefix}.index"
    if not os.path.isfile(path):
        raise CheckpointFormatError(f"{path} is missing")
    with open(path, "rb") as f:
        index = f.read()
    header, entries = None, {}
    try:
        if len(index) < FOOTER_SIZE or int.from_bytes(index[-8:], "little") != MAGIC:
            raise CheckpointFormatError(
                f"no table footer ({len(index)} bytes, bad magic number): truncated, or not "
                "a checkpoint index"
            )
        _, pos = _varint(index, len(index) - FOOTER_SIZE)  # the metaindex handle: skipped
        _, pos = _varint(index, pos)
        for _, handle in _block_entries(_block(index, index[pos:], verify)):
            for key, value in _block_entries(_block(index, handle, verify)):
                if key == b"":
                    header = dict(_fields(value))
                elif not key.startswith(b"\x00"):  # b"\x00..." keys hold a variable's slices
                    entries[key.decode()] = _entry(value)
    except (IndexError, UnicodeDecodeError) as error:
        raise CheckpointFormatError(f"{path}: corrupted record ({error})") from None
    except CheckpointFormatError as error:
        raise CheckpointFormatError(f"{path}: {error}") from None
    if header is None:
        raise CheckpointFormatError(f"{path} has no bundle header (the entry with key '')")
    return header, entries


def _tensor(f, name: str, e: _Entry, order: str, verify: bool) -> np.ndarray:
    """Read one tensor's byte range from its open shard ``f`` and decode it."""
    dtype_name, code = _dtype(e)
    count, file_size = int(np.prod(e.shape)), os.fstat(f.fileno()).st_size
    problem = None
    if e.offset + e.size > file_size:
        problem = (
            f"is bytes [{e.offset}, {e.offset + e.size}) of a {file_size}-byte file: truncated"
        )
    elif code is not None and e.size != (needed := count * np.dtype(code).itemsize):
        problem = f"has {e.size} bytes, but {dtype_name} {e.shape} needs {needed}"
    if problem:
        raise CheckpointFormatError(f"{f.name}: {name!r} {problem}")
    raw = np.empty(e.size, np.uint8)
    f.seek(e.offset)
    f.readinto(memoryview(raw))
    if code is None:
        array, checked = _strings(raw.tobytes(), count, order, f"{f.name}: {name!r}")
    else:
        array, checked = raw.view(order + code), raw
    if verify and mask(crc32c(checked)) != e.crc:
        raise CheckpointFormatError(f"{f.name}: {name!r} fails its crc32c check: corrupted")
    if dtype_name == "bfloat16":  # the high half of a float32
        array = (array.astype(np.uint32) << 16).view(np.float32)
    elif not array.dtype.isnative:
        array = array.astype(array.dtype.newbyteorder("="))
    return array.reshape(e.shape)


def _strings(buf: bytes, count: int, order: str, where: str) -> tuple[np.ndarray, bytes]:
    """(object array of bytes, the bytes whose crc32c TF stores) of a DT_STRING tensor."""
    lengths, pos = [], 0
    for _ in range(count):
        length, pos = _varint(buf, pos)
        lengths.append(length)
    if pos + 4 + sum(lengths) != len(buf):
        raise CheckpointFormatError(f"{where}: string lengths do not add up to the tensor size")
    byteorder = "little" if order == "<" else "big"  # TF checksums lengths as uint32 or uint64
    checked = [n.to_bytes(4 if n < 2**32 else 8, byteorder) for n in lengths] + [buf[pos:]]
    out, pos = np.empty(count, object), pos + 4
    for i, length in enumerate(lengths):
        out[i], pos = buf[pos : pos + length], pos + length
    return out, b"".join(checked)


def mask(crc: int) -> int:
    """leveldb's masked crc32c (stored so that a crc of data holding crcs stays informative)."""
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# crc32c (Castagnoli, reflected, init and final xor 0xFFFFFFFF) is linear over GF(2): from a
# zero state, crc0(A + B) = Z^|B|(crc0(A)) ^ crc0(B), where Z^n (feed n zero bytes) is a 32x32
# bit matrix, kept as its 32 columns and applied with 4 byte tables. A chunk of MAX_LANES lanes
# of LANE_BYTES bytes is hashed as that many crcs at once, then merged pairwise.
LANE_BYTES, MAX_LANES = 256, 16384


@functools.cache
def _table() -> np.ndarray:
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0x82F63B78), table >> 1)
    return table.astype(np.uint32)


@functools.cache
def _zeros_operator(log2_bytes: int) -> tuple[list[int], np.ndarray]:
    """Z^(2^log2_bytes) as (32 columns, (4, 256) byte tables)."""
    if log2_bytes == 0:
        columns = [int(_table()[(1 << k) & 0xFF]) ^ ((1 << k) >> 8) for k in range(32)]
    else:
        half = _zeros_operator(log2_bytes - 1)[0]
        columns = [_apply(half, _apply(half, 1 << k)) for k in range(32)]
    bits = ((np.arange(256)[:, None] >> np.arange(8)) & 1).astype(np.uint32)  # (256, 8)
    tables = np.array(columns, np.uint32).reshape(4, 1, 8) * bits  # (4, 256, 8)
    return columns, np.bitwise_xor.reduce(tables, axis=2)


def _apply(columns: list[int], x: int) -> int:
    y = 0
    for column in columns:
        y, x = y ^ (column if x & 1 else 0), x >> 1
    return y


@functools.cache
def _word_tables() -> tuple[np.ndarray, np.ndarray]:
    """Z^4 of the low and of the high 16 bits of a state: one 4-byte word per two lookups."""
    t, v = _zeros_operator(2)[1], np.arange(65536)
    return t[0][v & 255] ^ t[1][v >> 8], t[2][v & 255] ^ t[3][v >> 8]


def _crc0_chunk(chunk: np.ndarray, lanes: int) -> int:
    """Zero-initialised crc32c state after ``chunk`` (lanes * LANE_BYTES bytes)."""
    low, high = _word_tables()
    words = chunk.view("<u4").reshape(lanes, LANE_BYTES // 4).T.copy()  # (words per lane, lanes)
    state, a, b = (np.zeros(lanes, np.uint32) for _ in range(3))
    for word in words:  # state = Z^4(state ^ word), in every lane
        np.bitwise_xor(state, word, out=state)
        np.take(low, np.bitwise_and(state, 0xFFFF, out=a), out=b)
        np.take(high, np.right_shift(state, 16, out=a), out=state)
        np.bitwise_xor(state, b, out=state)
    level = LANE_BYTES.bit_length() - 1  # merge lane pairs, each 2^level bytes long
    while len(state) > 1:
        t, left = _zeros_operator(level)[1], state[0::2]
        shifted = t[0][left & 255] ^ t[1][(left >> 8) & 255] ^ t[2][(left >> 16) & 255]
        state, level = shifted ^ t[3][left >> 24] ^ state[1::2], level + 1
    return int(state[0])


def crc32c(data) -> int:
    """CRC-32C (Castagnoli) of a bytes-like object or uint8 array, as in leveldb and TF."""
    data = data.reshape(-1) if isinstance(data, np.ndarray) else np.frombuffer(data, np.uint8)
    n = data.size
    if n < 4096:
        table, crc = _table().tolist(), 0xFFFFFFFF
        for byte in data.tobytes():
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        return crc ^ 0xFFFFFFFF
    lanes = min(MAX_LANES, 1 << (-(-n // LANE_BYTES) - 1).bit_length())
    chunk = lanes * LANE_BYTES
    head = n - (n - 4) // chunk * chunk  # 4 <= head < chunk + 4 bytes, copied behind zeros
    first = np.zeros(-(-head // chunk) * chunk, np.uint8)  # (which keep a zero state at zero)
    start = first.size - head
    first[start:] = data[:head]
    first[start : start + 4] ^= 0xFF  # the initial state 0xFFFFFFFF = xor into the first word
    pieces = [*first.reshape(-1, chunk), *(data[s : s + chunk] for s in range(head, n, chunk))]
    shift, state = _zeros_operator(chunk.bit_length() - 1)[0], 0
    for piece in pieces:
        state = _apply(shift, state) ^ _crc0_chunk(piece, lanes)
    return state ^ 0xFFFFFFFF
