"""The tutorial's own demo cell (hkproj sd/demo.ipynb) runs against sd, changed only where the issue allows:
its two imports (`from sd import model_loader`, `from sd import pipeline`), its file paths (here the embedded model
and sd's tokenizer files), and, on transformers 5, the tokenizer line (see README: the tutorial's
`CLIPTokenizer(vocab, merges_file=...)` raises there). Each edit is spelled out below, so the diff is the test."""

import numpy as np
import pytest
import transformers
from PIL import Image

from sd.cli import EMBEDDED_CHECKPOINT
from sd.tokenizer import TOKENIZER_DIR

# The cell as the tutorial has it (its image-to-image line commented out, as there).
TUTORIAL_CELL = '''
import model_loader
import pipeline
from PIL import Image
from pathlib import Path
from transformers import CLIPTokenizer
import torch

DEVICE = "cpu"

ALLOW_CUDA = False
ALLOW_MPS = False

if torch.cuda.is_available() and ALLOW_CUDA:
    DEVICE = "cuda"
elif (torch.has_mps or torch.backends.mps.is_available()) and ALLOW_MPS:
    DEVICE = "mps"
print(f"Using device: {DEVICE}")

tokenizer = CLIPTokenizer("../data/vocab.json", merges_file="../data/merges.txt")
model_file = "../data/v1-5-pruned-emaonly.ckpt"
models = model_loader.preload_models_from_standard_weights(model_file, DEVICE)

## TEXT TO IMAGE

# prompt = "A dog with sunglasses, wearing comfy hat, looking at camera, highly detailed, ultra sharp, cinematic, 100mm lens, 8k resolution."
prompt = "A cat stretching on the floor, highly detailed, ultra sharp, cinematic, 100mm lens, 8k resolution."
uncond_prompt = ""  # Also known as negative prompt
do_cfg = True
cfg_scale = 8  # min: 1, max: 14

## IMAGE TO IMAGE

input_image = None
# Comment to disable image to image
image_path = "../images/dog.jpg"
# input_image = Image.open(image_path)
# Higher values means more noise will be added to the input image, so the result will further from the input image.
# Lower values means less noise is added to the input image, so output will be closer to the input image.
strength = 0.9

## SAMPLER

sampler = "ddpm"
num_inference_steps = 50
seed = 42

output_image = pipeline.generate(
    prompt=prompt,
    uncond_prompt=uncond_prompt,
    input_image=input_image,
    strength=strength,
    do_cfg=do_cfg,
    cfg_scale=cfg_scale,
    sampler_name=sampler,
    n_inference_steps=num_inference_steps,
    seed=seed,
    models=models,
    device=DEVICE,
    idle_device="cpu",
    tokenizer=tokenizer,
)

# Combine the input image and the output image into a single image.
Image.fromarray(output_image)
'''

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
TUTORIAL_TOKENIZER = 'CLIPTokenizer("../data/vocab.json", merges_file="../data/merges.txt")'


def edited_cell(image_path: str | None = None) -> str:
    """The allowed edits, and nothing else; image_path: also switch image-to-image on, as the cell's comment says."""
    vocab, merges = TOKENIZER_DIR / "vocab.json", TOKENIZER_DIR / "merges.txt"
    tokenizer = f"CLIPTokenizer(vocab={str(vocab)!r}, merges={str(merges)!r})" if TRANSFORMERS_5 else \
        f"CLIPTokenizer({str(vocab)!r}, merges_file={str(merges)!r})"
    edits = [
        ("import model_loader\nimport pipeline\n", "from sd import model_loader\nfrom sd import pipeline\n"),
        (TUTORIAL_TOKENIZER, tokenizer),
        ('"../data/v1-5-pruned-emaonly.ckpt"', repr(str(EMBEDDED_CHECKPOINT))),
    ]
    if image_path is not None:
        edits += [('"../images/dog.jpg"', repr(image_path)),
                  ("# input_image = Image.open(image_path)", "input_image = Image.open(image_path)")]
    cell = TUTORIAL_CELL
    for old, new in edits:
        assert cell.count(old) == 1, old
        cell = cell.replace(old, new)
    return cell


def run_cell(cell: str):
    """Run it as a notebook would, and return the value of its last line (what Jupyter displays)."""
    body, last = cell.rstrip().rsplit("\n", 1)
    namespace: dict = {}
    with pytest.warns(UserWarning, match="has_mps"):  # the tutorial's torch.has_mps is deprecated, still there
        exec(compile(body, "tutorial demo cell", "exec"), namespace)
    return eval(last, namespace), namespace


def test_the_tutorial_cell_runs_text_to_image():
    shown, ns = run_cell(edited_cell())
    output = ns["output_image"]
    assert isinstance(output, np.ndarray) and output.dtype == np.uint8 and output.shape == (64, 64, 3)
    assert isinstance(shown, Image.Image) and shown.size == (64, 64) and np.array_equal(np.asarray(shown), output)
    # The tokenizer built from the files gives the same ids as sd's own, so the same picture as without one.
    again = ns["pipeline"].generate(prompt=ns["prompt"], uncond_prompt="", cfg_scale=8, sampler_name="ddpm",
                                    n_inference_steps=50, seed=42, models=ns["models"], progress=False)
    assert np.array_equal(again, output)


def test_the_tutorial_cell_runs_image_to_image(tmp_path):
    photo = tmp_path / "dog.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(photo)
    shown, ns = run_cell(edited_cell(image_path=str(photo)))
    assert ns["input_image"] is not None and ns["output_image"].shape == (64, 64, 3)
    assert isinstance(shown, Image.Image)


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4 accepts the tutorial's tokenizer line")
def test_transformers_5_refuses_the_tutorials_tokenizer_line():
    """What the README tells tutorial users: on transformers 5 the tutorial's line raises, so write
    CLIPTokenizer(vocab=..., merges=...) (both file names), use sd.load_tokenizer(), or pass no tokenizer."""
    from transformers import CLIPTokenizer

    vocab, merges = str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt")
    with pytest.raises(ValueError, match="both be from memory or both filenames"):
        CLIPTokenizer(vocab, merges_file=merges)
    right = [49406, 320, 1125, 539, 320, 2368, 49407]
    assert CLIPTokenizer(vocab=vocab, merges=merges)("a photo of a cat").input_ids == right
    # ... and the old keyword names load without an error but give wrong ids: the README warns about them.
    assert CLIPTokenizer(vocab_file=vocab, merges_file=merges)("a photo of a cat").input_ids != right
