"""Compatibility: the synchronised BatchNorm moved to :mod:`pirl.distributed.sync_bn`."""

from pirl.distributed.sync_bn import AllReduceBatchNorm, convert_sync_batchnorm

__all__ = ["AllReduceBatchNorm", "convert_sync_batchnorm"]
