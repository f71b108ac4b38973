"""Tests for sd/checkpoint_io.py: opening .safetensors (safe_open) and torch-zip .ckpt files (torch's weights-only
unpickler) safely. Round trips against safetensors.torch.save_file and torch.save, hostile pickles that must not run,
Lightning-style training metadata that must load, and clear errors for broken files. CPU, a few seconds.
"""

import os
import pickle
import struct
import sys
import types
import zipfile

import pytest
import safetensors.torch
import torch

from sd.checkpoint_io import CheckpointError, UnsafeCheckpointError, open_checkpoint


def make_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(4, 2, 3, generator=g).half(),
        "bf16": torch.randn(7, generator=g).bfloat16(),
        "f64": torch.randn(2, 2, generator=g).double(),
        "i64": torch.randint(-(2**40), 2**40, (6,), generator=g),
        "i32": torch.randint(-100, 100, (2, 3), generator=g, dtype=torch.int32),
        "u8": torch.randint(0, 255, (5,), generator=g, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical: same dtype, shape and bytes (so NaN payloads and -0.0 count too)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(a.reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


def read(ckpt, key, dtype=None):
    """What the converter does with a tensor: copy it into fresh memory (converting the dtype), then release it."""
    src = ckpt[key]
    out = torch.empty(src.shape, dtype=dtype or src.dtype)
    out.copy_(src)
    ckpt.release(key)
    return out


def save_ckpt(obj, path, **kwargs):
    torch.save(obj, path, **kwargs)
    return path


def rezip(src, dst, edit):
    """Copy a zip entry by entry; edit(name, data) returns (name, data, compress_type) or None to drop the entry."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            edited = edit(info.filename, zin.read(info.filename))
            if edited is not None:
                name, data, compression = edited
                zout.writestr(name, data, compress_type=compression)
    return dst


# ---- round trips ----------------------------------------------------------------------------------


def test_safetensors_round_trip(tmp_path):
    sd = make_state_dict()
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(sd, path, metadata={"format": "pt", "note": "hello"})

    ckpt = open_checkpoint(path)
    assert ckpt.format == "safetensors"
    assert ckpt.metadata == {"format": "pt", "note": "hello"}
    assert set(ckpt) == set(sd) and len(ckpt) == len(sd)
    for key, t in sd.items():
        assert (ckpt[key].dtype, ckpt[key].shape) == (t.dtype, t.shape)
        assert_same(read(ckpt, key), t)
        assert_same(ckpt[key], t)  # released pages refault from the file: the view still reads the same bytes


@pytest.mark.parametrize("wrapped", [True, False], ids=["state_dict-wrapper", "bare-dict"])
def test_ckpt_round_trip(tmp_path, wrapped):
    sd = make_state_dict()
    obj = {"state_dict": sd, "global_step": 470000, "epoch": 3} if wrapped else sd
    path = save_ckpt(obj, tmp_path / "model.ckpt")

    ckpt = open_checkpoint(path)
    assert ckpt.format == "ckpt" and ckpt.metadata == {}
    assert set(ckpt) == set(sd)  # global_step / epoch dropped
    for key, t in sd.items():
        assert (ckpt[key].dtype, ckpt[key].shape) == (t.dtype, t.shape)
        assert_same(read(ckpt, key), t)
        assert_same(ckpt[key], t)


def test_ckpt_metadata_is_its_top_level_strings(tmp_path):
    """How save_standard_weights records configs in a .ckpt: str -> str entries beside "state_dict". Anything else at
    the top level (counters, nested dicts, bytes, placeholders) or inside the state dict is not metadata."""
    sd = make_state_dict()
    obj = {"state_dict": {**sd, "inner": "not metadata"}, "sd_configs": '{"clip": {}}', "sd_image_size": "64",
           "pytorch-lightning_version": "1.4.2", "global_step": 470000, "hparams": {"name": "x"}, "raw": b"bytes",
           7: "an int key"}
    ckpt = open_checkpoint(save_ckpt(obj, tmp_path / "model.ckpt"))
    assert ckpt.metadata == {"sd_configs": '{"clip": {}}', "sd_image_size": "64", "pytorch-lightning_version": "1.4.2"}
    assert set(ckpt) == set(sd)


@pytest.mark.parametrize("protocol", [1, 4])
def test_ckpt_with_another_pickle_protocol_is_named(tmp_path, protocol):
    # torch's weights-only unpickler implements protocol 2 (torch.save's default) only.
    path = save_ckpt({"state_dict": make_state_dict()}, tmp_path / "m.ckpt", pickle_protocol=protocol)
    with pytest.raises(CheckpointError, match=f"pickle protocol {protocol}|protocol 0 or 1") as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and "torch.save's default protocol" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_copying_converts_dtype(tmp_path, fmt, out_dtype):
    sd = {"w": torch.randn(4, 6, generator=torch.Generator().manual_seed(1))}
    path = tmp_path / f"m.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file(sd, path)
    else:
        torch.save(sd, path)
    assert torch.equal(read(open_checkpoint(path), "w", out_dtype), sd["w"].to(out_dtype))


def test_ckpt_views_parameters_and_newer_dtypes(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    with_state = torch.randn(3)
    with_state.note = "python state"  # saved through torch._tensor._rebuild_from_type_v2
    sd = {
        "base": base,
        "transposed": base.T,  # same storage, strides (1, 6)
        "rows": base[1:3],  # storage offset 6, contiguous
        "column": base[:, 2],  # offset 2, stride 6
        "every_other": base[::2, ::3],
        "param": torch.nn.Parameter(torch.ones(2, 2)),  # torch._utils._rebuild_parameter
        "with_state": with_state,
        "u16": torch.tensor([0, 1, 65535], dtype=torch.int32).to(torch.uint16),  # UntypedStorage + torch._utils._rebuild_tensor_v3
    }
    path = save_ckpt(sd, tmp_path / "views.ckpt")
    ckpt = open_checkpoint(path)
    for key, t in sd.items():  # "base" is released before its views are read: they refault from the file
        assert_same(read(ckpt, key), t.detach())
    assert torch.equal(read(ckpt, "transposed", torch.float16), base.T.half())


def test_format_detected_by_content_not_extension(tmp_path):
    sd = {"w": torch.randn(3, 3)}
    ckpt_named_safetensors = save_ckpt(sd, tmp_path / "really_a_ckpt.safetensors")
    safetensors_named_ckpt = tmp_path / "really_safetensors.ckpt"
    safetensors.torch.save_file(sd, safetensors_named_ckpt)

    assert open_checkpoint(ckpt_named_safetensors).format == "ckpt"
    assert open_checkpoint(safetensors_named_ckpt).format == "safetensors"
    assert_same(open_checkpoint(ckpt_named_safetensors)["w"], sd["w"])
    assert_same(open_checkpoint(safetensors_named_ckpt)["w"], sd["w"])


def test_storage_entries_need_not_be_aligned(tmp_path):
    # zipfile writes no alignment padding (torch.save pads to 64 bytes): offsets come from each local header.
    src = save_ckpt({"a": torch.randn(5), "b": torch.arange(3)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "plain.ckpt", lambda n, d: (n, d, zipfile.ZIP_STORED))
    ckpt = open_checkpoint(dst)
    assert_same(ckpt["a"], torch.load(src)["a"])
    assert_same(ckpt["b"], torch.arange(3))


def _rss_file_kb() -> int:
    """Resident pages of mapped files in this process (kB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc (Linux)")
@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
def test_release_lets_go_of_the_file_pages(tmp_path, fmt):
    # A copy touches every page of the mapped tensor; without release() they stay resident until the mapping goes,
    # and loading would hold the weights twice.
    big = torch.randn(16 * 1024 * 1024)  # 64 MB
    path = tmp_path / f"big.{fmt}"
    if fmt == "safetensors":
        safetensors.torch.save_file({"big": big}, path)
    else:
        torch.save({"big": big}, path)
    ckpt = open_checkpoint(path)
    before = _rss_file_kb()
    out = torch.empty_like(big).copy_(ckpt["big"])
    touched = _rss_file_kb() - before
    ckpt.release("big")
    assert touched > 50_000 and _rss_file_kb() - before < 1_000
    assert torch.equal(out, big) and torch.equal(ckpt["big"], big)  # read again, the pages come back from the file


# ---- safety ---------------------------------------------------------------------------------------


class _Reduce:
    """Pickles as a call of `func(*args)`; defined here so the hostile pickles come from real torch.save output."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _hostile_payloads(marker):
    touch = f"open({str(marker)!r}, 'w').write('pwned')"
    return {
        "os.system": _Reduce(os.system, f"touch {marker}"),
        "builtins.exec": _Reduce(exec, touch),
        "builtins.eval": _Reduce(eval, touch),
        "subprocess.call": _Reduce(__import__("subprocess").call, ["touch", str(marker)]),
        "builtins.getattr": _Reduce(getattr, "text", "upper"),
        "torch.load": _Reduce(torch.load, str(marker)),
    }


@pytest.mark.parametrize("name", list(_hostile_payloads("x")))
@pytest.mark.parametrize("where", ["top-level", "inside-state-dict"])
def test_code_calling_pickle_is_refused_and_not_run(tmp_path, name, where):
    marker = tmp_path / "pwned"
    payload = _hostile_payloads(marker)[name]
    sd = {"w": torch.randn(2)}
    obj = {"state_dict": sd, "evil": payload} if where == "top-level" else {"state_dict": {**sd, "evil": payload}}
    path = save_ckpt(obj, tmp_path / "evil.ckpt")

    with pytest.raises(UnsafeCheckpointError, match="no code from it was run") as err:
        open_checkpoint(path)
    assert not marker.exists()
    func_module = payload.func.__module__  # posix.system on Linux, builtins.exec, subprocess.call ...
    assert f"{func_module}.{payload.func.__name__}" in str(err.value)
    assert isinstance(err.value, CheckpointError) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", list(_hostile_payloads("x")))
@pytest.mark.parametrize("protocol", [1, 4])
def test_code_calling_pickle_in_another_protocol_is_refused_and_not_run(tmp_path, name, protocol):
    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.randn(2)}, "evil": _hostile_payloads(marker)[name]}
    path = save_ckpt(obj, tmp_path / "evil.ckpt", pickle_protocol=protocol)
    with pytest.raises(CheckpointError, match="protocol"):
        open_checkpoint(path)
    assert not marker.exists()


def _write_module(tmp_path, name, body):
    (tmp_path / f"{name}.py").write_text(body)


@pytest.mark.parametrize("protocol", [1, 2, 4])  # 1: copyreg._reconstructor; 2: NEWOBJ; 4: STACK_GLOBAL
def test_unknown_global_is_never_imported(tmp_path, monkeypatch, protocol):
    # evilpkg.Thing is pickled from a stand-in module; at load time a real evilpkg.py that records its own
    # import is on sys.path. A loader that imported it would leave the marker behind.
    marker = tmp_path / "imported"
    fake = types.ModuleType("evilpkg")

    class Thing:
        def __init__(self):
            self.payload = "x" * 10

    Thing.__module__, Thing.__qualname__ = "evilpkg", "Thing"
    fake.Thing = Thing
    monkeypatch.setitem(sys.modules, "evilpkg", fake)
    sd = {"w": torch.randn(3, 2)}
    obj = {"state_dict": sd, "thing": Thing(), "things": [Thing(), {"k": Thing}], "misc": [b"x", 1j, slice(2), {3}]}
    path = save_ckpt(obj, tmp_path / "m.ckpt", pickle_protocol=protocol)
    monkeypatch.delitem(sys.modules, "evilpkg")

    _write_module(tmp_path, "evilpkg", f"open({str(marker)!r}, 'w').write('imported')\nclass Thing: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules_before = set(sys.modules)

    if protocol == 2:  # torch.save's default: the tensors load, evilpkg.Thing becomes a placeholder
        ckpt = open_checkpoint(path)
        assert list(ckpt) == ["w"]
        assert_same(read(ckpt, "w"), sd["w"])
    else:  # protocols torch's weights-only unpickler does not implement: named, refused before unpickling
        with pytest.raises(CheckpointError, match="protocol"):
            open_checkpoint(path)
    assert not marker.exists()
    # Only a codec may be new: bytes are pickled as _codecs.encode(text, "latin1"), which loads encodings.latin_1.
    assert "evilpkg" not in sys.modules and all(m.startswith("encodings.") for m in set(sys.modules) - modules_before)


def test_lightning_style_metadata_loads(tmp_path, monkeypatch):
    # Like SD's released .ckpt: training metadata holds a callback object whose class lives in a package
    # (pytorch_lightning) that the user need not have. torch.load(weights_only=True) refuses such files.
    pkg = "fake_lightning_callbacks"
    _write_module(
        tmp_path,
        pkg,
        "class ModelCheckpoint:\n"
        "    def __init__(self):\n"
        "        self.monitor, self.best_model_path, self.save_top_k = 'val/loss', '/ckpts/last.ckpt', 3\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    module = __import__(pkg)
    callback = module.ModelCheckpoint()
    callback.best_model_score = torch.tensor(0.125)  # a tensor inside the metadata, dropped like the rest
    sd = {"model.diffusion_model.w": torch.randn(4, 4), "first_stage_model.b": torch.randn(4).half()}
    obj = {
        "state_dict": sd,
        "callbacks": {module.ModelCheckpoint: callback},
        "global_step": 470000,
        "epoch": 5,
        "hparams": {"lr": 1e-4, "betas": (0.9, 0.999), "tags": {"a", "b"}, "name": b"sd"},
    }
    path = save_ckpt(obj, tmp_path / "lightning.ckpt")
    del sys.modules[pkg]  # imported by this test only; gone for good
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    (tmp_path / f"{pkg}.py").unlink()

    with pytest.raises(Exception):  # what plain safe torch.load does with it
        torch.load(path, weights_only=True)

    ckpt = open_checkpoint(path)
    assert set(ckpt) == set(sd)
    for key, t in sd.items():
        assert_same(read(ckpt, key), t)
    assert pkg not in sys.modules


# ---- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights/") as err:
        open_checkpoint(tmp_path / "nope.safetensors")
    assert "nope.safetensors" in str(err.value) and "README" in str(err.value)


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="directory"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "empty file"),
        (b"hello, I am definitely not a checkpoint\n", "text file"),
        (bytes(range(7, 250)) * 3, "unrecognised data"),
        (b"\x80\x99" + bytes(range(200)), "unrecognised data"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 4265146304\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "HTML page"),
    ],
    ids=["empty", "text", "random", "random-0x80", "lfs-pointer", "html"],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a checkpoint") as err:
        open_checkpoint(path)
    assert message in str(err.value) and str(path) in str(err.value)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.randn(100), "b": torch.randn(50)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    expected = rf"truncated: expected at least {len(data)} bytes, file has {len(data) // 2}"
    with pytest.raises(CheckpointError, match=expected):
        open_checkpoint(path)


def test_truncated_safetensors_header(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"a": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(path)


def _safetensors_bytes(header: dict, data: bytes) -> bytes:
    raw = __import__("json").dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# safetensors validates the header; its words follow ours ("not a valid safetensors file: ..."), so the tests
# check ours and the fact that the message names what is wrong.
@pytest.mark.parametrize(
    "header, data, message",
    [
        ({"w": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, 8, "unknown dtype 'F7'"),
        ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8, "not a valid safetensors file: .*shape"),
        ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, "not a valid safetensors file: .*-2"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, 8, "not a valid safetensors file: .*offset"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "__metadata__": {"a": 1}}, 8,
         "not a valid safetensors file: .*string"),
        ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 24, "16 stray bytes after its last tensor"),
        ({}, 0, "contains no tensors"),
    ],
    ids=["unknown-dtype", "size-mismatch", "negative-shape", "bad-offsets", "bad-metadata", "trailing-bytes", "empty"],
)
def test_bad_safetensors_header(tmp_path, header, data, message):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_safetensors_bytes(header, bytes(data)))
    with pytest.raises(CheckpointError, match=message) as err:
        open_checkpoint(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_safetensors_header_not_json(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + bytes(8))
    with pytest.raises(CheckpointError, match="not a valid safetensors file: invalid JSON"):
        open_checkpoint(path)


def test_truncated_ckpt(tmp_path):
    path = save_ckpt({"state_dict": {"a": torch.randn(1000)}}, tmp_path / "m.ckpt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(path)


def test_ckpt_storage_entry_missing(tmp_path):
    src = save_ckpt({"a": torch.randn(10)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "m.ckpt", lambda n, d: None if "/data/" in n else (n, d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="missing storage entry"):
        open_checkpoint(dst)


def test_ckpt_storage_cannot_reach_past_the_file(tmp_path):
    # torch maps each storage at its entry with the size the pickle claims; past the end of the file there is
    # nothing to map, and the tensor is refused rather than read from elsewhere.
    src = save_ckpt({"a": torch.randn(100_000)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "m.ckpt", lambda n, d: (n, d[:12] if "/data/" in n else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="could not read its pickle"):
        open_checkpoint(dst)


def test_ckpt_compressed_storage(tmp_path):
    src = save_ckpt({"a": torch.randn(10)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "m.ckpt", lambda n, d: (n, d, zipfile.ZIP_DEFLATED))
    with pytest.raises(CheckpointError, match="compressed"):
        open_checkpoint(dst)


def test_ckpt_big_endian(tmp_path):
    src = save_ckpt({"a": torch.randn(10)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "m.ckpt",
                lambda n, d: (n, b"big" if n.endswith("/byteorder") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="'big'-endian"):
        open_checkpoint(dst)


def test_ckpt_cut_pickle(tmp_path):
    src = save_ckpt({"a": torch.randn(10)}, tmp_path / "src.ckpt")
    dst = rezip(src, tmp_path / "m.ckpt",
                lambda n, d: (n, d[: len(d) // 2] if n.endswith("data.pkl") else d, zipfile.ZIP_STORED))
    with pytest.raises(CheckpointError, match="could not read its pickle"):
        open_checkpoint(dst)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit is deprecated; such files still exist
def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.ckpt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    with pytest.raises(CheckpointError, match="TorchScript"):
        open_checkpoint(path)


def test_zip_that_is_not_a_torch_checkpoint(tmp_path):
    path = tmp_path / "m.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(CheckpointError, match="data.pkl"):
        open_checkpoint(path)


def test_legacy_torch_pickle(tmp_path):
    path = save_ckpt({"a": torch.randn(3)}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .* torch pickle; that format is not supported") as err:
        open_checkpoint(path)
    assert ".safetensors" in str(err.value)


def test_plain_pickle(tmp_path):
    path = tmp_path / "m.pkl"
    path.write_bytes(pickle.dumps({"a": [1, 2, 3]}, protocol=4))
    with pytest.raises(CheckpointError, match="plain .*pickle; that format is not supported"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "obj", [{"global_step": 5, "epoch": 1}, {"state_dict": {}}, [torch.randn(2)]], ids=["ints", "empty-sd", "list"]
)
def test_ckpt_without_tensors(tmp_path, obj):
    path = save_ckpt(obj, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="contains no tensors"):
        open_checkpoint(path)


class _RetargetedTensor:
    """Pickles as a real tensor rebuild followed by BUILD(state). torch's unpickler then calls tensor.set_(*state):
    a pickle trying to point the tensor somewhere else (another file on disk, past the end of its storage)."""

    def __init__(self, tensor, state):
        self.tensor, self.state = tensor, state

    def __reduce__(self):
        func, args = self.tensor.__reduce_ex__(2)
        return func, args, self.state


@pytest.mark.parametrize("state_kind", ["tuple", "dict", "slots", "storage-past-its-end"])
def test_pickle_cannot_point_a_tensor_elsewhere(tmp_path, state_kind):
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"top secret bytes" * 4)
    fields = ("w", torch.float32, (16,), str(secret), 0, (1,))
    names = ("key", "dtype", "shape", "_path", "_offset", "_stride")
    state = {
        "tuple": fields,
        "dict": dict(zip(names, fields)),
        "slots": (None, dict(zip(names, fields))),
        "storage-past-its-end": (torch.zeros(16).untyped_storage(), 0, (1 << 20,), (1,)),
    }[state_kind]
    path = save_ckpt({"w": _RetargetedTensor(torch.zeros(16), state)}, tmp_path / "m.ckpt")
    with pytest.raises(CheckpointError, match="could not read its pickle"):
        open_checkpoint(path)
