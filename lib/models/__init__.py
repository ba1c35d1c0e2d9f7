"""Architectures only: each network with its size table (DiT, LightningDiT, LightningDDT, DDT,
the SD-VAE AutoencoderKL, the RAE ViT-MAE decoder, DINOv2) and their shared layers."""
