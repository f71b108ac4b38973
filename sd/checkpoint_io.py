"""Open Stable Diffusion checkpoint files (.safetensors and torch-zip .ckpt) safely, reading no weights yet.
No tutorial counterpart: hkproj's `model_loader.py` calls `torch.load` on the whole file. Here safetensors' `safe_open`
and torch's weights-only unpickler (`torch.load(weights_only=True, mmap=True)`) map the file; nothing from it runs.
References: github.com/huggingface/safetensors#format; torch/_weights_only_unpickler.py; diffusers issue #8874."""

import _compat_pickle  # Python 2 -> 3 names, as pickle's fix_imports uses them
import ctypes
import json
import mmap
import os
import pathlib
import re
import sys
import tempfile
import zipfile
import zlib

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["CheckpointError", "UnsafeCheckpointError", "Checkpoint", "open_checkpoint"]

CKPT_TENSORS_KEY = "state_dict"  # where SD's .ckpt files (PyTorch Lightning's) keep the weights


class CheckpointError(ValueError):
    """The file is not a readable checkpoint: missing pieces, truncated, not a checkpoint, unsupported format."""


class UnsafeCheckpointError(CheckpointError):
    """A .ckpt whose pickle names code to call (os.system, builtins.exec, ...). Nothing from it was run."""


try:  # madvise from the C library, for Checkpoint.release; Windows has none
    _madvise = ctypes.CDLL(None, use_errno=True).madvise
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
except (OSError, AttributeError, TypeError):
    _madvise = None


class Checkpoint(dict):
    """The tensors of one file by name, as views of the mapped file (shapes known, nothing read), and its metadata:
    a .safetensors header's "__metadata__", or a .ckpt's top-level string entries (str -> str, as sd saves them)."""

    def __init__(self, path: pathlib.Path, format: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        super().__init__(tensors)
        self.path, self.format, self.metadata = path, format, metadata  # format: "safetensors" or "ckpt"

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, format={self.format!r}, {len(self)} tensors)"

    def release(self, key: str) -> None:
        """Drop the file's pages that reading `key` brought in. Both libraries map the file privately and never write
        it, but touched pages count toward RSS until the mapping goes: copying every tensor into a fresh parameter would
        hold the weights twice. Neither library lets go of them, so we do: madvise(MADV_DONTNEED) on the whole pages
        inside the tensor's storage (never a neighbour's memory); read again, they refault from the file."""
        storage, page = self[key].untyped_storage(), mmap.PAGESIZE
        start, end = -(-storage.data_ptr() // page) * page, (storage.data_ptr() + storage.nbytes()) // page * page
        if _madvise is not None and hasattr(mmap, "MADV_DONTNEED") and end > start:
            _madvise(start, end - start, mmap.MADV_DONTNEED)


_ZIP_MAGIC = b"PK\x03\x04"
_SAFETENSORS_MAX_HEADER = 100_000_000  # the limit the safetensors library itself enforces
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")  # torch/serialization.py: MAGIC_NUMBER (pre-1.6)


def open_checkpoint(path: str | os.PathLike, nested: bool = False) -> Checkpoint:
    """Open a .safetensors or torch-zip .ckpt file: its tensors' names, shapes and dtypes, and its metadata.
    nested: a pickle's tensors inside nested dicts count too, named by their path ("string_to_param.*", as an
    AUTOMATIC1111 embedding keeps them); else only a flat dict's (or its "state_dict"'s) tensors do."""
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}. Checkpoints go in weights/ (e.g. weights/v1-5-pruned-"
                                f"emaonly.safetensors); see weights/README.md for where to download them.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; expected a checkpoint file (.safetensors or .ckpt)")
    if sys.byteorder != "little":  # torch would byteswap in the mapped pages, which release() assumes are the file's
        raise CheckpointError("checkpoints store little-endian tensors; big-endian machines are not supported")
    with open(path, "rb") as f:
        head = f.read(256)

    # By content, not by extension: a .ckpt renamed .safetensors still loads.
    if head.startswith(_ZIP_MAGIC):
        return _open_ckpt(path, nested)
    if head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= _SAFETENSORS_MAX_HEADER:  # u64 size, JSON header
        return _open_safetensors(path)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):  # PROTO opcode: a bare pickle
        what = "a legacy (pre-1.6, non-zip) torch pickle" if _LEGACY_MAGIC in head[:16] else "a plain (non-zip) pickle"
        raise CheckpointError(f"{path} is {what}; that format is not supported. Use the .safetensors version of these "
                              f"weights, or, if you trust the file, re-save it: torch.save(torch.load(path), new).")
    raise CheckpointError(f"{path} is not a checkpoint (.safetensors or .ckpt): found {_describe(head, path)}")


def open_user_file(path: str | os.PathLike, what: str, kinds: str) -> Checkpoint:
    """open_checkpoint(path, nested=True) for a small file a user names (an embedding, a LoRA): a folder or a missing
    file is said so in the words of `what` ("embedding") and `kinds` (".pt, .safetensors, .bin")."""
    path = pathlib.Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give {what} file ({kinds})")
    if not path.is_file():
        raise FileNotFoundError(f"{what.split()[-1]} not found: {path}")
    return open_checkpoint(path, nested=True)


def _describe(head: bytes, path: pathlib.Path) -> str:
    """A short, human description of what a non-checkpoint file looks like."""
    if not head:
        return "an empty file (a failed download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights themselves (run `git lfs pull`, or download the file directly)"
    if head.lstrip().lower().startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download, e.g. a login or error page?)"
    text = head.decode("utf-8", "replace")
    if "\ufffd" not in text and all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"a text file starting {text[:40]!r}"
    return f"{path.stat().st_size} bytes of unrecognised data starting {head[:8].hex(' ')}"


# ---- safetensors -------------------------------------------------------------------------------------------------


def _open_safetensors(path: pathlib.Path) -> Checkpoint:
    try:
        with safe_open(str(path), framework="pt") as f:  # validates the header against the file's size
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # views of the mapped file: nothing read yet
            metadata = f.metadata() or {}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: {_safetensors_problem(path, str(e))}") from None
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return Checkpoint(path, "safetensors", tensors, metadata)


def _safetensors_problem(path: pathlib.Path, message: str) -> str:
    """safetensors' error in plain words, with byte counts for a file whose size does not match its header."""
    message = message.removeprefix("Error while deserializing header: ")
    if match := re.search(r"unknown variant `([^`]*)`", message):
        return f"a tensor has unknown dtype {match[1]!r} (a damaged file, or one newer than this safetensors)"
    if not re.search(r"incomplete metadata|MetadataIncomplete|invalid header length|InvalidHeaderLength", message):
        return f"not a valid safetensors file: {message}; download it again"
    with open(path, "rb") as f:
        header = f.read(header_len := int.from_bytes(f.read(8), "little"))
    try:  # where the last tensor ends; unknown when the file ends inside the header
        end = max((v["data_offsets"][1] for k, v in json.loads(header).items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        end = 0
    needed, size = 8 + header_len + end, path.stat().st_size
    if size < needed:
        return f"truncated: expected at least {needed} bytes, file has {size} (an interrupted download?)"
    return f"{size - needed} stray bytes after its last tensor ({message}); download it again"


# ---- torch zip (.ckpt) -------------------------------------------------------------------------------------------
# torch.save's layout since 1.6: <archive>/data.pkl (the pickle; each storage a persistent id), <archive>/data/<key>
# (raw bytes, one stored entry per storage), <archive>/byteorder, and a few small files.

# Globals that run code, reach the system or load more pickles. Nothing a pickle names runs here either way (unknown
# ones become placeholders); these mark the file as malicious, so it is refused rather than loaded.
_DENIED_MODULES = {"os", "posix", "nt", "sys", "subprocess", "builtins", "shutil", "socket", "importlib", "runpy",
                   "pickle", "_pickle", "marshal", "ctypes", "code", "types", "io", "pathlib", "operator", "functools",
                   "webbrowser", "pty", "multiprocessing", "asyncio"}
_DENIED_NAMES = {"eval", "exec", "compile", "system", "popen", "Popen", "__import__", "getattr", "setattr", "delattr",
                 "open", "load", "loads", "load_inline", "check_call", "check_output"}
_HARMLESS = {"builtins.slice": slice, "builtins.frozenset": frozenset, "builtins.range": range, "builtins.set": set,
             "builtins.complex": complex, "builtins.Ellipsis": Ellipsis}  # training metadata; older torch lacks some


class _Placeholder:
    """Stands in for a class or function a pickle names that is neither known nor denied (Lightning's ModelCheckpoint):
    its module is never imported; creating, calling or building one accepts anything, keeps nothing, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:  # with __init__ overridden, object.__new__ takes any arguments too
        pass

    def __setstate__(self, state) -> None:
        pass


def _open_ckpt(path: pathlib.Path, nested: bool = False) -> Checkpoint:
    _check_zip(path)
    stand_ins = _stand_ins(path)
    try:
        with torch.serialization.safe_globals(stand_ins), tempfile.TemporaryDirectory() as tmp:
            # torch.load hands a path ending in .safetensors to safetensors: a .ckpt of that name goes through a link.
            if (load_path := path).name.endswith(".safetensors"):
                (load_path := pathlib.Path(tmp, "checkpoint.ckpt")).symlink_to(path.resolve())
            obj = torch.load(load_path, weights_only=True, mmap=True, map_location="cpu")
    except Exception as e:  # UnpicklingError, EOFError or IndexError on a cut pickle, RuntimeError from set_ ...
        raise CheckpointError(f"{path}: {_pickle_problem(e)}") from None
    return Checkpoint(path, "ckpt", _state_dict(_flattened(obj) if nested else obj, path), _ckpt_metadata(obj))


def _flattened(obj: object, prefix: str = "") -> object:
    """A dict of dicts as one flat dict, keys joined by dots; anything else as it is."""
    if not isinstance(obj, dict):
        return obj
    flat = {}
    for key, value in obj.items():
        if isinstance(value, dict) and isinstance(key, str):
            flat.update(_flattened(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}" if isinstance(key, str) else key] = value
    return flat


def _ckpt_metadata(obj: object) -> dict[str, str]:
    """The unpickled object's top-level str -> str entries (sd_configs, sd_image_size, Lightning's version string);
    counters, nested dicts and placeholders are not metadata."""
    if not isinstance(obj, dict):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}


def _check_zip(path: pathlib.Path) -> None:
    """What torch's loader does not check. With mmap=True it maps each storage's bytes where they lie, so a compressed
    (re-zipped) entry or a big-endian file would load as garbage; and it reads pickle protocol 2 only. Not checked: that
    an entry holds as many bytes as the pickle claims (torch does not say which entry a storage came from; a hand-made
    file can make a tensor read on into the same file's next bytes, never past its end: set_ refuses)."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            pkls = [name for name in infos if name.count("/") == 1 and name.endswith("/data.pkl")]
            prefix = pkls[0].split("/")[0] if pkls else ""
            byteorder = zf.read(f"{prefix}/byteorder") if f"{prefix}/byteorder" in infos else b"little"
            head = zf.read(pkls[0])[:2] if len(pkls) == 1 else b""
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, zlib.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt zip archive ({e}); download it again") from None
    if any(name.endswith("/constants.pkl") for name in infos):
        raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a state-dict checkpoint")
    if len(pkls) != 1:
        raise CheckpointError(f"{path} is a zip archive with {len(pkls)} <archive>/data.pkl, so not a torch checkpoint")
    if byteorder != b"little":
        raise CheckpointError(f"{path} stores {byteorder.decode('ascii', 'replace')!r}-endian tensors; "
                              f"only little-endian checkpoints are supported")
    compressed = [name for name, info in infos.items() if "/data/" in name and info.compress_type != zipfile.ZIP_STORED]
    if compressed:
        raise CheckpointError(f"{path}: storage entry {compressed[0]!r} is compressed; torch writes storages stored, "
                              f"so this file was re-zipped: re-save it with torch.save, or use .safetensors")
    if head != b"\x80\x02":  # PROTO 2; protocols 0 and 1 have no PROTO opcode
        protocol = head[1] if head[:1] == b"\x80" else "0 or 1"
        raise CheckpointError(f"{path}: its pickle ({pkls[0]}) uses pickle protocol {protocol}; torch's weights-only "
                              f"unpickler, which keeps its code from running, reads protocol 2 only. Re-save it with "
                              f"torch.save's default protocol, or use the .safetensors version of these weights.")


def _stand_ins(path: pathlib.Path) -> list[tuple[object, str]]:
    """(object, name) for each global torch's unpickler does not know: harmless builtins as themselves, anything else
    as an inert placeholder class registered under its name, so its module is never imported. Denied ones raise."""
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:
        raise CheckpointError(f"{path}: {_pickle_problem(e)}") from None
    stand_ins = []
    for full in sorted(unknown):  # as the pickle spells it; protocol 2 writes subprocess.call as commands.call
        module, _, name = full.rpartition(".")
        module, name = _compat_pickle.NAME_MAPPING.get((module, name),
                                                       (_compat_pickle.IMPORT_MAPPING.get(module, module), name))
        if f"{module}.{name}" in _HARMLESS:
            stand_ins.append((_HARMLESS[f"{module}.{name}"], full))
        elif module.split(".")[0] in _DENIED_MODULES or name in _DENIED_NAMES:
            raise UnsafeCheckpointError(f"refusing to load {path}: its pickle calls {module}.{name}, which is not a "
                                        f"tensor loader; no code from it was run. Use the .safetensors version.")
        else:
            stand_ins.append((type(name, (_Placeholder,), {"__module__": module, "__qualname__": name}), full))
    return stand_ins


def _pickle_problem(e: Exception) -> str:
    """torch's error in one line: a missing zip entry named, the unpickler's message without torch's advice around it
    (re-running with weights_only=False, which would run the file's code), or set_'s complaint about a tensor."""
    text = str(e).strip()
    if match := re.search(r"failed locating file ([^\s:]+)", text):
        return f"missing storage entry {match[1]!r} (a truncated or corrupt checkpoint; download it again)"
    if text.startswith("Weights only load failed"):  # torch's advice, the unpickler's message, a link to the docs
        text = re.split(r"\n\s*\n", text)[-2]
    line = text.split("WeightsUnpickler error: ")[-1].strip().split("\n")[0] if text else ""
    return f"could not read its pickle (data.pkl): {type(e).__name__}{': ' + line[:300] if line else ''}"


def _state_dict(obj: object, path: pathlib.Path) -> dict[str, torch.Tensor]:
    """The tensors in the unpickled object: obj["state_dict"] (how SD's .ckpt wraps them) or obj itself."""
    state_dict = obj.get(CKPT_TENSORS_KEY) if isinstance(obj, dict) else None
    state_dict = state_dict if isinstance(state_dict, dict) else obj
    if not isinstance(state_dict, dict):
        kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
        raise CheckpointError(f"{path}: contains no tensors: its pickle holds a {kind}, not a dict of tensors "
                              f"(a whole pickled model? save model.state_dict() instead)")
    # Counters (global_step), training metadata and placeholders are dropped.
    tensors = {k: v for k, v in state_dict.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    odd = [k for k, v in tensors.items() if v.layout != torch.strided or v.is_quantized or v.device.type != "cpu"]
    if odd:
        raise CheckpointError(f"{path}: tensor {odd[0]!r} is sparse, quantized or meta; only dense ones are supported")
    return tensors
