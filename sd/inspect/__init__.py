"""Tools to see inside a generation: per-token cross-attention maps (attention_maps) and cheap latent previews (preview).

No tutorial counterpart: the tutorial's pipeline only returns the final image. Both are opt-in and cost nothing
when unused: generate(..., attention_maps=sd.AttentionMaps()) and a callback drawing sd.LatentPreview frames.
(Nothing is imported here: the pipeline uses attention_maps, and preview uses the pipeline's to_uint8.)
"""
