"""Where the models run: a device resolved and checked once, before anything moves; models put back if a call fails.

No tutorial counterpart (the tutorial hard-codes DEVICE = "cuda" / "mps" / "cpu" in its demo). A device that is not
there (cuda on a CPU machine) or that holds no data ("meta": the weights would be gone) is refused with one line,
and a call that fails half-way leaves each model on the device it found it on.
"""

import contextlib
from collections.abc import Iterator, Mapping

import torch

DEVICE_TYPES = ("cpu", "cuda", "mps")  # the devices sd runs on; "auto" picks the best one present
ACCEPTED = "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None, default: torch.device | None = None) -> torch.device:
    """The torch.device for `device` ("auto" / None: the best present, or `default`), or a ValueError saying why it
    cannot be used here and what can."""
    if device is None:
        return default if default is not None else best_device()
    if isinstance(device, str) and device == "auto":
        return best_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be {ACCEPTED}, got {device!r}") from None
    if resolved.type not in DEVICE_TYPES:
        why = " (it holds no data: the weights would be lost)" if resolved.type == "meta" else ""
        raise ValueError(f"device {str(resolved)!r} is not one sd runs on{why}; use {ACCEPTED}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            built = "built without CUDA" if torch.version.cuda is None else "found no usable GPU"
            raise ValueError(f"device {str(resolved)!r}: CUDA is not available here (this torch {torch.__version__} "
                             f"{built}); use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(resolved)!r}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if resolved.type == "mps" and not _mps_available():
        raise ValueError("device 'mps': Apple's Metal (MPS) is not available here; use --device cpu or auto")
    return resolved


def cpu_has_native_bf16() -> bool:
    """AMX tiles or AVX-512-BF16: the CPU does bfloat16 maths in hardware (torch.cpu's own checks)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(check is not None and check() for check in checks)


def fast_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype that runs fastest at little cost in quality: float16 on CUDA and MPS, bfloat16 on a CPU with native
    bf16 (float16 is slow there, and has too little range for the VAE), float32 on other CPUs."""
    device = torch.device(device)
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def fast_memory_format(device: torch.device | str, dtype: torch.dtype) -> torch.memory_format:
    """channels_last (pixels, each with its channels together) for bfloat16 on a CPU, where oneDNN's convolutions
    need no reordering in it: the VAE decode at 512x512 took 0.81x the time, the UNet 0.98x (benchmarks/speed.py's
    machine); in float32 it did not help (1.06x), so elsewhere the default layout."""
    return torch.channels_last if torch.device(device).type == "cpu" and dtype == torch.bfloat16 \
        else torch.contiguous_format


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def run_in_dtype(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    """model(*inputs) in the model's own dtype (float16/bfloat16 weights), the result back in float32."""
    dtype = model_dtype(model)
    return model(*(x.to(dtype) for x in inputs)).float()


@contextlib.contextmanager
def restored_on_failure(models: Mapping[str, torch.nn.Module]) -> Iterator[None]:
    """Run a block that moves models; if it fails (Ctrl-C included), move each model back where it was."""
    placement = {name: model_device(model) for name, model in models.items()}
    try:
        yield
    except BaseException:
        for name, model in models.items():
            with contextlib.suppress(Exception):  # the first failure is the one to report
                model.to(placement[name])
        raise
