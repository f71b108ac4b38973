"""sd.inspect.preview.LatentPreview: SD 1.x's published factors, an exact least-squares fit where the VAE is linear, and a
preview of the embedded model's latents close to what its decoder draws."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sd.cli import EMBEDDED_CHECKPOINT
from sd.training.datasets import ShapesDataset
from sd.decoder import VAE_Decoder, VAEConfig
from sd.model_loader import preload_models_from_standard_weights
from sd.pipeline import generate
from sd.inspect.preview import SD15_LATENT_RGB_FACTORS, LatentPreview


def test_sd15_vae_gets_the_published_factors():
    with torch.device("meta"):
        decoder = VAE_Decoder(VAEConfig())
    preview = LatentPreview.for_models({"decoder": decoder})
    assert torch.equal(preview.weight, torch.tensor(SD15_LATENT_RGB_FACTORS)) and torch.equal(preview.bias, torch.zeros(3))


class LinearEncoder(nn.Module):
    """A stand-in VAE encoder that is exactly linear per 4x4 patch: mean colour -> 4 channels (+ offset)."""

    def __init__(self):
        super().__init__()
        self.mix = nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.mix.weight.copy_(torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(0)))
            self.mix.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.5]))

    def forward(self, x):
        return self.mix(F.avg_pool2d(x, 4))


def test_fit_inverts_a_linear_encoder_exactly():
    encoder = LinearEncoder()
    images = torch.stack([ShapesDataset(size=32, seed=1)[i][0] for i in range(8)])
    preview = LatentPreview.fit(encoder, images)
    held_out = torch.stack([ShapesDataset(size=32, seed=2)[i][0] for i in range(4)])
    with torch.no_grad():
        latents = encoder(held_out)
    before = latents.clone()
    assert torch.allclose(preview.rgb(latents), F.avg_pool2d(held_out, 4), atol=1e-4)
    assert torch.equal(latents, before)
    pictures = preview(latents, size=(32, 32))
    assert len(pictures) == 4 and pictures[0].size == (32, 32) and preview(latents)[0].size == (8, 8)


def test_embedded_model_preview_follows_the_decoder():
    """Linear is a rough fit to a small VAE trained from scratch: the preview of the final x̂_0 explains most of
    the variance of the decoded image's patch colours, and gets the shape's and background's colours right."""
    models = preload_models_from_standard_weights(EMBEDDED_CHECKPOINT)
    preview = LatentPreview.for_models(models)
    finals = []
    generate(["a red circle on a blue background", "a yellow square on a black background"], models=models, seed=0,
             n_inference_steps=10, sampler_name="ddim", height=64, width=64, progress=False,
             callback=lambda i, t, latents, pred_original: finals.append(pred_original), output_type="pil")
    with torch.no_grad():
        decoded = F.adaptive_avg_pool2d(models["decoder"](finals[-1]), (16, 16))  # (2, 3, 16, 16)
    rgb = preview.rgb(finals[-1])
    explained = 1 - ((rgb - decoded) ** 2).sum() / ((decoded - decoded.mean((0, 2, 3), keepdim=True)) ** 2).sum()
    assert explained > 0.5, explained
    centre, corner = rgb[:, :, 7:9, 7:9].mean((2, 3)), rgb[:, :, :2, :2].mean((2, 3))  # shapes sit near the centre
    assert centre[0].argmax() == 0 and corner[0].argmax() == 2  # red circle, blue background
    assert centre[1].sum() > corner[1].sum() + 1  # a yellow square is brighter than its black background


@pytest.mark.parametrize("weight,bias,message", [
    (torch.zeros(4, 4), None, r"weight must have shape \(latent channels, 3\), got \(4, 4\)"),
    (torch.zeros(4, 3), torch.zeros(4), r"bias must have shape \(3,\), got \(4,\)"),
])
def test_bad_factors_are_refused(weight, bias, message):
    with pytest.raises(ValueError, match=message):
        LatentPreview(weight, bias)


def test_latents_of_the_wrong_shape_are_refused():
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, h, w\), got \(1, 3, 8, 8\)"):
        LatentPreview.sd15().rgb(torch.zeros(1, 3, 8, 8))
