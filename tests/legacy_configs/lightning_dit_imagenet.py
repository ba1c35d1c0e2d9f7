"""Legacy (diffuse_nnx) config of LightningDiT on ImageNet: diffuse_nnx's
`configs/lightning_dit_imagenet.py`, i.e. `dit_imagenet` with batch 1024, LightningDiT
switches, logit-normal training times, lr 2e-4 / b2 0.95 and FSDP."""

import ml_collections

from tests.legacy_configs import dit_imagenet


def get_config(options: str = 'imagenet_64-B_2') -> ml_collections.ConfigDict:
  config = dit_imagenet.get_config(options)
  config.data.batch_size = 1024
  config.network_class = 'lightning_dit'
  lightning_network(config.network)
  config.interface.train_time_dist_type = 'logitnormal'
  config.learning_rate = 2e-4
  config.optimizer.b2 = 0.95
  config.sharding.strategy = [('.*', 'fsdp(axis="data")')]
  return config


def lightning_network(network: ml_collections.ConfigDict) -> None:
  """diffuse_nnx's Lightning network fields (also of its DDT presets)."""
  del network.attn_dropout
  network.update(continuous_time_embed=True, freq_embed_size=512)
  network.update(qk_norm=False, swiglu=True, use_rope=True, rms_norm=True, adaln_shift=True,
                 mlp_dropout=0.0, attn_w_dropout=0.0, attn_o_dropout=0.0)
