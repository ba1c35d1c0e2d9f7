"""Frozen encoders and detectors as graph nodes: pixels, the SD-VAE, RAE and DINOv2, each over
`lib.encoders.base.FrozenNode`."""
