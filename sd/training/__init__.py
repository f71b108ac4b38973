"""Training: the loop (train: the VAE's and the latent-diffusion objectives, EMA, exact resume) and the data it
learns from (datasets: captioned synthetic shapes, and describe() that reads a picture back for adherence).

Tutorial part: "training", explained in the video but not coded in hkproj. `sd train` is command.main: its options,
their checks and the two stages, around train's loop.
"""
