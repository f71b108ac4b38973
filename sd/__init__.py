"""sd: Stable Diffusion v1.5 written from scratch in PyTorch.

Mirrors Umar Jamil's "Coding Stable Diffusion from scratch in PyTorch"
(github.com/hkproj/pytorch-stable-diffusion) and the original CompVis code
(github.com/CompVis/stable-diffusion), checked number for number against
diffusers and transformers.
"""
