"""elmo_jax.torch_pickle: torch.save files of state dicts read without torch and without running their code.

The real files under tests/fixtures/torch_pickle were written by torch.save in both of its formats, with
what torch.load reads from them (tests/fixtures/torch_pickle/make.py regenerates them with torch). The
malicious and malformed files are crafted here with pickle opcodes, in the same two layouts.
"""

import os
import pathlib
import pickle
import struct
import zipfile

import numpy as np
import pytest

from elmo_jax.torch_pickle import LEGACY_MAGIC, TorchPickleError, load_state_dict

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "torch_pickle"
FORMATS = ["zip", "legacy"]
SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


# ---- crafting torch files by hand ------------------------------------------------------------------------------

def op_global(module: str, name: str) -> bytes:
    """GLOBAL: push ``module.name`` (protocol 0-2)."""
    return b"c" + f"{module}\n{name}\n".encode()


def op_str(text: str) -> bytes:
    """BINUNICODE: push a str."""
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value: int) -> bytes:
    """Push an int (BININT1, BININT2, BININT or LONG1 as pickle picks)."""
    return pickle.dumps(value, 2)[2:-1]


def op_tuple(*items: bytes) -> bytes:
    """MARK items TUPLE: push a tuple."""
    return b"(" + b"".join(items) + b"t"


def op_call(function: bytes, *args: bytes) -> bytes:
    """Push ``function(*args)`` (REDUCE)."""
    return function + op_tuple(*args) + b"R"


def storage_id(key: str, numel: int, legacy: bool, storage=("torch", "FloatStorage"), view=None) -> bytes:
    """BINPERSID of torch's storage id: ('storage', type, key, location, numel[, view])."""
    fields = [op_str("storage"), op_global(*storage), op_str(key), op_str("cpu"), op_int(numel)]
    if legacy:
        fields.append(b"N" if view is None else op_tuple(op_str(view[0]), op_int(view[1]), op_int(view[2])))
    return op_tuple(*fields) + b"Q"


def tensor(storage: bytes, offset: int, size, stride, rebuild="_rebuild_tensor_v2") -> bytes:
    """Push ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())``."""
    args = [storage, op_int(offset), op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride))]
    if rebuild == "_rebuild_tensor_v2":
        args += [b"\x89", op_call(op_global("collections", "OrderedDict"))]
    return op_call(op_global("torch._utils", rebuild), *args)


def state_pickle(entries) -> bytes:
    """A protocol-2 pickle of an OrderedDict of ``(name, value opcodes)`` as torch writes a state dict."""
    items = b"".join(op_str(name) + value for name, value in entries)
    return b"\x80\x02" + op_call(op_global("collections", "OrderedDict")) + b"(" + items + b"u."


def legacy_file(path, state: bytes, storages, sys_info=None, keys=None, header=None) -> pathlib.Path:
    """Torch's legacy layout: magic, protocol, sys-info, ``state``, storage keys, then each storage's data.

    ``storages`` is a list of (key, float32 values); ``header`` replaces the first pickle (the magic).
    """
    parts = [header or pickle.dumps(LEGACY_MAGIC, 2), pickle.dumps(1001, 2),
             pickle.dumps(SYS_INFO if sys_info is None else sys_info, 2), state,
             pickle.dumps([k for k, _ in storages] if keys is None else keys, 2)]
    for _, values in storages:
        values = np.asarray(values, "<f4")
        parts += [struct.pack("<q", values.size), values.tobytes()]
    pathlib.Path(path).write_bytes(b"".join(parts))
    return pathlib.Path(path)


def zip_file(path, state: bytes, storages, byteorder="little", name="archive") -> pathlib.Path:
    """Torch's zip layout: ``archive/data.pkl``, ``archive/byteorder``, ``archive/data/<key>``."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name}/data.pkl", state)
        if byteorder is not None:
            archive.writestr(f"{name}/byteorder", byteorder)
        for key, values in storages:
            archive.writestr(f"{name}/data/{key}", np.asarray(values, "<f4" if byteorder != "big" else ">f4").tobytes())
        archive.writestr(f"{name}/version", "3\n")
    return pathlib.Path(path)


def torch_file(fmt: str, path, entries, storages) -> pathlib.Path:
    """A state dict file in format ``fmt`` ('zip' or 'legacy') of crafted ``entries`` (see ``tensor``)."""
    legacy = fmt == "legacy"
    entries = [(name, make(legacy)) for name, make in entries]
    if legacy:
        return legacy_file(path, state_pickle(entries), storages)
    return zip_file(path, state_pickle(entries), storages)


def refused(path) -> str:
    """The one-line message of the TorchPickleError that loading ``path`` raises."""
    with pytest.raises(TorchPickleError) as error:
        load_state_dict(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    return message


# ---- real files written by torch ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["state_dict", "other_dtypes"])
def test_reads_what_torch_load_reads(name, fmt):
    arrays = load_state_dict(FIXTURES / f"{name}_{fmt}.pt")
    with np.load(FIXTURES / f"{name}.npz") as expected:
        assert list(arrays) == list(expected.files)  # the file's order
        for key in expected.files:
            assert arrays[key].dtype == expected[key].dtype, key
            assert arrays[key].shape == expected[key].shape, key
            np.testing.assert_array_equal(arrays[key], expected[key], err_msg=key)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_and_shared_storage(fmt):
    arrays = load_state_dict(FIXTURES / f"state_dict_{fmt}.pt")
    embedding = arrays["embedding"]
    assert embedding.shape == (5, 6) and arrays["conv.kernel"].shape == (2, 3, 4) and arrays["scale"].shape == ()
    np.testing.assert_array_equal(arrays["embedding.transposed"], embedding.T)
    np.testing.assert_array_equal(arrays["embedding.rows"], embedding[2:4])
    np.testing.assert_array_equal(arrays["embedding.every_other"], embedding[1:, ::2])
    for array in arrays.values():  # own, writable, contiguous copies: writing one changes no other
        assert array.flags.c_contiguous and array.flags.writeable and array.flags.owndata
    arrays["embedding"][:] = 0
    assert arrays["embedding.rows"].any()


def test_path_may_be_a_string():
    assert list(load_state_dict(str(FIXTURES / "state_dict_zip.pt")))[:2] == ["0.weight", "0.bias"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_int64_tensors(fmt):
    path = FIXTURES / f"int64_{fmt}.pt"  # BatchNorm1d: num_batches_tracked is int64
    assert "dtype int64 (storage 'torch.LongStorage')" in refused(path)


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_a_whole_module(fmt):
    message = refused(FIXTURES / f"module_{fmt}.pt")
    assert "refuses to load global 'torch.nn.modules.linear.Linear'" in message


def test_reads_storages_saved_on_a_gpu(tmp_path):
    """torch 0.4 wrote a CUDA tensor's storage as torch.cuda.FloatStorage; the bytes are the same."""
    data = (FIXTURES / "state_dict_legacy.pt").read_bytes()
    assert data.count(b"ctorch\nFloatStorage\n") == 1  # the class is pickled once, then memoized
    path = tmp_path / "cuda.pt"
    path.write_bytes(data.replace(b"ctorch\nFloatStorage\n", b"ctorch.cuda\nFloatStorage\n"))
    expected = load_state_dict(FIXTURES / "state_dict_legacy.pt")
    arrays = load_state_dict(path)
    assert list(arrays) == list(expected)
    for key in expected:
        np.testing.assert_array_equal(arrays[key], expected[key])


# ---- malicious pickles: refused, and their payload never runs ------------------------------------------------

class Payload:
    """Pickles as a call of ``function(*args)``: what a malicious pickle runs on a plain ``pickle.load``."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def payloads(marker: pathlib.Path, legacy: bool = False):
    """Pickles that create ``marker`` when loaded with pickle, and the global each asks for first."""
    system = pickle.dumps(Payload(os.system, f"touch {marker}"), 2)
    opener = pickle.dumps(Payload(open, str(marker), "w"), 4)  # STACK_GLOBAL and framing of protocol 4
    evaluate = op_call(op_global("builtins", "eval"), op_str(f"open({str(marker)!r}, 'w')"))
    inst = b"(" + op_str(f"touch {marker}") + b"ios\nsystem\n."  # INST of protocol 0
    # a valid tensor first, then a payload hidden in the next entry
    hidden = state_pickle([("ok", tensor(storage_id("0", 1, legacy), 0, (1,), (1,))),
                           ("evil", op_call(op_global("subprocess", "check_call"),
                                            op_tuple(op_str("touch"), op_str(str(marker)))))])
    return [(system, os.system.__module__ + ".system"), (opener, f"{open.__module__}.open"),
            (b"\x80\x02" + evaluate + b".", "builtins.eval"), (inst, "os.system"),
            (hidden, "subprocess.check_call")]


def test_the_payloads_are_live(tmp_path):
    """Control: plain pickle runs each payload (else the tests below would prove nothing)."""
    marker = tmp_path / "marker"
    for data, _ in payloads(marker):
        if b"subprocess" in data:
            continue  # needs a persistent_load to reach the payload; the others show the mechanism
        pickle.loads(data)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("fmt", FORMATS)
def test_malicious_state_dict_is_refused_without_running(tmp_path, fmt):
    marker = tmp_path / "marker"
    for i, (data, refused_global) in enumerate(payloads(marker, fmt == "legacy")):
        if fmt == "legacy":
            path = legacy_file(tmp_path / f"evil{i}.pt", data, [("0", [1.0])])
        else:
            path = zip_file(tmp_path / f"evil{i}.pt", data, [("0", [1.0])])
        message = refused(path)
        assert f"refuses to load global '{refused_global}'" in message, message
        assert "only state dicts" in message
        assert not marker.exists()


def test_malicious_legacy_header_is_refused_without_running(tmp_path):
    """The pickles before and after the state dict are plain data: no global at all is resolved there."""
    marker = tmp_path / "marker"
    data, refused_global = payloads(marker)[0]
    good_state = state_pickle([("w", tensor(storage_id("0", 1, legacy=True), 0, (1,), (1,)))])
    for kwargs in ({"header": data}, {"sys_info": Payload(os.system, f"touch {marker}")},
                   {"keys": Payload(os.system, f"touch {marker}")}):
        path = legacy_file(tmp_path / "evil.pt", good_state, [("0", [1.0])], **kwargs)
        assert f"refuses to load global '{refused_global}'" in refused(path)
        assert not marker.exists()


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_opcodes_torch_never_writes(tmp_path, fmt):
    """Out-of-band buffers (protocol 5) and the extension registry are refused before unpickling starts."""
    for opcodes, name in [(b"\x96" + struct.pack("<Q", 3) + b"abc", "BYTEARRAY8"), (b"\x82\x01", "EXT1")]:
        data = b"\x80\x05" + opcodes + b"."
        path = legacy_file(tmp_path / "x.pt", data, []) if fmt == "legacy" else zip_file(tmp_path / "x.pt", data, [])
        assert f"uses the pickle opcode {name}" in refused(path)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("module, name", [("torch.nn", "Module"), ("builtins", "eval"), ("__builtin__", "eval"),
                                          ("builtins", "getattr"), ("posix", "system"), ("torch", "load"),
                                          ("torch._utils", "_rebuild_from_type_v2"), ("collections", "defaultdict"),
                                          ("numpy.core.multiarray", "_reconstruct"), ("torch", "Tensor")])
def test_refuses_any_other_global(tmp_path, fmt, module, name):
    entries = [("w", lambda legacy: op_call(op_global(module, name)))]
    message = refused(torch_file(fmt, tmp_path / "x.pt", entries, []))
    assert f"refuses to load global '{module}.{name}'" in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_refuses_persistent_ids_that_are_not_storages(tmp_path, fmt):
    """Legacy torch pickled a module's source as ('module', class, file, source)."""
    entries = [("w", lambda legacy: op_tuple(op_str("module"), op_str("x"), op_str("y"), op_str("z")) + b"Q")]
    assert "persistent object of kind 'module'" in refused(torch_file(fmt, tmp_path / "x.pt", entries, []))


# ---- crafted valid files: the details of the formats ---------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_crafted_views_of_one_storage(tmp_path, fmt):
    values = np.arange(24, dtype=np.float32)
    grid = values.reshape(4, 6)
    entries = [("whole", lambda legacy: tensor(storage_id("s", 24, legacy), 0, (4, 6), (6, 1))),
               ("transposed", lambda legacy: tensor(storage_id("s", 24, legacy), 0, (6, 4), (1, 6))),
               ("block", lambda legacy: tensor(storage_id("s", 24, legacy), 8, (2, 3), (6, 1))),
               ("cube", lambda legacy: tensor(storage_id("s", 24, legacy), 0, (2, 3, 4), (12, 4, 1))),
               ("broadcast_row", lambda legacy: tensor(storage_id("s", 24, legacy), 1, (1, 3), (0, 2))),
               ("empty", lambda legacy: tensor(storage_id("s", 24, legacy), 24, (0, 5), (5, 1))),
               ("old", lambda legacy: tensor(storage_id("t", 2, legacy), 1, (1,), (1,), rebuild="_rebuild_tensor"))]
    arrays = load_state_dict(torch_file(fmt, tmp_path / "x.pt", entries, [("s", values), ("t", [7.0, 8.0])]))
    assert list(arrays) == ["whole", "transposed", "block", "cube", "broadcast_row", "empty", "old"]
    np.testing.assert_array_equal(arrays["whole"], grid)
    np.testing.assert_array_equal(arrays["transposed"], grid.T)
    np.testing.assert_array_equal(arrays["block"], grid[1:3, 2:5])
    np.testing.assert_array_equal(arrays["cube"], values.reshape(2, 3, 4))
    np.testing.assert_array_equal(arrays["broadcast_row"], [[1, 3, 5]])
    assert arrays["empty"].shape == (0, 5) and arrays["empty"].dtype == np.float32
    np.testing.assert_array_equal(arrays["old"], [8.0])


def test_legacy_storage_views_of_torch_0_4(tmp_path):
    """torch <= 0.4 pickled views of a storage as ('storage', type, root, location, numel, (view, offset, size))."""
    state = state_pickle([("tail", tensor(storage_id("r", 6, True, view=("v", 2, 4)), 1, (3,), (1,)))])
    arrays = load_state_dict(legacy_file(tmp_path / "x.pt", state, [("r", np.arange(6))]))
    np.testing.assert_array_equal(arrays["tail"], [3, 4, 5])


def test_zip_byteorder(tmp_path):
    state = state_pickle([("w", tensor(storage_id("0", 3, legacy=False), 0, (3,), (1,)))])
    for byteorder in ("big", "little", None):  # no record: little-endian, as torch < 1.10 wrote it
        arrays = load_state_dict(zip_file(tmp_path / f"{byteorder}.pt", state, [("0", [1.5, -2.0, 3.25])], byteorder))
        np.testing.assert_array_equal(arrays["w"], [1.5, -2.0, 3.25])
        assert arrays["w"].dtype == np.dtype(np.float32)  # native byte order
    assert "byteorder record 'middle'" in refused(zip_file(tmp_path / "m.pt", state, [("0", [1, 2, 3])], "middle"))


def test_zip_folder_may_have_any_name(tmp_path):
    state = state_pickle([("w", tensor(storage_id("0", 1, legacy=False), 0, (), ()))])
    arrays = load_state_dict(zip_file(tmp_path / "x.pt", state, [("0", [4.0])], name="token_embedder"))
    assert arrays["w"].shape == () and arrays["w"] == 4.0


# ---- bad files: one clear line naming the file ---------------------------------------------------------------

def test_missing_file_directory_and_empty_file(tmp_path):
    assert refused(tmp_path / "absent.pt").endswith("file not found")
    assert "is a directory" in refused(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty" in refused(tmp_path / "empty.pt")


def test_not_a_torch_file(tmp_path):
    (tmp_path / "text.pt").write_text("options = {}\n")
    assert "is not a torch file" in refused(tmp_path / "text.pt")
    (tmp_path / "plain.pkl").write_bytes(pickle.dumps({"a": 1}, 2))  # a pickle, not torch's
    assert "does not start with torch's magic number" in refused(tmp_path / "plain.pkl")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("options.json", "{}")
    assert "expected one '<name>/data.pkl', found none" in refused(tmp_path / "other.zip")
    tar = bytearray(1024)
    tar[257:262] = b"ustar"
    (tmp_path / "old.tar").write_bytes(bytes(tar))
    assert "tar format" in refused(tmp_path / "old.tar")


@pytest.mark.parametrize("fmt", FORMATS)
def test_truncated_files(tmp_path, fmt):
    data = (FIXTURES / f"state_dict_{fmt}.pt").read_bytes()
    for cut in (10, len(data) // 3, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(data[:cut])
        message = refused(path)
        assert "truncated" in message, message


def test_corrupt_zip_record(tmp_path):
    source = zipfile.ZipFile(FIXTURES / "state_dict_zip.pt")
    path = tmp_path / "short.pt"
    with source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            data = source.read(info)
            archive.writestr(info.filename, data[:-4] if info.filename.endswith("/data/0") else data)
    assert "'state_dict_zip/data/0' has" in refused(path)
    source = zipfile.ZipFile(FIXTURES / "state_dict_zip.pt")
    with source, zipfile.ZipFile(path, "w") as archive:
        for info in source.infolist():
            if not info.filename.endswith("/data/1"):
                archive.writestr(info.filename, source.read(info))
    assert "lacks the record 'state_dict_zip/data/1'" in refused(path)


def test_big_endian_legacy_file_is_refused(tmp_path):
    state = state_pickle([("w", tensor(storage_id("0", 1, legacy=True), 0, (1,), (1,)))])
    path = legacy_file(tmp_path / "x.pt", state, [("0", [1.0])], sys_info={**SYS_INFO, "little_endian": False})
    assert "big-endian" in refused(path)


@pytest.mark.parametrize("storage, dtype", [(("torch", "BFloat16Storage"), "bfloat16"),
                                            (("torch", "ByteStorage"), "uint8"),
                                            (("torch.storage", "UntypedStorage"), "untyped bytes"),
                                            (("torch.cuda", "LongStorage"), "int64")])
def test_unsupported_dtypes(tmp_path, storage, dtype):
    entries = [("w", lambda legacy: tensor(storage_id("0", 1, legacy, storage=storage), 0, (1,), (1,)))]
    message = refused(torch_file("zip", tmp_path / "x.pt", entries, [("0", [1.0])]))
    assert f"dtype {dtype} (storage '{'.'.join(storage)}'), which are not supported" in message


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("offset, size, stride", [(0, (4,), (1,)), (3, (2,), (1,)), (0, (2, 2), (1, 2)),
                                                  (0, (3, 3), (0, 0)), (0, (2**40, 2**40), (0, 0)),
                                                  (0, (0, 2**60), (1, 1)), (0, (1,) * 40, (1,) * 40)])
def test_tensor_outside_its_storage(tmp_path, fmt, offset, size, stride):
    entries = [("w", lambda legacy: tensor(storage_id("0", 3, legacy), offset, size, stride))]
    message = refused(torch_file(fmt, tmp_path / "x.pt", entries, [("0", [1, 2, 3])]))
    assert any(part in message for part in ("runs past the end", "more elements", "malformed offset")), message


@pytest.mark.parametrize("fmt", FORMATS)
def test_not_a_dict_of_tensors(tmp_path, fmt):
    nested = state_pickle([("model", op_call(op_global("collections", "OrderedDict")))])
    path = (legacy_file(tmp_path / "n.pt", nested, []) if fmt == "legacy" else zip_file(tmp_path / "n.pt", nested, []))
    assert "entry 'model' is not a tensor but of type OrderedDict" in refused(path)
    listed = b"\x80\x02]" + op_str("x") + b"a."
    path = legacy_file(tmp_path / "l.pt", listed, []) if fmt == "legacy" else zip_file(tmp_path / "l.pt", listed, [])
    assert "holds an object of type list, not a state dict" in refused(path)


def test_malformed_storage_records(tmp_path):
    state = state_pickle([("w", tensor(storage_id("0", 2, legacy=True), 0, (2,), (1,)))])
    assert "has 3 elements in the data but 2" in refused(legacy_file(tmp_path / "a.pt", state, [("0", [1, 2, 3])]))
    keys = ["0", "9"]
    assert "storage '9', which no tensor declares" in refused(
        legacy_file(tmp_path / "b.pt", state, [("0", [1, 2])], keys=keys))
    twice = state_pickle([("w", tensor(storage_id("0", 2, legacy=True), 0, (2,), (1,))),
                          ("v", tensor(storage_id("0", 3, legacy=True), 0, (2,), (1,)))])
    assert "declared twice" in refused(legacy_file(tmp_path / "c.pt", twice, [("0", [1, 2])]))
    garbage = b"\x80\x02" + op_str("x") + b"\xff."
    assert "is not a readable pickle" in refused(legacy_file(tmp_path / "d.pt", garbage, []))
    assert "is not a readable pickle" in refused(zip_file(tmp_path / "e.pt", garbage, []))
