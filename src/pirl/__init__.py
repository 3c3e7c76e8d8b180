"""pirl: Pretext-Invariant Representation Learning (Misra & van der Maaten, CVPR 2020) in plain PyTorch."""

__version__ = "0.1.0"
