"""Derive CLIP's tokenizer files (vocab.json, merges.txt, tokenizer_config.json) into sd/data/tokenizer/.

Tutorial part: "CLIP" (hkproj ships data/vocab.json and data/merges.txt, downloaded by hand).
Original: OpenAI CLIP `clip/simple_tokenizer.py: SimpleTokenizer.__init__`, which builds the
encoder from `bpe_simple_vocab_16e6.txt.gz` (MIT, github.com/openai/CLIP); the output is what
transformers' `CLIPTokenizer` reads. Run: `python scripts/make_tokenizer_files.py [file.gz | wheel.whl]`.
"""

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sd.files import atomic_output

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_WHEEL = "clip-anytorch==2.6.0"  # PyPI repackaging of openai/CLIP; ships clip/bpe_simple_vocab_16e6.txt.gz
# sha256 of that file as OpenAI ships it (openai/CLIP, clip-anytorch 2.6.0)
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
N_BYTES = 256  # one base symbol per byte value
N_MERGES = 49152 - 256 - 2  # simple_tokenizer.py: merges[1:49152-256-2+1]; 49152 - 256 - 2 = 48894
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
OUT_DIR = Path(__file__).resolve().parent.parent / "sd" / "data" / "tokenizer"

TOKENIZER_CONFIG = {
    "tokenizer_class": "CLIPTokenizer",
    "model_max_length": 77,  # CLIP's context length (sd.clip.CLIPConfig.n_tokens)
    "bos_token": BOS,
    "eos_token": EOS,
    "pad_token": EOS,  # SD pads with <|endoftext|>, like openai/clip-vit-large-patch14
    "unk_token": EOS,
    "do_lower_case": True,
    "errors": "replace",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-character table, in the order CLIP's vocabulary starts with.

    Printable bytes map to themselves; the other 68 (controls, space, ...) map to chr(256 + n).
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(N_BYTES) if b not in printable]
    return {b: chr(c) for b, c in zip(printable + others, printable + [N_BYTES + n for n in range(len(others))])}


def read_bpe_gz(source: Path) -> bytes:
    """The compressed BPE file, from the .gz itself or from a clip-anytorch / open-clip-torch wheel."""
    if not source.is_file():
        raise SystemExit(f"{source}: no such file")
    if source.suffix == ".gz":
        return source.read_bytes()
    with zipfile.ZipFile(source) as whl:
        names = [n for n in whl.namelist() if n.endswith("/" + BPE_NAME)]
        if not names:
            raise SystemExit(f"{source}: no */{BPE_NAME} inside; "
                             "give the .gz, or a clip-anytorch / open-clip-torch wheel")
        return whl.read(sorted(names)[0])


def download_wheel(dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--dest", str(dest), DEFAULT_WHEEL], check=True)
    return next(dest.glob("*.whl"))


def build(gz: bytes) -> tuple[dict[str, int], list[tuple[str, str]]]:
    lines = gzip.decompress(gz).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:N_MERGES + 1]]  # line 0 is the "#version" header
    assert len(merges) == N_MERGES and all(len(m) == 2 for m in merges), "unexpected BPE file layout"
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    encoder = {token: i for i, token in enumerate(vocab)}
    assert len(encoder) == len(vocab) == 49408, f"expected 49408 distinct tokens, got {len(encoder)} of {len(vocab)}"
    return encoder, merges


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", type=Path,
                        help=f"{BPE_NAME}, or a wheel holding it (default: pip download {DEFAULT_WHEEL})")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        source = args.source or download_wheel(Path(tmp))
        gz = read_bpe_gz(source)
    digest = hashlib.sha256(gz).hexdigest()
    print(f"{digest}  {BPE_NAME}  (from {source.name}{'' if digest == BPE_SHA256 else '; NOT the known OpenAI file'})")
    encoder, merges = build(gz)

    files = {
        # Sorted by id (the dict's insertion order); compact, one JSON line.
        "vocab.json": json.dumps(encoder, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
        "tokenizer_config.json": json.dumps(TOKENIZER_CONFIG, ensure_ascii=False, indent=2) + "\n",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        data = text.encode("utf-8")
        with atomic_output(args.out / name) as tmp:
            tmp.write_bytes(data)
        print(f"{hashlib.sha256(data).hexdigest()}  {name}  ({len(data):,} bytes)")


if __name__ == "__main__":
    main()
