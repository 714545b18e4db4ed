"""tf_checkpoint: TF checkpoints read without TensorFlow, checked against what TF itself read.

The fixtures in tests/fixtures/tf_checkpoint/ were written by TensorFlow (see
tests/fixtures/README.md); ``expected.npz`` holds what ``tf.train.load_checkpoint`` read back.
A small table writer below builds bundles that TF would not write (big-endian, tiny blocks,
wrong sizes). The last test compares with TensorFlow directly and is skipped without it.
"""

import json
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from minivseg import tf_checkpoint
from minivseg.tf_checkpoint import CheckpointFormatError, crc32c, list_variables, load_variables

FIXTURES = Path(__file__).parent / "fixtures" / "tf_checkpoint"
PREFIX = FIXTURES / "ckpt"
GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def test_list_variables_gives_tensorflows_dtypes_and_shapes():
    expected = json.loads((FIXTURES / "expected_dtypes.json").read_text())
    found = list_variables(PREFIX)
    assert {name: [info.dtype, list(info.shape)] for name, info in found.items()} == expected
    assert len(found) == 54 and {"bfloat16", "bool", "string", "uint8"} <= {
        d for d, _ in found.values()
    }


def test_load_variables_gives_what_tensorflow_read():
    expected = np.load(FIXTURES / "expected.npz")
    found = load_variables(str(PREFIX) + ".index")  # PREFIX.index is accepted too
    assert set(found) == set(expected.files) | {GRAPH}
    for name in expected.files:
        if expected[name].dtype.kind == "S":  # strings: npz keeps them as fixed-width bytes
            assert found[name].dtype == object and list(found[name]) == list(expected[name])
        else:
            assert found[name].dtype == expected[name].dtype, name
            assert found[name].shape == expected[name].shape, name
            assert np.array_equal(found[name], expected[name]), name
    assert list(found["model/strings/.ATTRIBUTES/VARIABLE_VALUE"]) == [
        b"abc",
        b"",
        b"\x00\xff binary",
    ]
    assert found["model/empty/.ATTRIBUTES/VARIABLE_VALUE"].shape == (0, 3)
    assert found["model/scalar/.ATTRIBUTES/VARIABLE_VALUE"] == np.float32(3.25)
    graph = found[GRAPH]
    assert graph.shape == () and b"block_39" in graph.item()  # a TrackableObjectGraph proto


def test_names_selects_variables_and_rejects_unknown_ones():
    names = ["model/int8/.ATTRIBUTES/VARIABLE_VALUE", "model/float64/.ATTRIBUTES/VARIABLE_VALUE"]
    found = load_variables(PREFIX, names)
    assert list(found) == names
    assert np.array_equal(found[names[0]], np.load(FIXTURES / "expected.npz")[names[0]])
    with pytest.raises(KeyError, match="no_such_variable"):
        load_variables(PREFIX, ["no_such_variable"])


def test_two_shard_bundle():
    expected = np.load(FIXTURES / "sharded" / "expected.npz")
    assert sorted(p.name for p in (FIXTURES / "sharded").glob("ckpt.data-*")) == [
        "ckpt.data-00000-of-00002",
        "ckpt.data-00001-of-00002",
    ]
    found = load_variables(FIXTURES / "sharded" / "ckpt")
    assert sorted(found) == sorted(expected.files) == ["x0", "x1", "x2", "x3"]
    for name in expected.files:
        assert np.array_equal(found[name], expected[name])


def test_partitioned_variable_is_listed_but_refused_by_name():
    prefix = FIXTURES / "partitioned" / "ckpt"
    assert list_variables(prefix)["big/.ATTRIBUTES/VARIABLE_VALUE"] == ("float32", (100,))
    with pytest.raises(CheckpointFormatError, match=r"'big/.ATTRIBUTES/VARIABLE_VALUE' is partit"):
        load_variables(prefix)
    assert list(load_variables(prefix, [GRAPH])) == [GRAPH]


def naive_crc32c(data: bytes) -> int:
    """Bit by bit: the Castagnoli polynomial, reflected, init and final xor 0xFFFFFFFF."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_crc32c_against_known_values_and_a_bitwise_version(monkeypatch):
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc32c(bytes(32)) == 0x8A9136AA and crc32c(b"\xff" * 32) == 0x62A8AB43  # RFC 3720
    rng = np.random.default_rng(0)
    sizes = [0, 1, 3, 4095, 4096, 4097, 4099, 4100, 5000, 8192, 12289]
    for max_lanes in (tf_checkpoint.MAX_LANES, 4):  # 4 lanes: many chunks, every head size
        monkeypatch.setattr(tf_checkpoint, "MAX_LANES", max_lanes)
        for size in sizes:
            data = rng.integers(0, 256, size, dtype=np.uint8)
            assert crc32c(data) == crc32c(data.tobytes()) == naive_crc32c(data.tobytes()), size
    assert crc32c(b"abc") != zlib.crc32(b"abc")  # not the zlib polynomial


# A minimal writer of leveldb tables and tensor bundles, the reader's format read backwards.
def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(number: int, value) -> bytes:
    if isinstance(value, int):
        return varint(number << 3) + varint(value)
    return varint(number << 3 | 2) + varint(len(value)) + value


def table(entries: list, per_block: int, restart_interval: int) -> bytes:
    """A leveldb table of sorted (key, value) pairs, ``per_block`` entries per data block."""
    out = bytearray()

    def block(pairs) -> bytes:
        body, restarts, previous = bytearray(), [], b""
        for i, (key, value) in enumerate(pairs):
            shared = 0 if i % restart_interval == 0 else len(os.path.commonprefix([previous, key]))
            restarts += [len(body)] if shared == 0 else []
            body += varint(shared) + varint(len(key) - shared) + varint(len(value))
            body += key[shared:] + value
            previous = key
        body += b"".join(r.to_bytes(4, "little") for r in restarts)
        body += len(restarts).to_bytes(4, "little")
        handle = varint(len(out)) + varint(len(body))
        trailer = tf_checkpoint.mask(crc32c(bytes(body) + b"\0")).to_bytes(4, "little")
        out.extend(body + b"\0" + trailer)
        return handle

    groups = [entries[i : i + per_block] for i in range(0, len(entries), per_block)]
    index = [(group[-1][0], block(group)) for group in groups]
    metaindex = block([])
    footer = (metaindex + block(index)).ljust(40, b"\0")
    return bytes(out + footer + tf_checkpoint.MAGIC.to_bytes(8, "little"))


DTYPE_ENUMS = {"f4": 1, "f8": 2, "i4": 3, "u1": 4, "i2": 5, "i1": 6, "i8": 9, "b1": 10, "f2": 19}


def write_bundle(prefix, arrays, big_endian=False, per_block=4, restart_interval=3, extra=None):
    """Write ``arrays`` as a one-shard bundle; ``extra[name]`` is appended to its entry proto
    (a repeated scalar field overrides the first: protobuf keeps the last)."""
    data, entries = bytearray(), [(b"", field(1, 1) + field(2, int(big_endian)))]
    for name in sorted(arrays):
        array = arrays[name]
        raw = array.astype(array.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
        shape = b"".join(field(2, field(1, n)) for n in array.shape)
        crc = tf_checkpoint.mask(crc32c(raw)).to_bytes(4, "little")
        proto = field(1, DTYPE_ENUMS[array.dtype.str[1:]]) + field(2, shape)
        proto += field(4, len(data)) + field(5, len(raw)) + varint(6 << 3 | 5) + crc
        entries.append((name.encode(), proto + (extra or {}).get(name, b"")))
        data += raw
    Path(f"{prefix}.index").write_bytes(table(entries, per_block, restart_interval))
    Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def test_many_blocks_and_restarts(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"model/layer_{i // 10}/sub_{i % 10}/{w}" for i in range(60) for w in ("k", "b")]
    arrays = {name: rng.standard_normal(rng.integers(0, 4, 2)).astype("f4") for name in names}
    arrays["int64"], arrays["mask"] = np.arange(-3, 3), np.array([True, False])
    write_bundle(tmp_path / "ckpt", arrays, per_block=7, restart_interval=3)
    found = load_variables(tmp_path / "ckpt")
    assert sorted(found) == sorted(arrays)  # 122 entries + header: 18 blocks, restarts every 3
    for name, array in arrays.items():
        assert found[name].dtype == array.dtype and np.array_equal(found[name], array), name


def test_big_endian_bundle_comes_back_in_native_order(tmp_path):
    arrays = {"a": np.arange(6, dtype="f8").reshape(2, 3), "b": np.array([-2, 70000], "i4")}
    write_bundle(tmp_path / "ckpt", arrays, big_endian=True)
    found = load_variables(tmp_path / "ckpt")
    for name, array in arrays.items():
        assert found[name].dtype.isnative and np.array_equal(found[name], array)


def test_size_that_does_not_match_dtype_and_shape(tmp_path):
    write_bundle(tmp_path / "ckpt", {"w": np.zeros((2, 3), "f4")}, extra={"w": field(5, 20)})
    with pytest.raises(CheckpointFormatError, match=r"'w' has 20 bytes, but float32 \(2, 3\)"):
        load_variables(tmp_path / "ckpt", verify=False)


def copy_fixture(tmp_path) -> tuple[Path, Path, Path]:
    for path in FIXTURES.glob("ckpt.*"):
        shutil.copy(path, tmp_path)
    return tmp_path / "ckpt", tmp_path / "ckpt.index", tmp_path / "ckpt.data-00000-of-00001"


def test_missing_files(tmp_path):
    prefix, index, data = copy_fixture(tmp_path)
    data.unlink()
    with pytest.raises(CheckpointFormatError, match="ckpt.data-00000-of-00001 is missing"):
        load_variables(prefix)
    assert len(list_variables(prefix)) == 54  # listing needs only the index
    index.unlink()
    with pytest.raises(CheckpointFormatError, match=r"ckpt\.index is missing"):
        list_variables(prefix)


@pytest.mark.parametrize("keep", [0, 20, 47, 1000, -1])
def test_truncated_index(tmp_path, keep):
    prefix, index, _ = copy_fixture(tmp_path)
    index.write_bytes(index.read_bytes()[:keep])
    with pytest.raises(CheckpointFormatError, match=r"ckpt\.index: .*truncated"):
        list_variables(prefix)


def test_bad_blocks_in_the_index(tmp_path):
    prefix, index, _ = copy_fixture(tmp_path)
    good = index.read_bytes()
    index.write_bytes(good[:-1] + b"\x00")
    with pytest.raises(CheckpointFormatError, match="bad magic number"):
        list_variables(prefix)
    corrupted = bytearray(good)
    corrupted[200] ^= 0x01  # inside the data block
    index.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointFormatError, match=r"ckpt\.index: block at 0 fails its crc32c"):
        load_variables(prefix)
    snappy = bytearray(good)
    snappy[-tf_checkpoint.FOOTER_SIZE - 5] = 1  # the index block's compression type
    index.write_bytes(bytes(snappy))
    with pytest.raises(CheckpointFormatError, match="snappy-compressed"):
        list_variables(prefix)


def test_truncated_and_corrupted_data_shard(tmp_path):
    prefix, _, data = copy_fixture(tmp_path)
    name = "model/float32/.ATTRIBUTES/VARIABLE_VALUE"
    expected = np.load(FIXTURES / "expected.npz")[name]
    good = data.read_bytes()
    start = good.index(expected.tobytes())
    corrupted = bytearray(good)
    corrupted[start + 5] ^= 0x10
    data.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointFormatError, match=f"'{name}' fails its crc32c check"):
        load_variables(prefix, [name])
    changed = load_variables(prefix, [name], verify=False)[name]
    assert not np.array_equal(changed, expected)  # without verify the flipped bit goes through
    data.write_bytes(good[: start + 10])
    with pytest.raises(
        CheckpointFormatError, match=f"ckpt.data-00000-of-00001: '{name}' is bytes .* truncated"
    ):
        load_variables(prefix, [name])


def test_matches_tensorflow_on_random_checkpoints(tmp_path):
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    dtypes = [tf.float32, tf.float64, tf.float16, tf.bfloat16, tf.int8, tf.int16, tf.int32]
    dtypes += [tf.int64, tf.uint8, tf.bool]
    shapes = [(), (0,), (3, 0, 2), (7,), (2, 3, 4), (1, 1, 5, 3)]
    variables = {}
    for i in range(1500):  # long random names: the index needs several 256 KiB blocks
        name = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), 150))
        dtype, shape = dtypes[i % len(dtypes)], shapes[i % len(shapes)]
        value = rng.standard_normal(shape) * 50
        variables[name] = tf.Variable(tf.cast(value, dtype) if dtype != tf.bool else value > 0)
    variables["text"] = tf.Variable([[b"a", b""], [b"longer string", b"\x00"]])
    written = [tf.train.Checkpoint(model=variables).write(str(tmp_path / "one" / "ckpt"))]

    graph = tf.Graph()  # TF1's sharded Saver: one data shard per device
    (tmp_path / "two").mkdir()
    with graph.as_default():
        for i in range(6):
            with tf.device(f"/cpu:{i % 2}"):
                init = rng.standard_normal((i + 1, 2)).astype(np.float32)
                tf.compat.v1.get_variable(f"scope/v{i}", initializer=init)
        saver = tf.compat.v1.train.Saver(sharded=True)
        config = tf.compat.v1.ConfigProto(device_count={"CPU": 2})
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            written.append(
                saver.save(session, str(tmp_path / "two" / "ckpt"), write_meta_graph=False)
            )
    assert len(list((tmp_path / "two").glob("ckpt.data-*-of-00002"))) == 2

    index = (tmp_path / "one" / "ckpt.index").read_bytes()
    _, pos = tf_checkpoint._varint(index, len(index) - tf_checkpoint.FOOTER_SIZE)
    _, pos = tf_checkpoint._varint(index, pos)
    index_block = tf_checkpoint._block(index, index[pos:], verify=True)
    assert len(tf_checkpoint._block_entries(index_block)) >= 2  # several data blocks

    checked = 0
    for prefix in written:
        reader = tf.train.load_checkpoint(prefix)
        dtype_map, shape_map = (
            reader.get_variable_to_dtype_map(),
            reader.get_variable_to_shape_map(),
        )
        listed, found = list_variables(prefix), load_variables(prefix)
        assert set(listed) == set(found) == set(dtype_map)
        for name, dtype in dtype_map.items():
            assert listed[name] == (dtype.name, tuple(shape_map[name])), name
            expected = reader.get_tensor(name)
            if dtype == tf.string:
                assert np.array_equal(found[name], np.asarray(expected, object)), name
                continue
            expected = np.asarray(expected, np.float32 if dtype == tf.bfloat16 else None)
            assert found[name].dtype == expected.dtype and found[name].shape == expected.shape
            assert np.array_equal(found[name], expected), name
            checked += 1
    assert checked == 1500 + 6  # every numeric variable, plus "text" and two object graphs

    # MaxShardSizePolicy splits a tensor that straddles two shards into slices: refused by name.
    policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=1000)
    options = tf.train.CheckpointOptions(experimental_sharding_callback=policy)
    split = {f"w{i}": tf.Variable(rng.standard_normal(100).astype(np.float32)) for i in range(4)}
    prefix = tf.train.Checkpoint(**split).write(str(tmp_path / "split" / "ckpt"), options=options)
    sliced = [name for name in list_variables(prefix) if name.startswith("w")]
    assert len(sliced) == 4 and len(list((tmp_path / "split").glob("ckpt.data-*"))) > 1
    with pytest.raises(CheckpointFormatError, match="is partitioned into"):
        load_variables(prefix, sliced)
