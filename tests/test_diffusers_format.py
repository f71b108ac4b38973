"""sd.diffusers_format: diffusers' names for the original layout, key for key as diffusers' own single-file converters
give them (SD 1.5's full layout and tiny configs), and folders written by save_pretrained loading to the outputs
diffusers' and transformers' from_pretrained give, with clear errors for folders our models cannot represent."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from reference import diffusers_unet, diffusers_vae, random_models, tiny_configs, transformers_clip
from sd.checkpoint_io import CheckpointError
from sd.clip import CLIPConfig
from sd.decoder import VAEConfig
from sd.diffusers_format import TEXT_MODEL, ldm_to_diffusers
from sd.diffusion import DiffusionConfig
from sd.model_converter import IGNORED_KEYS, ConversionError, make_rules, to_standard_weights
from sd.model_loader import build_models, checkpoint_image_size, preload_models_from_standard_weights

KEYS_FILE = Path(__file__).parent / "data" / "sd15_ldm_keys.json"  # every key of v1-5-pruned-emaonly, with shapes
RTOL = 1e-5
SAFETENSORS, BIN = "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"


# --- the mapping, against diffusers' converters ---------------------------------------------------------------------


class Tagged:
    """Stands in for a tensor in diffusers' converters (they index, slice and read .shape / .ndim, nothing more):
    it remembers the checkpoint key it came from, through the slicing of conv1x1 kernels to Linear weights."""

    def __init__(self, key: str, shape):
        self.key, self.shape = key, tuple(shape)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __getitem__(self, index):
        kept = [n for n, i in zip(self.shape, index) if isinstance(i, slice)]  # an integer index drops its dim
        return Tagged(self.key, kept + list(self.shape[len(index):]))


def diffusers_names(checkpoint: dict, layers_per_block: int, vae_levels: int) -> dict[str, tuple[str, str]]:
    """ldm key -> (component, diffusers key), as diffusers.loaders.single_file_utils converts a checkpoint."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint)

    vae_config = {"down_block_types": ["DownEncoderBlock2D"] * vae_levels,
                  "up_block_types": ["UpDecoderBlock2D"] * vae_levels}
    converted = {"unet": convert_ldm_unet_checkpoint(checkpoint, {"layers_per_block": layers_per_block}),
                 "vae": convert_ldm_vae_checkpoint(checkpoint, vae_config),
                 "text_encoder": convert_ldm_clip_checkpoint(checkpoint)}
    names = {}
    for component, state_dict in converted.items():
        for key, tagged in state_dict.items():
            assert tagged.key not in names, f"diffusers reads {tagged.key} twice"
            names[tagged.key] = (component, key)
    return names


def test_sd15_mapping_is_diffusers():
    keys = json.loads(KEYS_FILE.read_text())["keys"]
    theirs = diffusers_names({k: Tagged(k, v["shape"]) for k, v in keys.items()}, layers_per_block=2, vae_levels=4)
    ours = ldm_to_diffusers(build_models({}, device="meta"))
    assert ours == {k: v for k, v in theirs.items() if k not in IGNORED_KEYS}  # every key, the same name
    assert len(set(ours.values())) == len(ours) == len(keys) - 15  # no diffusers key twice; all the file's weights
    examples = {  # one per kind of renaming
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
            ("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"),
        "model.diffusion_model.output_blocks.2.1.conv.weight": ("unet", "up_blocks.0.upsamplers.0.conv.weight"),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight":
            ("unet", "down_blocks.1.resnets.0.conv_shortcut.weight"),
        "first_stage_model.decoder.up.3.block.0.conv1.weight": ("vae", "decoder.up_blocks.0.resnets.0.conv1.weight"),
        "first_stage_model.encoder.mid.attn_1.proj_out.weight":
            ("vae", "encoder.mid_block.attentions.0.to_out.0.weight"),
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight":
            ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj.weight")}
    assert {k: ours[k] for k in examples} == examples


WIDE = {"clip": CLIPConfig.tiny(), "vae": VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=2, n_groups=4),
        "diffusion": DiffusionConfig(model_channels=16, channel_mult=(1, 2, 2, 2), n_res_blocks=2, n_heads=2,
                                     attention_levels=(False, True, True, False), d_context=32, n_groups=8)}


@pytest.mark.parametrize("configs", [tiny_configs(), tiny_configs(in_channels=9), WIDE],
                         ids=["tiny", "tiny-inpainting", "four-levels-attention-in-the-middle"])
def test_tiny_mapping_is_diffusers(configs):
    models = build_models(configs, device="meta")
    checkpoint = {key: Tagged(key, rule.their_shape())
                  for name, model in models.items() for rule in make_rules(name, model) for key in rule.theirs}
    ours = ldm_to_diffusers(models)
    vae_levels = len(configs["vae"].block_out_channels)
    assert ours == diffusers_names(checkpoint, configs["diffusion"].n_res_blocks, vae_levels)

    # ... and the names are exactly the diffusers / transformers models' parameters (the builders load strictly).
    weights = to_standard_weights(build_models(configs))
    expected = {"unet": set(diffusers_unet(configs["diffusion"], weights).state_dict()),
                "vae": set(diffusers_vae(configs["vae"], weights).state_dict()),
                "text_encoder": {TEXT_MODEL + k.removeprefix(TEXT_MODEL)  # transformers >= 5 drops the level
                                 for k in transformers_clip(configs["clip"], weights).state_dict()}}
    for component, names in expected.items():
        assert {name for c, name in ours.values() if c == component} == names, component


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'unet'; known: clip, encoder, decoder, diffusion"):
        ldm_to_diffusers({"unet": build_models(tiny_configs(), device="meta")["diffusion"]})


# --- folders written by save_pretrained -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def original():
    """Random tiny models, their weights in the original layout, and diffusers / transformers models holding them
    (through diffusers' own converter, never ours)."""
    configs = tiny_configs()
    weights = to_standard_weights(random_models(configs, seed=11))
    refs = {"unet": diffusers_unet(configs["diffusion"], weights), "vae": diffusers_vae(configs["vae"], weights),
            "text_encoder": transformers_clip(configs["clip"], weights)}
    return configs, weights, refs


def write_folder(folder: Path, refs: dict, form: str) -> Path:
    """The three components as save_pretrained writes them, in one of the forms hub folders come in."""
    for component, model in refs.items():
        if form == "fp16 only":
            copy.deepcopy(model).half().save_pretrained(folder / component, variant="fp16")
        elif form == "bin" and component == "text_encoder":  # transformers >= 5 writes safetensors only: as 4.x did
            (folder / component).mkdir(parents=True)
            model.config.to_json_file(folder / component / "config.json")
            state = {TEXT_MODEL + k.removeprefix(TEXT_MODEL): v for k, v in model.state_dict().items()}
            state[TEXT_MODEL + "embeddings.position_ids"] = torch.arange(77)[None]  # a buffer 4.x saved
            torch.save(state, folder / component / "pytorch_model.bin")
        else:
            options = {"bin": {"safe_serialization": False}, "sharded": {"max_shard_size": "20KB"}}.get(form, {})
            model.save_pretrained(folder / component, **options)
    return folder


def from_pretrained(folder: Path, form: str) -> dict:
    """diffusers' and transformers' own loading of the folder, in float32."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    options = {"variant": "fp16", "torch_dtype": torch.float32} if form == "fp16 only" else {}
    return {"unet": UNet2DConditionModel.from_pretrained(folder / "unet", **options).eval(),
            "vae": AutoencoderKL.from_pretrained(folder / "vae", **options).eval(),
            "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder", attn_implementation="eager",
                                                          **{k.replace("torch_", ""): v for k, v in options.items()}
                                                          ).eval()}


FORM_FILES = {"safetensors": SAFETENSORS, "bin": BIN, "sharded": SAFETENSORS + ".index.json",
              "fp16 only": "diffusion_pytorch_model.fp16.safetensors"}  # what each form writes for the UNet
FORMS = list(FORM_FILES)


@pytest.fixture(scope="module", params=FORMS)
def loaded(request, original, tmp_path_factory):
    """(our models loaded from the folder, diffusers' from the same folder, configs, the original weights, form)."""
    configs, weights, refs = original
    folder = write_folder(tmp_path_factory.mktemp("folder"), refs, request.param)
    files = {p.name for p in (folder / "unet").iterdir()}
    assert any(FORM_FILES[request.param] in name for name in files) and (request.param != "fp16 only" or SAFETENSORS
                                                                         not in files and BIN not in files), files
    return preload_models_from_standard_weights(folder), from_pretrained(folder, request.param), configs, weights, \
        request.param


def assert_close(ours: torch.Tensor, ref: torch.Tensor):
    assert ours.shape == ref.shape
    err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
    assert err <= RTOL * scale, f"max abs difference {err:.3g} > {RTOL} x output scale {scale:.3g}"


def test_every_weight_is_the_original(loaded):
    ours, _, _, weights, form = loaded
    got = to_standard_weights(ours)
    assert got.keys() == weights.keys()
    for key, value in weights.items():
        expected = value.half().float() if form == "fp16 only" else value
        assert torch.equal(got[key], expected), key


@torch.no_grad()
def test_outputs_equal_diffusers_from_pretrained(loaded):
    ours, refs, configs, _, _ = loaded
    unet, vae, clip = configs["diffusion"], configs["vae"], configs["clip"]
    g = torch.Generator().manual_seed(0)
    latent = torch.randn(2, unet.in_channels, 8, 12, generator=g)
    context = torch.randn(2, clip.n_tokens, unet.d_context, generator=g)
    t = torch.tensor([981, 20])
    assert_close(ours["diffusion"](latent, context, t), refs["unet"](latent, t, encoder_hidden_states=context).sample)

    image = torch.rand(2, vae.image_channels, 16, 24, generator=g) * 2 - 1
    assert_close(ours["encoder"].moments(image)[0], refs["vae"].encode(image).latent_dist.mean)
    latents = torch.randn(2, vae.latent_channels, 8, 12, generator=g)
    assert_close(ours["decoder"](latents * vae.latent_scale), refs["vae"].decode(latents).sample)

    tokens = torch.randint(0, clip.vocab_size, (2, clip.n_tokens), generator=g)
    assert_close(ours["clip"](tokens), refs["text_encoder"](input_ids=tokens).last_hidden_state)


@pytest.fixture
def folder(original, tmp_path):
    """A fresh safetensors folder to damage."""
    return write_folder(tmp_path / "model", original[2], "safetensors")


def test_image_size_comes_from_the_configs(folder):
    assert checkpoint_image_size(folder) == 16  # unet sample_size 8 latents x the tiny VAE's 2


def test_older_diffusers_vae_attention_names_load(folder, original):
    """Folders saved by older diffusers name the VAE's attention query, key, value and proj_attn."""
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    rewrite(folder / "vae" / SAFETENSORS, lambda state: {_old_name(k, old): v for k, v in state.items()})
    got = to_standard_weights(preload_models_from_standard_weights(folder))
    assert all(torch.equal(got[k], v) for k, v in original[1].items())


def _old_name(key: str, old: dict) -> str:
    for new, name in old.items():
        key = key.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
    return key


# --- folders our models cannot represent: one clear error each --------------------------------------------------------


def rewrite(path: Path, edit) -> None:
    save_file(edit(load_file(str(path))), str(path))


def edit_config(folder: Path, component: str, **fields) -> None:
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_missing_component(folder):
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"model: has no vae/ folder \(found text_encoder/, unet/\)\. A model "
                                              r"folder in diffusers' layout"):
        preload_models_from_standard_weights(folder)


def test_missing_config(folder):
    (folder / "unet" / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"unet/config.json: not found; each component folder needs its"):
        preload_models_from_standard_weights(folder)


def test_missing_weights(folder):
    (folder / "unet" / SAFETENSORS).unlink()
    with pytest.raises(CheckpointError, match=rf"unet: has no weights; expected {SAFETENSORS} \(or .*{BIN}"):
        preload_models_from_standard_weights(folder)


def test_missing_shard(folder, original):
    shutil.rmtree(folder / "unet")
    original[2]["unet"].save_pretrained(folder / "unet", max_shard_size="20KB")
    next((folder / "unet").glob("*-00002-of-*")).unlink()
    with pytest.raises(CheckpointError, match=r"index.json: names shard 'diffusion_pytorch_model-00002-of-.*', which "
                                              r"is not a file beside it"):
        preload_models_from_standard_weights(folder)


CONFIG_CASES = [
    ("unet", {"cross_attention_dim": 1024}, r"this is an SD 2.x UNet \(cross_attention_dim=1024"),
    ("unet", {"use_linear_projection": True}, r"this is an SD 2.x UNet .*use_linear_projection=True"),
    ("unet", {"addition_embed_type": "text_time", "cross_attention_dim": 2048}, r"this is an SDXL UNet"),
    ("unet", {"act_fn": "gelu"}, r"act_fn='gelu' is not supported: sd loads Stable Diffusion 1.x models .*, whose "
                                 r"unet has act_fn='silu'"),
    ("unet", {"attention_head_dim": [2, 4, 4]}, r"attention_head_dim must be one number of heads for every level"),
    ("unet", {"up_block_types": ["UpBlock2D"] * 3}, r"up_block_types must mirror down_block_types"),
    ("unet", {"down_block_types": ["SimpleCrossAttnDownBlock2D"] * 3}, r"down_block_types must each be one of"),
    ("unet", {"norm_num_groups": 7}, r"unet/config.json: describes a model sd cannot build: DiffusionConfig: width "
                                     r"32 .* must be divisible by n_groups=7"),
    ("unet", {"layers_per_block": None}, r"unet/config.json: lacks 'layers_per_block'; sd reads"),
    ("vae", {"out_channels": 4}, r"in_channels=3 and out_channels=4 must be the same"),
    ("text_encoder", {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    ("text_encoder", {"hidden_size": 64}, r"model: its components' config.json describe models that do not fit "
                                          r"together: diffusion d_context=32 must equal clip d_model=64"),
]


@pytest.mark.parametrize("component,fields,message", CONFIG_CASES,
                         ids=[f"{c}-{'-'.join(f)}-{i}" for i, (c, f, _) in enumerate(CONFIG_CASES)])
def test_unsupported_configs(folder, component, fields, message):
    edit_config(folder, component, **fields)
    with pytest.raises(CheckpointError, match=message) as info:
        preload_models_from_standard_weights(folder)
    assert "\n" not in str(info.value)


def test_unreadable_config(folder):
    (folder / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"vae/config.json: not a readable JSON config"):
        preload_models_from_standard_weights(folder)


def test_renamed_and_extra_tensors_are_named_in_the_folders_names(folder):
    rewrite(folder / "unet" / SAFETENSORS, lambda s: {k.replace("conv_in.", "conv_input."): v for k, v in s.items()})
    rewrite(folder / "vae" / SAFETENSORS, lambda s: {**s, "encoder.extra.weight": torch.zeros(3)})
    with pytest.raises(ConversionError) as info:
        preload_models_from_standard_weights(folder)
    message = str(info.value)
    assert "model: checkpoint does not match the models" in message
    assert "missing keys (2):\n    unet/conv_in.bias\n    unet/conv_in.weight\n" in message
    assert "unexpected keys (3):\n    unet/conv_input.bias\n    unet/conv_input.weight\n    vae/encoder.extra.weight" \
        in message
    assert "model.diffusion_model" not in message  # the folder's names, not the original checkpoint's


def test_wrong_shape_is_named(folder):
    rewrite(folder / "unet" / SAFETENSORS, lambda s: {**s, "conv_in.weight": torch.zeros(32, 5, 3, 3)})
    with pytest.raises(ConversionError, match=r"shape mismatches \(1\):\n    unet/conv_in.weight: checkpoint "
                                              r"\(32, 5, 3, 3\), model expects \(32, 4, 3, 3\)$"):
        preload_models_from_standard_weights(folder)


def test_the_sd_command_generates_from_a_folder(folder, tmp_path, capsys):
    """`sd generate --checkpoint FOLDER`: the image is written, with no model hash (a folder has none)."""
    from PIL import Image

    from sd.cli import main, parse_a1111_parameters

    out = tmp_path / "x.png"
    assert main(["generate", "a cat", "--checkpoint", str(folder), "-o", str(out), "--steps", "2", "--seed", "1",
                 "--quiet", "--height", "16", "--width", "16"]) == 0, capsys.readouterr().err
    params = parse_a1111_parameters(Image.open(out).text["parameters"])
    assert params["Model"] == folder.name and "Model hash" not in params
