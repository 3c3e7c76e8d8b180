"""Compatibility: the trainer moved to :mod:`pirl.training`. ``pirl.train`` is that package itself (not a copy of
its names), so ``pirl.train.train`` and ``pirl.training.train`` are one attribute, patched alike."""

import sys

import pirl.training

sys.modules[__name__] = pirl.training
