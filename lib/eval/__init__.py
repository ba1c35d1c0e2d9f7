"""Sample-quality evaluation: the FID Inception network, FID / Inception Score, the periodic
FID action (evaluating a checkpoint: `lib/evaluate.py`), and the digits classifier metric of the
CPU demo."""
