"""Reads a PyTorch `.pth` state_dict into numpy arrays without PyTorch.

Both formats `torch.save` has written: the zip archive (PyTorch >= 1.6: archive/data.pkl plus one
raw little-endian file per storage) and the legacy sequence of pickles (magic number, protocol,
system info, the object, storage keys, then each storage's bytes). Tensors are rebuilt from
(storage, offset, size, stride); nothing outside the known torch rebuild functions is unpickled.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path

import numpy as np

_DTYPES = {"FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
           "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
           "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
           "BFloat16Storage": None}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
  def __init__(self, name: str):
    if name not in _DTYPES or _DTYPES[name] is None:
      raise ValueError(f"unsupported tensor storage {name} in the checkpoint")
    self.dtype = np.dtype(_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A view: legacy files fill the storage after unpickling; load_state_dict copies at the end."""
  itemsize = storage.dtype.itemsize
  return np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))


def _rebuild_parameter(data, *unused):
  return data


class _Unpickler(pickle.Unpickler):
  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "collections" and name == "OrderedDict":
      return collections.OrderedDict
    if module == "torch._utils" and name == "_rebuild_tensor_v2":
      return _rebuild_tensor
    if module == "torch._utils" and name == "_rebuild_parameter":
      return _rebuild_parameter
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel, *_ = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"unknown persistent id {kind!r}")
    return self._load_storage(str(key), storage_type.dtype, numel)


def _load_zip(path: Path) -> dict:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = next(n for n in names if n.endswith("/data.pkl") or n == "data.pkl")
    prefix = pkl[: -len("data.pkl")]

    def load_storage(key, dtype, numel):
      return np.frombuffer(archive.read(f"{prefix}data/{key}"), dtype=dtype, count=numel)

    return _Unpickler(io.BytesIO(archive.read(pkl)), load_storage).load()


def _load_legacy(path: Path) -> dict:
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise ValueError(f"{path} is neither a zip nor a legacy PyTorch checkpoint")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info
    pending: dict[str, tuple[np.dtype, int]] = {}
    arrays: dict[str, np.ndarray] = {}

    def load_storage(key, dtype, numel):  # data follows the object: fill in after
      pending[key] = (dtype, numel)
      arrays.setdefault(key, np.empty(numel, dtype))
      return arrays[key]

    result = _Unpickler(f, load_storage).load()
    for key in pickle.load(f):
      dtype, _ = pending[key]
      size = int(np.frombuffer(f.read(8), "<i8")[0])
      arrays[key][:] = np.frombuffer(f.read(size * dtype.itemsize), dtype=dtype)
    return result


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
  """name -> numpy array of a `.pth` file holding a state_dict (or {'state_dict': ...})."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
  result = _load_zip(path) if zipfile.is_zipfile(path) else _load_legacy(path)
  if isinstance(result, dict) and "state_dict" in result:
    result = result["state_dict"]
  if not isinstance(result, dict):
    raise ValueError(f"{path} does not hold a state_dict (found {type(result).__name__})")
  return {k.removeprefix("module."): np.array(v) for k, v in result.items()}
