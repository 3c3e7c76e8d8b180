"""Compatibility: the sharded bank moved to :mod:`pirl.bank.sharded`."""

from pirl.bank.sharded import ShardedMemoryBank

__all__ = ["ShardedMemoryBank"]
