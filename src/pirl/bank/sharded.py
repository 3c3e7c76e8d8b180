"""A memory bank split across processes (``bank.kind=sharded``): rank r holds the contiguous rows
``bounds[r]:bounds[r + 1]`` (N / W of them), so bank memory per GPU falls with the number of processes.

Scoring routes each request to the owner of the row. A rank sends every (sample, bank row) pair it needs to the
row's owner; the owner scores the pair against the sample's embedding (all ranks' embeddings are all-gathered) and
sends the score back. Per rank and loss term that moves B (1 + K) requests (8 bytes each) and B (1 + K) scores
(4 bytes forward, 4 backward), plus the W B D gathered embeddings, whatever N is. The alternatives are dearer:
fetching the rows themselves moves B (1 + K) D floats (32 times the bytes at D = 128), and all-gathering every
rank's requests so that each owner scores its share locally moves and scans W B (1 + K) indices on every rank
(W times more). Gradients reach the embeddings through the gather and the return trip
(:mod:`pirl.distributed.collectives`).

Negatives are drawn exactly as in :class:`~pirl.bank.replicated.MemoryBank` (the same global draw, sliced per rank), and
the update all-gathers embeddings and indices as there, each rank writing only the rows it owns. With one process
every method is the replicated bank's own. Checkpoints always hold the full bank (:meth:`full_memory` gathers it
on rank 0), and loading one takes this rank's rows, so a run resumes with either bank kind and any process count.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pirl.bank.replicated import MemoryBank, initial_rows
from pirl.bank.scoring import dense_scores
from pirl.distributed.collectives import all_gather, all_gather_nograd, all_to_all, distributed


class ShardedMemoryBank(MemoryBank):
    """:class:`~pirl.bank.replicated.MemoryBank` whose buffer ``memory`` holds only this rank's rows ``start:stop``.

    ``rank`` and ``world`` default to the process group's (0 and 1 without one); passing them builds one shard
    of a larger bank without a process group, which the unit tests use.
    """

    kind = "sharded"

    def __init__(
        self,
        num_samples: int,
        dim: int = 128,
        momentum: float = 0.5,
        seed: int = 0,
        rank: int | None = None,
        world: int | None = None,
        dtype: str = "float32",
    ) -> None:
        if world is None:
            world = dist.get_world_size() if distributed() else 1
            rank = dist.get_rank() if distributed() else 0
        if rank is None or not 0 <= rank < world:
            raise ValueError(f"a sharded bank needs a rank in [0, {world}), got rank={rank}")
        self.rank, self.world = rank, world
        self.bounds = [r * num_samples // world for r in range(world + 1)]
        self.start, self.stop = self.bounds[rank], self.bounds[rank + 1]
        super().__init__(num_samples, dim, momentum, seed, dtype)
        # the first row of every later shard, for owner lookups on the bank's device
        self.register_buffer("_next_starts", torch.tensor(self.bounds[1:]), persistent=False)

    def _initial_memory(self) -> torch.Tensor:
        return initial_rows(self.num_samples, self.dim, self.seed, self.start, self.stop)

    def owner(self, rows: torch.Tensor) -> torch.Tensor:
        """The rank that holds each bank row."""
        return torch.bucketize(rows, self._next_starts, right=True)

    # ----------------------------------------------------------------- scoring

    def score(self, emb: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """Cosine scores (B, 1 + K) in fp32, as :meth:`MemoryBank.score`; a collective when sharded."""
        if self.world == 1:
            return super().score(emb, positives, negatives)
        emb = emb.float()
        if negatives.dim() == 1:  # one shared set: the same columns for every sample
            negatives = negatives.expand(emb.shape[0], -1)
        requests, order, send = self.plan(positives, negatives)
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)  # how many pairs each rank will ask of this one
        send_sizes, recv_sizes = send.tolist(), recv.tolist()
        asked = requests.new_empty(sum(recv_sizes))
        dist.all_to_all_single(asked, requests, output_split_sizes=recv_sizes, input_split_sizes=send_sizes)
        answers = self.answer(all_gather(emb), asked, recv, emb.shape[0], negatives.shape[1])
        back = all_to_all(answers, recv_sizes, send_sizes)
        return self.unsort(back, order, emb.shape[0])

    def plan(self, positives: torch.Tensor, negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Asking side: (requests sorted by owner, their order in the flattened (B, 1 + K) scores, how many go
        to each rank). Within an owner the requests keep their row-major order. A request is one int64,
        ``sample * N + row``: half the bytes of a (sample, row) pair."""
        wanted = torch.cat([positives.unsqueeze(1), negatives], dim=1).flatten()
        owners = self.owner(wanted)
        order = torch.argsort(owners, stable=True)
        sample = order // (1 + negatives.shape[1])
        requests = sample * self.num_samples + wanted[order]
        return requests, order, torch.bincount(owners, minlength=self.world)

    def answer(
        self, all_emb: torch.Tensor, asked: torch.Tensor, counts: torch.Tensor, batch: int, k: int
    ) -> torch.Tensor:
        """Owning side: the score of each asked (sample, row) request, ``counts[r]`` of them from rank r, whose
        samples are rows ``r * batch:(r + 1) * batch`` of the gathered embeddings ``all_emb``."""
        asker = torch.repeat_interleave(counts)  # r, counts[r] times
        emb_rows, rows = asker * batch + asked // self.num_samples, asked % self.num_samples - self.start
        # Same rule as the replicated bank: the dense product costs B N D in total (W B x N / W per owner)
        # against about B (1 + K) D for the pairs, but avoids copying two (pairs x D) operands.
        if self.num_samples <= self.dense_ratio * k:
            return dense_scores(all_emb, self.memory)[emb_rows, rows]
        return (all_emb[emb_rows] * self.memory[rows].float()).sum(dim=1)

    @staticmethod
    def unsort(back: torch.Tensor, order: torch.Tensor, batch: int) -> torch.Tensor:
        """Scores received in ``order`` (owner-sorted) back to their (B, 1 + K) places, keeping the gradient."""
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(len(order), device=order.device)
        return back[inverse].view(batch, -1)

    # ----------------------------------------------------------------- update and checkpoints

    @torch.no_grad()
    def update(self, indices: torch.Tensor, emb: torch.Tensor) -> None:
        """EMA update as :meth:`MemoryBank.update`; each rank writes the gathered rows it owns."""
        if self.world == 1:
            return super().update(indices, emb)
        emb = torch.nn.functional.normalize(emb.detach().float(), dim=1)
        self.write_owned(all_gather_nograd(indices), all_gather_nograd(emb))

    def write_owned(self, indices: torch.Tensor, emb: torch.Tensor) -> None:
        """Apply the update of the global rows ``indices`` (unit-norm ``emb``) that fall in this shard."""
        mine = (indices >= self.start) & (indices < self.stop)
        self._write(indices[mine] - self.start, emb[mine])

    def full_memory(self) -> torch.Tensor | None:
        """The whole N x D bank on rank 0 (in CPU memory: it need not fit on a GPU beside the shard), None
        elsewhere. A collective: every rank must call it."""
        if self.world == 1:
            return self.memory
        if self.rank != 0:
            if self.stop > self.start:
                dist.send(self.memory.contiguous(), dst=0)
            return None
        full = torch.empty(self.num_samples, self.dim, dtype=self.memory.dtype)
        full[self.start : self.stop] = self.memory.cpu()
        for rank in range(1, self.world):  # one shard at a time: rank 0 holds at most one extra on its device
            lo, hi = self.bounds[rank], self.bounds[rank + 1]
            if hi > lo:
                part = self.memory.new_empty(hi - lo, self.dim)
                dist.recv(part, src=rank)
                full[lo:hi] = part.cpu()
        return full

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:  # torch passes the rest by position
        # A checkpoint holds the full bank (any kind, any process count): keep this rank's rows of it.
        key = prefix + "memory"
        full = state_dict.get(key)
        if full is not None and full.shape[0] == self.num_samples != self.memory.shape[0]:
            state_dict = {**state_dict, key: full[self.start : self.stop]}
        super()._load_from_state_dict(state_dict, prefix, *args)
