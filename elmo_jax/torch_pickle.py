"""Read PyTorch ``torch.save`` files of state dicts without torch and without running code from the file.

``load_state_dict(path)`` returns ``{name: numpy array}`` in the file's order for an ``OrderedDict`` of
CPU (or CUDA-saved) float32 tensors, as ``torch.save(module.state_dict(), path)`` writes it, in both of
torch's formats:

* the zip format of torch >= 1.6: ``<name>/data.pkl`` (the pickled state dict) and one record
  ``<name>/data/<key>`` of raw bytes per storage, in the byte order of ``<name>/byteorder`` (little
  endian when that record is absent);
* the legacy format of torch < 1.6 (and ``_use_new_zipfile_serialization=False``): five pickles in a
  row (magic number, protocol version 1001, a sys-info dict, the state dict, the list of storage keys),
  then for each key of that list its element count as a little-endian int64 and its elements.

Tensors are pickled as calls of ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
and storages as persistent ids ``('storage', torch.FloatStorage, key, location, numel[, view])``. The
unpickler resolves only these few globals, each to a harmless stand-in of this module that records
its arguments; every other global (``os.system``, ``builtins.eval``, ``torch.nn.Module``, ...) is
refused before anything is called, with a one-line ``TorchPickleError`` naming the file and the global.
The tensors are then cut out of the storages with their sizes, strides and offsets, after checking that
they lie within their storage; tensors that share a storage read the same bytes.

float64 and float16 tensors are read too and keep their dtype; every other dtype is refused.
"""

from __future__ import annotations

import collections
import io
import math
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
from typing import Any, NamedTuple

import numpy as np

__all__ = ["TorchPickleError", "load_state_dict"]

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
_LIMIT = 2**48  # bound of sizes, strides and offsets: larger ones are malformed, not tensors
_WHAT_IS_READ = "only state dicts (OrderedDicts) of float32, float64 or float16 tensors are read"


class TorchPickleError(ValueError):
    """A torch file is missing, truncated, corrupt, not a torch file, or holds something that is not read."""


class _FormatError(Exception):
    """Raised inside the reader; ``load_state_dict`` prefixes the path and re-raises a TorchPickleError."""


class _StorageType(NamedTuple):
    """Stand-in for a torch storage class such as ``torch.FloatStorage``: its name and element dtype."""

    name: str
    dtype: str  # numpy kind and size without byte order, e.g. "f4"


class _StorageRef(NamedTuple):
    """Stand-in for a storage (a persistent id): ``count`` elements from ``start`` of root storage ``key``."""

    key: str
    start: int
    count: int


class _TensorRef(NamedTuple):
    """Stand-in for a tensor: a strided view into a storage, materialized after unpickling."""

    storage: _StorageRef
    offset: int
    size: tuple
    stride: tuple


class _Root(NamedTuple):
    """A root storage as its persistent id declares it."""

    stype: _StorageType
    numel: int


_SUPPORTED_STORAGES = {"FloatStorage": "f4", "DoubleStorage": "f8", "HalfStorage": "f2"}
_STORAGE_MODULES = ("torch", "torch.cuda", "torch.storage")
_UNSUPPORTED_DTYPES = {
    "BFloat16Storage": "bfloat16",
    "LongStorage": "int64",
    "IntStorage": "int32",
    "ShortStorage": "int16",
    "CharStorage": "int8",
    "ByteStorage": "uint8",
    "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128",
    "UntypedStorage": "untyped bytes",
    "TypedStorage": "unknown",
}


def _rebuild_tensor(storage, storage_offset, size, stride):
    """Stand-in for ``torch._utils._rebuild_tensor`` (torch <= 0.3): checks and records the view."""
    if not isinstance(storage, _StorageRef):
        raise _FormatError(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    offset_ok = _is_int(storage_offset) and 0 <= storage_offset < _LIMIT
    if not offset_ok or not _is_int_tuple(size) or not _is_int_tuple(stride):
        raise _FormatError(f"a tensor has a malformed offset, size or stride: {storage_offset!r}, {size!r}, {stride!r}")
    return _TensorRef(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """Stand-in for ``torch._utils._rebuild_tensor_v2``; ``requires_grad``, hooks and metadata are dropped."""
    return _rebuild_tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    """Stand-in for ``torch._utils._rebuild_parameter`` (a state dict saved with ``keep_vars=True``)."""
    if not isinstance(data, _TensorRef):
        raise _FormatError(f"a parameter holds a {type(data).__name__}, not a tensor")
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


def _is_int(value) -> bool:
    """Whether ``value`` is a Python int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_tuple(value) -> bool:
    """Whether ``value`` is a tuple (torch.Size is pickled as one) of at most 32 non-negative ints < 2**48."""
    return isinstance(value, (tuple, list)) and len(value) <= 32 and all(_is_int(v) and 0 <= v < _LIMIT for v in value)


def _find_global(module: str, name: str, allowed: bool) -> Any:
    """The stand-in for global ``module.name``; refuses everything else with a _FormatError."""
    if allowed and (module, name) in _ALLOWED_GLOBALS:
        return _ALLOWED_GLOBALS[(module, name)]
    if allowed and module in _STORAGE_MODULES and name in _SUPPORTED_STORAGES:
        return _StorageType(f"{module}.{name}", _SUPPORTED_STORAGES[name])
    if allowed and module in _STORAGE_MODULES and name.endswith("Storage"):
        dtype = _UNSUPPORTED_DTYPES.get(name, "unknown")
        raise _FormatError(f"holds tensors of dtype {dtype} (storage '{module}.{name}'), which are not supported: "
                           f"{_WHAT_IS_READ}")
    raise _FormatError(f"refuses to load global '{module}.{name}': {_WHAT_IS_READ}")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the stand-ins of ``_find_global`` and storages of ``persistent``.

    ``persistent`` (a callable taking the persistent id) is None for the pickles of plain data (the
    legacy header and storage list), which then accept neither globals nor persistent ids.
    """

    def __init__(self, file, persistent=None):
        super().__init__(file, encoding="utf-8")
        self._persistent = persistent

    def find_class(self, module, name):
        """Refuse all globals but the allowed stand-ins (plain-data pickles: all globals)."""
        return _find_global(module, name, allowed=self._persistent is not None)

    def persistent_load(self, pid):
        """Resolve a storage persistent id; refuse them in plain-data pickles."""
        if self._persistent is None:
            raise _FormatError(f"holds an unexpected persistent id {pid!r} where plain data was expected")
        return self._persistent(pid)


# Opcodes torch never writes: out-of-band buffers of protocol 5 and the copyreg extension registry.
_REFUSED_OPCODES = {"BYTEARRAY8", "NEXT_BUFFER", "READONLY_BUFFER", "EXT1", "EXT2", "EXT4"}


def _pickle_error(what: str, error: Exception) -> _FormatError:
    """The _FormatError for a pickle that the scanner or unpickler cannot read."""
    text = str(error)
    if isinstance(error, EOFError) or any(word in text for word in ("truncated", "exhausted", "remain")):
        return _FormatError(f"is truncated: {what} ends early")
    return _FormatError(f"{what} is not a readable pickle ({type(error).__name__}: {text})")


def _scan(file, what: str) -> int:
    """Parse (without running) the pickle at the file's position, refusing _REFUSED_OPCODES; its end offset.

    The file is left where it was. pickletools reads each opcode's argument without executing anything.
    """
    start, end = file.tell(), None
    try:
        for opcode, _, position in pickletools.genops(file):
            if opcode.name in _REFUSED_OPCODES:
                raise _FormatError(f"{what} uses the pickle opcode {opcode.name}, which torch does not write")
            end = position + 1
    except _FormatError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure to parse a corrupt pickle becomes one clear error
        raise _pickle_error(what, error) from None
    file.seek(start)
    return end


def _unpickle(file, what: str, persistent=None) -> Any:
    """Load one pickle from ``file`` with the restricted unpickler, after scanning its opcodes.

    ``what`` names the pickle in errors; ``persistent`` resolves persistent ids (see _RestrictedUnpickler).
    """
    end = _scan(file, what)
    try:
        value = _RestrictedUnpickler(file, persistent).load()
    except _FormatError:
        raise
    except Exception as error:  # noqa: BLE001 - any failure of a corrupt pickle becomes one clear error
        raise _pickle_error(what, error) from None
    if file.tell() != end:
        raise _FormatError(f"{what} is not a readable pickle (it ends at {file.tell()}, its opcodes at {end})")
    return value


def _text(value) -> Any:
    """``value`` decoded from ASCII bytes (pickles written by Python 2), else unchanged."""
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


class _Storages:
    """The root storages that the persistent ids of one state dict declare, by key."""

    def __init__(self, legacy: bool):
        self.legacy = legacy
        self.roots: dict[str, _Root] = {}

    def persistent_load(self, pid) -> _StorageRef:
        """Resolve ``('storage', type, key, location, numel[, view])`` to a _StorageRef."""
        kind = _text(pid[0]) if isinstance(pid, tuple) and pid else pid
        if kind != "storage":
            raise _FormatError(f"holds a persistent object of kind {kind!r}, not a storage: {_WHAT_IS_READ}")
        if len(pid) != (6 if self.legacy else 5):
            raise _FormatError(f"holds a storage id of {len(pid)} fields, expected {6 if self.legacy else 5}: {pid!r}")
        stype, key, location, numel = pid[1], _text(pid[2]), _text(pid[3]), pid[4]
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not isinstance(location, str):
            raise _FormatError(f"holds a malformed storage id {pid!r}")
        if not _is_int(numel) or numel < 0:
            raise _FormatError(f"storage '{key}' has a malformed size {numel!r}")
        root = self.roots.setdefault(key, _Root(stype, numel))
        if root != (stype, numel):
            raise _FormatError(f"storage '{key}' is declared twice with different types or sizes")
        view = pid[5] if self.legacy else None
        return _StorageRef(key, 0, numel) if view is None else self._view(key, numel, view)

    @staticmethod
    def _view(key: str, numel: int, view) -> _StorageRef:
        """A storage view of torch <= 0.4: ``(view_key, offset, size)`` elements of root ``key``."""
        if not isinstance(view, tuple) or len(view) != 3 or not _is_int(view[1]) or not _is_int(view[2]):
            raise _FormatError(f"storage '{key}' has a malformed view {view!r}")
        start, count = view[1], view[2]
        if start < 0 or count < 0 or start + count > numel:
            raise _FormatError(f"a view of storage '{key}' ({count} elements from {start}) exceeds its {numel}")
        return _StorageRef(key, start, count)


def _read_legacy(file) -> tuple[Any, dict[str, np.ndarray]]:
    """The state dict and root storages (flat arrays) of a file in torch's legacy format."""
    magic = _unpickle(file, "the magic number")
    if not _is_int(magic) or magic != LEGACY_MAGIC:
        raise _FormatError("is not a torch file: it is a pickle but does not start with torch's magic number")
    protocol = _unpickle(file, "the protocol version")
    if protocol != LEGACY_PROTOCOL:
        raise _FormatError(f"has torch legacy protocol version {protocol!r}; only {LEGACY_PROTOCOL} is read")
    _check_sys_info(_unpickle(file, "the sys-info header"))
    storages = _Storages(legacy=True)
    state = _unpickle(file, "the state dict", storages.persistent_load)
    keys = _unpickle(file, "the list of storage keys")
    if not isinstance(keys, list) or not all(isinstance(_text(k), str) for k in keys):
        raise _FormatError(f"has a malformed list of storage keys ({type(keys).__name__})")
    data = {}
    for key in map(_text, keys):
        if key not in storages.roots:
            raise _FormatError(f"lists data for storage '{key}', which no tensor declares")
        data[key] = _read_legacy_storage(file, key, storages.roots[key])
    return state, data


def _check_sys_info(sys_info) -> None:
    """Refuse legacy files whose sys-info says they were written on a big-endian machine.

    Its ``type_sizes`` (C short/int/long) do not matter: storage lengths are int64 and elements have
    the size of their dtype.
    """
    if not isinstance(sys_info, dict):
        raise _FormatError(f"has a malformed sys-info header ({type(sys_info).__name__}, expected a dict)")
    if sys_info.get("little_endian", True) is not True:
        raise _FormatError("was written on a big-endian machine; only files written little-endian are read")


def _read_legacy_storage(file, key: str, root: _Root) -> np.ndarray:
    """One storage of the legacy format: its int64 element count, then its elements (little-endian).

    ``file`` is the file's mmap, whose ``read`` returns at most what is left.
    """
    header = file.read(8)
    if len(header) < 8:
        raise _FormatError(f"is truncated: the data of storage '{key}' is missing")
    (numel,) = struct.unpack("<q", header)
    if numel != root.numel:
        raise _FormatError(f"storage '{key}' has {numel} elements in the data but {root.numel} in the pickle")
    dtype = np.dtype("<" + root.stype.dtype)
    raw = file.read(numel * dtype.itemsize)
    if len(raw) < numel * dtype.itemsize:
        raise _FormatError(f"is truncated: storage '{key}' needs {numel * dtype.itemsize} bytes, {len(raw)} are left")
    return np.frombuffer(raw, dtype)


def _zip_prefix(archive: zipfile.ZipFile) -> str:
    """The folder ``<name>/`` of the one ``<name>/data.pkl`` in a torch zip file."""
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        found = "none" if not pickles else ", ".join(pickles)
        raise _FormatError(f"is a zip file but not a torch file: expected one '<name>/data.pkl', found {found}")
    return pickles[0][: -len("data.pkl")]


def _zip_byteorder(archive: zipfile.ZipFile, prefix: str) -> str:
    """'<' or '>' as the zip's ``byteorder`` record says (little endian when it has none)."""
    try:
        order = archive.read(prefix + "byteorder").decode("ascii", "replace").strip()
    except KeyError:
        return "<"
    if order not in ("little", "big"):
        raise _FormatError(f"has byteorder record {order!r}; expected 'little' or 'big'")
    return "<" if order == "little" else ">"


def _read_zip(path: str) -> tuple[Any, dict[str, np.ndarray]]:
    """The state dict and root storages (flat arrays) of a file in torch's zip format."""
    try:
        with zipfile.ZipFile(path) as archive:
            prefix = _zip_prefix(archive)
            order = _zip_byteorder(archive, prefix)
            storages = _Storages(legacy=False)
            state = _unpickle_bytes(archive.read(prefix + "data.pkl"), prefix + "data.pkl", storages)
            data = {key: _read_zip_storage(archive, prefix, key, root, order) for key, root in storages.roots.items()}
    except _FormatError:
        raise
    except Exception as error:  # noqa: BLE001 - zipfile fails on corrupt archives in many ways, all one error
        raise _FormatError(f"is truncated or not a valid zip file ({type(error).__name__}: {error})") from None
    return state, data


def _unpickle_bytes(raw: bytes, name: str, storages: _Storages) -> Any:
    """Unpickle the state dict of a zip file from its bytes."""
    return _unpickle(io.BytesIO(raw), f"'{name}'", storages.persistent_load)


def _read_zip_storage(archive: zipfile.ZipFile, prefix: str, key: str, root: _Root, order: str) -> np.ndarray:
    """One storage record ``<name>/data/<key>`` of a zip file: exactly ``numel`` raw elements."""
    name = f"{prefix}data/{key}"
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise _FormatError(f"lacks the record '{name}' of storage '{key}'") from None
    dtype = np.dtype(order + root.stype.dtype)
    if info.file_size != root.numel * dtype.itemsize:
        raise _FormatError(f"record '{name}' has {info.file_size} bytes; its storage of {root.numel} "
                           f"{root.stype.name} elements needs {root.numel * dtype.itemsize}")
    return np.frombuffer(archive.read(name), dtype)


def _tensor_array(name: str, tensor: _TensorRef, storage: np.ndarray) -> np.ndarray:
    """The tensor ``name`` as a new C-contiguous native-endian array, after checking its view lies in bounds."""
    ref = tensor.storage
    view = storage[ref.start:ref.start + ref.count]
    size, stride, offset = tensor.size, tensor.stride, tensor.offset
    if len(size) != len(stride):
        raise _FormatError(f"tensor '{name}' has size {size} but stride {stride}")
    native = view.dtype.newbyteorder("=")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, native)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= len(view):
        raise _FormatError(f"tensor '{name}' (offset {offset}, size {size}, stride {stride}) runs past the "
                           f"end of its storage of {len(view)} elements")
    if numel > len(view):
        raise _FormatError(f"tensor '{name}' has more elements ({numel}) than its storage ({len(view)}); "
                           "expanded (stride 0) tensors are not read")
    strides = tuple(s * view.itemsize for s in stride)
    window = np.lib.stride_tricks.as_strided(view[offset:], shape=size, strides=strides, writeable=False)
    return np.array(window, dtype=native, order="C", copy=True)


def _state_arrays(state, data: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays of a state dict, in its order; refuses anything that is not a dict of tensors."""
    if not isinstance(state, dict):
        raise _FormatError(f"holds an object of type {type(state).__name__}, not a state dict: {_WHAT_IS_READ}")
    arrays = {}
    for name, tensor in state.items():
        name = _text(name)
        if not isinstance(name, str):
            raise _FormatError(f"has a key {name!r} that is not a string")
        if not isinstance(tensor, _TensorRef):
            raise _FormatError(f"entry '{name}' is not a tensor but of type {type(tensor).__name__}: {_WHAT_IS_READ}")
        if tensor.storage.key not in data:
            raise _FormatError(f"has no data for storage '{tensor.storage.key}' of tensor '{name}'")
        arrays[name] = _tensor_array(name, tensor, data[tensor.storage.key])
    return arrays


def _is_tar(head: bytes) -> bool:
    """Whether ``head`` (the file's first 512 bytes) is a tar header (torch's format before 0.1.10)."""
    return len(head) >= 262 and head[257:262] == b"ustar"


def _read(path: str) -> dict[str, np.ndarray]:
    """Detect the format of ``path`` and read it (raises _FormatError, not yet prefixed by the path)."""
    try:
        file = open(path, "rb")
    except FileNotFoundError:
        raise _FormatError("file not found") from None
    except IsADirectoryError:
        raise _FormatError("is a directory, not a torch file") from None
    except OSError as error:
        raise _FormatError(f"cannot be opened ({error.strerror})") from None
    with file:
        head = file.read(512)
        if not head:
            raise _FormatError("is empty, not a torch file")
        if head.startswith(b"PK\x03\x04"):
            file.close()
            return _state_arrays(*_read_zip(path))
        if head[:1] == b"\x80":  # a pickle: torch's legacy format, read through an mmap (reads stop at its end)
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                return _state_arrays(*_read_legacy(mapped))
    if _is_tar(head):
        raise _FormatError("is in torch's tar format of torch < 0.1.10, which is not read")
    raise _FormatError("is not a torch file: neither torch's zip format nor its legacy pickle format")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a ``torch.save``-d state dict of float tensors without torch and without running its code.

    Returns ``{name: array}`` in the file's order: each array a new C-contiguous native-endian copy of
    its tensor (float32; float64 and float16 tensors keep their dtype), with the tensor's shape, read
    through its stride and storage offset; tensors that share a storage share values, not memory.
    Reads torch's zip format (torch >= 1.6) and its legacy format (torch < 1.6, or
    ``_use_new_zipfile_serialization=False``), of tensors saved on the CPU or a GPU.

    Raises TorchPickleError (a ValueError), one line starting with the path, when the file is missing,
    truncated, corrupt or not a torch file, or when its pickle asks for any global other than an
    OrderedDict, a tensor or a float storage (nothing it asks for is ever called), or holds tensors of
    another dtype.
    """
    path = os.fspath(path)
    try:
        return _read(path)
    except _FormatError as error:
        message = f"{path}: {error}".replace("\r", "\\r").replace("\n", "\\n")  # one line, always
        raise TorchPickleError(message) from None
