"""Compatibility: the collectives moved to :mod:`pirl.distributed.collectives`."""

from pirl.distributed.collectives import all_gather, all_gather_nograd, all_reduce_sum, all_to_all, distributed

__all__ = ["all_gather", "all_gather_nograd", "all_reduce_sum", "all_to_all", "distributed"]
