"""Sample-quality evaluation: the FID Inception network, FID / Inception Score, the periodic
FID action and standalone evaluation, and the digits classifier metric of the CPU demo."""
