"""Training: the loop (train: the VAE's and the latent-diffusion objectives, EMA, exact resume, on one process or
many: distributed), the data it learns from (datasets: captioned synthetic shapes and describe(), which reads a
picture back for adherence; image_folder: your own pictures with captions), LoRA networks to train
(lora_network) and what a run shows (progress: its log and loss curve).

Tutorial part: "training", explained in the video but not coded in hkproj. `sd train` is command.main: its options,
their checks and the two stages of the shapes model, around train's loop; `sd train --data` is finetune.finetune.
"""
