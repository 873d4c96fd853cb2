"""Continuous batching (pure): which tokens of which sequences the next forward step computes.

Every step has a token budget. Running sequences go first, oldest first: a decoding sequence
needs one token, a sequence in the middle of a long prompt gets the rest of the budget (chunked
prefill). Then waiting sequences join, oldest first, with their prefix-cache hits skipped,
while the budget, ``max_num_seqs`` and free blocks allow. When the running sequences need
blocks the pool lacks, the newest running sequence is preempted by recompute: its blocks go
back, and it waits at the head of the queue to prefill its prompt and output again. No new
sequence is admitted in a step that preempted (vLLM's rule: admitting would preempt again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tidal.inference_worker.engine.blocks import BlockPool, block_hashes
from tidal.inference_worker.engine.params import FinishReason
from tidal.inference_worker.engine.sequence import Sequence, Status


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_batched_tokens: int = 512

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_batched_tokens < 1:
            raise ValueError(
                f"max_batched_tokens must be at least 1, got {self.max_batched_tokens}"
            )


@dataclass(frozen=True)
class Chunk:
    """Tokens ``[start, start + count)`` of ``seq`` computed this step."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last known token (so it yields the next)."""
        return self.start + self.count == len(self.seq.tokens)


@dataclass
class Plan:
    chunks: list[Chunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # first admitted this step

    @property
    def num_tokens(self) -> int:
        return sum(c.count for c in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool) -> None:
        self.config = config
        self.pool = pool
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End ``seq`` (done or aborted) wherever it is and free its blocks."""
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        self._free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    # ------------------------------------------------------------------ one step

    def schedule(self) -> Plan:
        plan = Plan()
        budget = self._schedule_running(plan, self.config.max_batched_tokens)
        if not plan.preempted:
            self._admit_waiting(plan, budget)
        return plan

    def _schedule_running(self, plan: Plan, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            count = min(seq.remaining, budget)
            while not self._grow(seq, seq.num_computed + count):
                victim = self.running.pop()  # the newest
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is seq:
                    return budget
            plan.chunks.append(Chunk(seq, seq.num_computed, count))
            budget -= count
            index += 1
        return budget

    def _admit_waiting(self, plan: Plan, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            hit_blocks, hit_hashes = self._prefix_hits(seq)
            computed = len(hit_blocks) * self.pool.block_size
            count = min(len(seq.tokens) - computed, budget)
            need = self.pool.blocks_for(computed + count) - len(hit_blocks)
            free_after_hits = self.pool.num_free - sum(self.pool.refs[b] == 0 for b in hit_blocks)
            if need > free_after_hits:
                return  # wait for blocks; later arrivals must not overtake (FCFS)
            self.pool.take(hit_blocks)
            seq.blocks = hit_blocks + self.pool.allocate(need)
            seq.hashes = hit_hashes
            seq.num_computed = computed
            if seq.admissions == 0:  # not a recompute after preemption
                seq.cached_prompt_tokens = computed
                plan.admitted.append(seq)
            seq.admissions += 1
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            plan.chunks.append(Chunk(seq, computed, count))
            budget -= count

    def _prefix_hits(self, seq: Sequence) -> tuple[list[int], list[bytes]]:
        """Cached blocks of ``seq``'s leading full blocks, leaving at least one token to
        compute (its logits give the next token)."""
        usable = (len(seq.tokens) - 1) // self.pool.block_size
        hashes = block_hashes(seq.tokens[: usable * self.pool.block_size], self.pool.block_size)
        blocks = self.pool.lookup(hashes)
        return blocks, hashes[: len(blocks)]

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        need = self.pool.blocks_for(tokens) - len(seq.blocks)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.blocks += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def _free(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes, seq.num_computed = [], [], 0

    # ------------------------------------------------------------------ after the step

    def advance(self, plan: Plan, sampled: Mapping[Sequence, int]) -> None:
        """Record what the step computed: the chunks' tokens are in the cache (full blocks
        published to the prefix cache), and each sampling chunk's new token is appended."""
        for chunk in plan.chunks:
            seq = chunk.seq
            seq.num_computed = chunk.start + chunk.count
            self._publish_full_blocks(seq)
            if chunk.samples and seq in sampled:
                seq.tokens.append(sampled[seq])

    def _publish_full_blocks(self, seq: Sequence) -> None:
        size = self.pool.block_size
        full = seq.num_computed // size
        if full <= len(seq.hashes):
            return
        parent = seq.hashes[-1] if seq.hashes else None
        new = block_hashes(seq.tokens[: full * size], size, len(seq.hashes), parent)
        for offset, block_hash in enumerate(new, start=len(seq.hashes)):
            self.pool.publish(seq.blocks[offset], block_hash)
        seq.hashes += new

    def abort_all(self) -> Iterable[Sequence]:
        """Finish every sequence as aborted (draining past the deadline, or a dead engine)."""
        gone = [*self.running, *self.waiting]
        for seq in gone:
            self.finish(seq, "abort")
        return gone
