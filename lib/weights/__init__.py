"""Released weight files and their importers: reading files (`files`), the torch <-> NNX
layout (`torch_layout`), the one import procedure (`importer`), each family's key rules
(`dit`, `lightning`, `ddt`, `sd_vae`, `rae`, `dinov2`), the conventions of releases
(`releases`) and the network-class -> importer registry (`registry`)."""
