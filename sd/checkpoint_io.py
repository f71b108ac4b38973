"""Read Stable Diffusion checkpoint files (.safetensors and torch-zip .ckpt) lazily and safely.

No tutorial counterpart: hkproj's `model_loader.py` calls `torch.load` on the whole file. Here only the
header (safetensors) or the pickle (.ckpt) is parsed, with a restricted unpickler that never runs code
from the file, and each tensor is read straight from disk into its destination on demand.
References: safetensors format (github.com/huggingface/safetensors#format); torch/serialization.py
(`_load`, `persistent_load`) and torch/_weights_only_unpickler.py; diffusers issue #8874 (Lightning globals).
"""

from __future__ import annotations

import _compat_pickle  # the Python 2 -> 3 name table that pickle itself uses (fix_imports)
import collections
import collections.abc
import dataclasses
import io
import json
import math
import os
import pathlib
import pickle
import struct
import sys
import zipfile
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["CheckpointError", "UnsafeCheckpointError", "TensorRecord", "Checkpoint", "open_checkpoint"]


class CheckpointError(ValueError):
    """The file is not a readable checkpoint: missing pieces, truncated, not a checkpoint, unsupported format."""


class UnsafeCheckpointError(CheckpointError):
    """A .ckpt whose pickle tries to call code (os.system, builtins.exec, ...). Nothing from it was run."""


# --------------------------------------------------------------------------------------------------
# Tensor records: where one tensor's bytes live, and how to read them.
# --------------------------------------------------------------------------------------------------


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _refuse_setstate(self: Any, state: Any) -> None:
    # dataclass(frozen=True, slots=True) would otherwise add a __setstate__ that sets every field, letting a pickle's
    # BUILD opcode re-point a record at another file. Defined in each class body, as dataclass only keeps it there.
    raise CheckpointError(f"malformed checkpoint pickle: it tries to set the state of a {type(self).__name__}")


# frozen + slots + no __setstate__: nothing in a pickle can change a record once the loader has validated it.
@dataclass(frozen=True, slots=True)
class TensorRecord:
    """One tensor of a checkpoint, not yet read: its name, dtype and shape, and where its bytes are."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    _path: str = field(repr=False)
    _offset: int = field(repr=False)  # absolute byte offset in the file of the tensor's first element
    _stride: tuple[int, ...] = field(repr=False)  # in elements, as torch strides; contiguous for safetensors

    __setstate__ = _refuse_setstate

    def __reduce__(self):  # ordinary pickling / copy still work, through the constructor
        return type(self), (self.key, self.dtype, self.shape, self._path, self._offset, self._stride)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def _is_contiguous(self) -> bool:
        # Dimensions of size 1 may carry any stride (torch's own rule).
        want = _contiguous_strides(self.shape)
        return all(n == 1 or s == w for n, s, w in zip(self.shape, self._stride, want))

    def _span(self) -> int:
        """Elements of storage, from the first element on, that the tensor touches (strides are >= 0)."""
        if self.numel == 0:
            return 0
        return 1 + sum((n - 1) * s for n, s in zip(self.shape, self._stride))

    def read(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """Read this tensor from disk.

        With `out` (a contiguous CPU tensor with the same number of elements, any shape/dtype), fill `out` in place
        and return it: bytes go straight into out's memory when dtypes match; otherwise through one temporary of this
        tensor's size, then out.copy_(tmp) converts. Without out: return a new tensor of self.shape/self.dtype.
        """
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype)
        else:
            self._check_out(out)
        if self.numel == 0:
            return out

        contiguous = self._is_contiguous()
        if contiguous and out.dtype == self.dtype:
            _read_exactly(self._path, self._offset, _byte_view(out))  # straight into out's memory, no copy
            return out

        # A dtype conversion, or a view with gaps (e.g. a transpose saved by torch.save): read the storage span it
        # covers into one temporary, then let copy_ convert / gather. SD's checkpoints hold only contiguous tensors.
        tmp = torch.empty(self.numel if contiguous else self._span(), dtype=self.dtype)
        _read_exactly(self._path, self._offset, _byte_view(tmp))
        src = tmp.view(self.shape) if contiguous else tmp.as_strided(self.shape, self._stride)
        with torch.no_grad():
            out.view(self.shape).copy_(src)
        return out

    def _check_out(self, out: torch.Tensor) -> None:
        where = f"TensorRecord.read(out=...) for {self.key!r} {tuple(self.shape)} {self.dtype}"
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{where}: out must be a torch.Tensor, got {type(out).__name__}")
        if out.device.type != "cpu":
            raise ValueError(f"{where}: out must be on the CPU, got {out.device}; read on CPU, then move it")
        if not out.is_contiguous():
            raise ValueError(f"{where}: out must be contiguous")
        if out.numel() != self.numel:
            raise ValueError(f"{where}: out has {out.numel()} elements {tuple(out.shape)}, expected {self.numel}")


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable buffer over the same memory (works for bf16 and 0-dim too)."""
    return memoryview(t.detach().reshape(-1).view(torch.uint8).numpy())


def _read_exactly(path: str, offset: int, buf: memoryview) -> None:
    # Unbuffered plain reads, not mmap: the page cache then never counts toward this process's RSS.
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(buf):  # one read(2) returns at most ~2 GiB, so loop
            n = f.readinto(buf[done:])
            if not n:
                raise CheckpointError(
                    f"{path}: unexpected end of file at byte {offset + done} while reading a tensor "
                    f"(was the file truncated or replaced after it was opened?)"
                )
            done += n


class Checkpoint(collections.abc.Mapping[str, TensorRecord]):
    """The tensors of one checkpoint file, by name; nothing is read until TensorRecord.read()."""

    def __init__(self, path: pathlib.Path, format: str, records: dict[str, TensorRecord], metadata: dict[str, str]):
        self.path = path
        self.format = format  # "safetensors" or "ckpt"
        self.metadata = metadata  # safetensors "__metadata__"; {} for ckpt
        self._records = records

    def __getitem__(self, key: str) -> TensorRecord:
        return self._records[key]

    def __iter__(self):
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, {len(self)} tensors)"


# --------------------------------------------------------------------------------------------------
# open_checkpoint: detect the format by content, then parse headers only.
# --------------------------------------------------------------------------------------------------

_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces
# torch.save's old format begins by pickling this number (torch/serialization.py: MAGIC_NUMBER).
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a .safetensors or torch-zip .ckpt file and list its tensors without reading them."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {path}. Checkpoints go in weights/ "
            f"(e.g. weights/v1-5-pruned-emaonly.safetensors); see weights/README.md for where to download them."
        )
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file (.safetensors or .ckpt)")
    if sys.byteorder != "little":
        raise CheckpointError("checkpoints store little-endian tensors; big-endian machines are not supported")

    file_size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(256)

    # By content, not by extension: a .ckpt renamed .safetensors still loads.
    if head.startswith(_ZIP_MAGIC):
        return _open_torch_zip(path, file_size)
    if len(head) >= 9 and head[8:9] == b"{":
        # safetensors: u64 little-endian header length, then a JSON object (which must start with "{").
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= _SAFETENSORS_MAX_HEADER:
            return _open_safetensors(path, file_size, header_len)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode: a bare pickle
        what = "a legacy (pre-1.6, non-zip) torch pickle" if _LEGACY_MAGIC in head[:16] else "a plain (non-zip) pickle"
        raise CheckpointError(
            f"{path} is {what}; that format is not supported. Use the .safetensors version of these weights, "
            f"or, if you trust the file, re-save it with a recent torch: "
            f"torch.save(torch.load(path, weights_only=True), new_path)."
        )
    raise CheckpointError(f"{path} is not a checkpoint (.safetensors or .ckpt): found {_describe(head, file_size)}")


def _describe(head: bytes, file_size: int) -> str:
    """A short, human description of what a non-checkpoint file looks like."""
    if file_size == 0:
        return "an empty file (a failed download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights themselves (run `git lfs pull`, or download the file directly)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download, e.g. a login or error page?)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"a text file starting {text[:40]!r}"
    return f"{file_size} bytes of unrecognised data starting {head[:8].hex(' ')}"


# ---- safetensors ---------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")]:  # newer torch only
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)


def _is_int(x: Any) -> bool:
    return type(x) is int  # JSON true/false load as bool, a subclass of int: not a size


def _open_safetensors(path: pathlib.Path, file_size: int, header_len: int) -> Checkpoint:
    data_start = 8 + header_len  # data_offsets count from the byte after the header
    if data_start > file_size:
        raise CheckpointError(f"{path}: truncated: expected at least {data_start} bytes, file has {file_size}")
    with open(path, "rb") as f:
        f.seek(8)
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, expected an object")

    metadata = header.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: safetensors __metadata__ must map strings to strings")

    records: dict[str, TensorRecord] = {}
    needed = data_start  # the file must be at least this long
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        dtype_name, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype_name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{where} has unknown dtype {dtype_name!r}; supported: {', '.join(_SAFETENSORS_DTYPES)}"
            )
        if not (isinstance(shape, list) and all(_is_int(n) and n >= 0 for n in shape)):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
        dtype, (begin, end) = _SAFETENSORS_DTYPES[dtype_name], offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CheckpointError(
                f"{where}: {dtype_name} {shape} needs {expected} bytes but data_offsets {offsets} span {end - begin}"
            )
        needed = max(needed, data_start + end)
        shape = tuple(shape)
        records[key] = TensorRecord(key, dtype, shape, str(path), data_start + begin, _contiguous_strides(shape))

    if needed > file_size:
        raise CheckpointError(f"{path}: truncated: expected at least {needed} bytes, file has {file_size}")
    if not records:
        raise CheckpointError(f"{path}: contains no tensors")
    return Checkpoint(path, "safetensors", records, dict(metadata))


# ---- torch zip (.ckpt) ---------------------------------------------------------------------------
# Layout written by torch.save since 1.6: <archive>/data.pkl (the pickled object; each tensor's storage is a
# persistent id ('storage', storage_type, key, location, numel)), <archive>/data/<key> (raw little-endian bytes,
# one uncompressed entry per storage), <archive>/byteorder ("little"; absent in old files), and a few small files.


def _open_torch_zip(path: pathlib.Path, file_size: int) -> Checkpoint:
    with open(path, "rb") as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, EOFError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{path}: truncated or corrupt zip archive ({e}); a .ckpt is a zip file - try downloading it again"
            ) from None
        with zf:
            infos = {info.filename: info for info in zf.infolist()}
            pkl_names = [n for n in infos if n.count("/") == 1 and n.endswith("/data.pkl")]
            if len(pkl_names) != 1:
                if any(n.endswith("constants.pkl") for n in infos):
                    what = "a TorchScript archive (torch.jit.save), not a state-dict checkpoint"
                elif not pkl_names:
                    what = "a zip archive without <archive>/data.pkl, so not a torch checkpoint"
                else:
                    what = f"a zip archive with several data.pkl files ({', '.join(pkl_names)})"
                raise CheckpointError(f"{path} is {what}")
            prefix = pkl_names[0].split("/")[0]

            try:
                if f"{prefix}/byteorder" in infos:
                    byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
                    if byteorder != "little":
                        raise CheckpointError(
                            f"{path} stores {byteorder!r}-endian tensors; only little-endian checkpoints are supported"
                        )
                data_pkl = zf.read(pkl_names[0])
            except CheckpointError:
                raise
            except Exception as e:  # BadZipFile (bad CRC), zlib.error, EOFError on a cut file ...
                raise CheckpointError(f"{path}: truncated or corrupt zip archive ({type(e).__name__}: {e})") from None

            unpickler = _RestrictedUnpickler(io.BytesIO(data_pkl), path, f, file_size, infos, prefix)
            try:
                obj = unpickler.load()
            except CheckpointError:
                raise
            except Exception as e:  # UnpicklingError, EOFError on a cut pickle, TypeError from odd opcodes, ...
                raise CheckpointError(
                    f"{path}: could not read its pickle ({pkl_names[0]}): {type(e).__name__}: {e}"
                ) from None

    return Checkpoint(path, "ckpt", _select_tensors(obj, path), {})


def _select_tensors(obj: Any, path: pathlib.Path) -> dict[str, TensorRecord]:
    """The state dict inside the unpickled object: obj["state_dict"] (how SD's .ckpt wraps it) or obj itself."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        state_dict, where = obj["state_dict"], "its 'state_dict'"
    elif isinstance(obj, dict):
        state_dict, where = obj, "its top-level dict"
    else:
        name = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise CheckpointError(
            f"{path}: contains no tensors: its pickle holds a {name}, not a dict of tensors "
            f"(a whole pickled model? save model.state_dict() instead)"
        )
    # Ints like global_step, placeholders for training metadata and nested non-tensor things are dropped.
    records = {
        k: dataclasses.replace(v, key=k)
        for k, v in state_dict.items()
        if isinstance(k, str) and isinstance(v, TensorRecord)
    }
    if any(r._path != str(path) for r in records.values()):  # cannot happen (see _refuse_setstate); belt and braces
        raise CheckpointError(f"{path}: malformed pickle: a tensor points outside the checkpoint file")
    if not records:
        raise CheckpointError(f"{path}: contains no tensors (looked in {where})")
    return records


@dataclass(frozen=True, slots=True)
class _StorageType:
    """What find_class returns for torch.FloatStorage & co.: just the element dtype."""

    name: str
    dtype: torch.dtype

    __setstate__ = _refuse_setstate


@dataclass(frozen=True, slots=True)
class _Storage:
    """What persistent_load returns for one storage: where its bytes are in the file."""

    key: str
    offset: int  # absolute byte offset of the storage's first byte
    nbytes: int
    dtype: torch.dtype

    __setstate__ = _refuse_setstate


class _Placeholder:
    """Stands in for any class or function a pickle names that is neither allowed nor denied (e.g. Lightning's
    ModelCheckpoint). The module is never imported and nothing runs: instances accept any constructor arguments,
    __new__ (NEWOBJ), state (BUILD) and items, keep nothing, and cannot be called."""

    def __new__(cls, *args: Any, **kwargs: Any):
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:  # SETITEM(S) on a dict subclass
        pass

    def append(self, item: Any) -> None:  # APPEND(S) on a list subclass
        pass

    def extend(self, items: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<placeholder for {type(self).__module__}.{type(self).__qualname__}>"


# Globals that would run code, touch the system or load more pickles: refused outright, so a malicious file is
# reported as such rather than loaded with the offending object replaced by a placeholder.
_DENIED_MODULES = {
    "os", "posix", "nt", "posixpath", "ntpath", "sys", "subprocess", "_posixsubprocess", "shutil", "socket", "ssl",
    "select", "selectors", "importlib", "imp", "zipimport", "pkgutil", "runpy", "site", "sysconfig", "pickle",
    "_pickle", "pickletools", "copy", "shelve", "dbm", "marshal", "types", "ctypes", "_ctypes", "cffi", "code",
    "codeop", "pty", "tty", "termios", "fcntl", "resource", "mmap", "webbrowser", "multiprocessing",
    "concurrent", "threading", "_thread", "asyncio", "signal", "tempfile", "pathlib", "glob", "fileinput", "io",
    "_io", "operator", "_operator", "functools", "_functools", "inspect", "gc", "weakref", "builtins",
    "__builtin__", "copyreg", "codecs", "_codecs", "platform", "pdb", "bdb", "trace", "timeit",
    "doctest", "unittest", "cProfile", "profile", "urllib", "http", "ftplib", "smtplib", "telnetlib",
    "xmlrpc", "requests", "setuptools", "distutils", "pip", "venv", "ensurepip", "sqlite3", "IPython", "torch",
    "msvcrt", "winreg", "_winapi",
}
_DENIED_NAMES = {  # in any module
    "eval", "exec", "execfile", "compile", "system", "popen", "Popen", "__import__", "getattr", "setattr",
    "delattr", "globals", "locals", "vars", "open", "input", "breakpoint", "exit", "quit", "check_output",
    "check_call", "getoutput", "getstatusoutput", "run_path", "run_module", "load", "loads",
}
_DENIED_PREFIXES = ("numpy.testing", "numpy.f2py", "numpy.distutils")  # run compilers / subprocesses

_TORCH_DTYPES = {name: v for name in dir(torch) if isinstance(v := getattr(torch, name), torch.dtype)}
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,  # bytes; the tensor's dtype then comes from _rebuild_tensor_v3
}
# torch classes that appear as *types* in ordinary pickles (tensor subclass reconstruction, pickled nn.Modules):
# inert placeholders are fine for them.
_TORCH_PLACEHOLDER_OK = ("torch._tensor.Tensor", "torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.modules.")


class _Guarded:
    """A callable that a pickle's BUILD cannot modify (a plain function would accept __defaults__ & co.)."""

    __slots__ = ("_fn",)

    def __init__(self, fn: Any) -> None:
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._fn(*args, **kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        raise CheckpointError("malformed checkpoint pickle: it tries to modify a loader function")

    __setstate__ = _refuse_setstate


def _safe_bytes(kind: type):
    """bytes / bytearray from bytes or (str, encoding) only: never bytes(<huge int>)."""

    def make(*args: Any) -> Any:
        if not args or isinstance(args[0], (bytes, bytearray)) or (isinstance(args[0], str) and len(args) == 2):
            return kind(*args)
        raise CheckpointError(f"refusing {kind.__name__}{args!r} in a checkpoint pickle")

    return make


def _safe_codecs_encode(text: Any, encoding: str = "utf-8") -> bytes:
    # Protocol-2 pickles spell bytes as _codecs.encode(str, "latin1").
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise CheckpointError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r}) in a checkpoint pickle")
    return text.encode(encoding)


def _safe_size(dims: Any = ()) -> torch.Size:
    dims = tuple(dims)
    if not all(_is_int(d) for d in dims):
        raise CheckpointError(f"torch.Size{dims!r} in a checkpoint pickle holds non-integers")
    return torch.Size(dims)


def _safe_device(*args: Any) -> torch.device:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str) and (len(args) == 1 or _is_int(args[1]))):
        raise CheckpointError(f"torch.device{args!r} in a checkpoint pickle is malformed")
    return torch.device(*args)


_SAFE_BUILTINS = {
    "set": set, "frozenset": frozenset, "slice": slice, "tuple": tuple, "list": list, "dict": dict, "int": int,
    "float": float, "str": str, "bool": bool, "complex": complex, "range": range, "object": object,
    "bytes": _Guarded(_safe_bytes(bytes)), "bytearray": _Guarded(_safe_bytes(bytearray)),
    "Ellipsis": Ellipsis, "NotImplemented": NotImplemented,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles torch's data.pkl, turning tensors into TensorRecords. Only an explicit allowlist of globals maps to
    real (harmless) objects; dangerous ones raise UnsafeCheckpointError; everything else becomes a _Placeholder."""

    def __init__(self, file: io.BytesIO, path: pathlib.Path, zip_fh: io.BufferedReader, file_size: int,
                 infos: dict[str, zipfile.ZipInfo], prefix: str):
        super().__init__(file)
        self._path, self._fh, self._file_size, self._infos, self._prefix = path, zip_fh, file_size, infos, prefix
        self._entries: dict[str, tuple[int, int]] = {}  # storage key -> (data offset, size in the zip)
        self._placeholders: dict[str, type] = {}
        # Our stand-ins for torch._utils._rebuild_*, guarded so that BUILD cannot touch them.
        self._rebuilders = {
            name: _Guarded(getattr(self, name))
            for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3",
                         "_rebuild_parameter", "_rebuild_parameter_with_state")
        }
        self._rebuild_from_type = _Guarded(self._rebuild_from_type_v2)

    # ---- globals ---------------------------------------------------------------------------------

    def find_class(self, module: str, name: str) -> Any:
        if not (isinstance(module, str) and isinstance(name, str)):
            raise CheckpointError(f"{self._path}: malformed global in its pickle: {module!r} {name!r}")
        # Protocol-2 pickles (torch.save's default) use Python 2 names: __builtin__, copy_reg, ...
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"

        allowed = self._allowed(module, name)
        if allowed is not None:
            return allowed
        root = module.split(".")[0]
        if (root in _DENIED_MODULES or name.split(".")[-1] in _DENIED_NAMES or full.startswith(_DENIED_PREFIXES)) \
                and not (root == "torch" and full.startswith(_TORCH_PLACEHOLDER_OK)):
            raise UnsafeCheckpointError(
                f"refusing to load {self._path}: the checkpoint's pickle calls {full}, which is not on the list of "
                f"safe tensor loaders; no code from it was run. Use the .safetensors version of these weights."
            )
        return self._placeholder(full, module, name)

    def _allowed(self, module: str, name: str) -> Any:
        if module == "torch._utils":
            if name in self._rebuilders:
                return self._rebuilders[name]
            return self._unsupported_tensor(name) if name.startswith("_rebuild_") else None
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self._rebuild_from_type
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch":
            if name in _TORCH_DTYPES:
                return _TORCH_DTYPES[name]
            return {"Size": _Guarded(_safe_size), "device": _Guarded(_safe_device)}.get(name)
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "builtins":
            return _SAFE_BUILTINS.get(name)
        if module == "_codecs" and name == "encode":
            return _Guarded(_safe_codecs_encode)
        if module == "copyreg" and name == "_reconstructor":
            return _Guarded(self._reconstructor)
        return None

    def _placeholder(self, full: str, module: str, name: str) -> type:
        # A fresh, empty class named after the global; creating it imports nothing.
        if full not in self._placeholders:
            attrs = {"__module__": module, "__qualname__": name}
            self._placeholders[full] = type(name.split(".")[-1], (_Placeholder,), attrs)
        return self._placeholders[full]

    def _reconstructor(self, cls: Any, base: Any, state: Any) -> Any:
        # copyreg._reconstructor(cls, base, state) rebuilds protocol 0/1 objects; only ever build placeholders.
        if isinstance(cls, type) and issubclass(cls, _Placeholder):
            return cls.__new__(cls)
        raise CheckpointError(f"{self._path}: unsupported copyreg._reconstructor({cls!r}, ...) in its pickle")

    # ---- storages ----------------------------------------------------------------------------------

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise CheckpointError(f"{self._path}: unsupported persistent id in its pickle: {pid!r:.100}")
        typename, storage_type, key, _location, numel = pid  # location ("cpu", "cuda:0") is ignored: we read to CPU
        typename = typename.decode("ascii") if isinstance(typename, bytes) else typename
        key = key.decode("ascii") if isinstance(key, bytes) else key
        if typename != "storage" or not isinstance(storage_type, _StorageType) or not isinstance(key, str) \
                or not _is_int(numel) or numel < 0:
            raise CheckpointError(f"{self._path}: malformed storage reference in its pickle: {pid!r:.200}")
        offset, size = self._entry(key)
        nbytes = numel * storage_type.dtype.itemsize
        if nbytes > size:
            raise CheckpointError(
                f"{self._path}: storage {key} should hold {nbytes} bytes but its zip entry has {size} (corrupt file)"
            )
        return _Storage(key, offset, nbytes, storage_type.dtype)

    def _entry(self, key: str) -> tuple[int, int]:
        """(absolute data offset, size) of <archive>/data/<key>, from the entry's own local header."""
        if key in self._entries:
            return self._entries[key]
        name = f"{self._prefix}/data/{key}"
        info = self._infos.get(name)
        if info is None:
            raise CheckpointError(f"{self._path}: missing storage entry {name!r} (truncated or corrupt checkpoint)")
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{self._path}: storage entry {name!r} is compressed (zip method {info.compress_type}); torch writes "
                f"storages uncompressed, so this file was re-zipped: re-save it with torch.save or use .safetensors"
            )
        # Local header: 30 fixed bytes, then the file name and an extra field whose length can differ from the
        # central directory's (torch pads it so data is 64-byte aligned), so read it here.
        self._fh.seek(info.header_offset)
        local = self._fh.read(30)
        if len(local) < 30 or local[:4] != _ZIP_MAGIC:
            raise CheckpointError(
                f"{self._path}: corrupt zip: no local header for {name!r} at byte {info.header_offset}"
            )
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        offset = info.header_offset + 30 + name_len + extra_len
        needed = offset + info.file_size
        if needed > self._file_size:
            raise CheckpointError(
                f"{self._path}: truncated: expected at least {needed} bytes, file has {self._file_size}"
            )
        self._entries[key] = (offset, info.file_size)
        return self._entries[key]

    # ---- tensors: our own versions of torch._utils._rebuild_*, returning records ---------------------

    def _record(self, storage: Any, storage_offset: Any, size: Any, stride: Any, dtype: Any = None) -> TensorRecord:
        """A validated record for storage[storage_offset:] viewed with size/stride (in elements of dtype)."""
        if not isinstance(storage, _Storage):
            raise CheckpointError(
                f"{self._path}: malformed tensor in its pickle (its storage is a {type(storage).__name__})"
            )
        dtype = storage.dtype if dtype is None else dtype
        if isinstance(size, list):
            size = tuple(size)
        if isinstance(stride, list):
            stride = tuple(stride)
        if not (isinstance(dtype, torch.dtype) and _is_int(storage_offset) and storage_offset >= 0
                and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                and all(_is_int(n) and n >= 0 for n in size + stride)):
            raise CheckpointError(
                f"{self._path}: malformed tensor in its pickle: "
                f"offset {storage_offset!r}, size {size!r}, stride {stride!r}"
            )
        offset = storage.offset + storage_offset * dtype.itemsize
        record = TensorRecord("", dtype, size, str(self._path), offset, stride)  # keyed later, in _select_tensors
        end = (storage_offset + record._span()) * dtype.itemsize
        if record.numel and end > storage.nbytes:
            raise CheckpointError(
                f"{self._path}: a tensor {size} reaches byte {end} of storage {storage.key}, "
                f"which holds {storage.nbytes}"
            )
        return record

    def _rebuild_tensor(self, storage, storage_offset, size, stride):
        return self._record(storage, storage_offset, size, stride)

    def _rebuild_tensor_v2(self, storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        if metadata and any(metadata.values()):  # conj / neg bits
            raise CheckpointError(f"{self._path}: tensors with conj/neg bits ({metadata}) are not supported")
        return self._record(storage, storage_offset, size, stride)

    def _rebuild_tensor_v3(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                           metadata=None):
        # Newer dtypes (uint16, float8, ...) are saved as an UntypedStorage plus an explicit dtype.
        if metadata and any(metadata.values()):
            raise CheckpointError(f"{self._path}: tensors with conj/neg bits ({metadata}) are not supported")
        return self._record(storage, storage_offset, size, stride, dtype)

    def _rebuild_parameter(self, data, requires_grad=False, backward_hooks=None):
        return data  # an nn.Parameter is just its tensor here

    def _rebuild_parameter_with_state(self, data, requires_grad, backward_hooks, state):
        return data

    def _rebuild_from_type_v2(self, func, new_type, args, state):
        # Tensors carrying Python state are saved as (_rebuild_from_type_v2, (func, type, args, state)).
        if not any(func is f for f in self._rebuilders.values()):
            raise CheckpointError(f"{self._path}: unsupported tensor reconstruction {func!r} in its pickle")
        return func(*args)

    def _unsupported_tensor(self, name: str):
        def fail(*args: Any, **kwargs: Any) -> Any:
            raise CheckpointError(
                f"{self._path}: contains a tensor kind this loader does not support (torch._utils.{name}: "
                f"sparse, quantized, nested or numpy-backed)"
            )

        return _Guarded(fail)
