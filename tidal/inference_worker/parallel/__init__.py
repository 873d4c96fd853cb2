"""Tensor parallelism, one code path on CPU and GPU: the :class:`~.comm.Comm` collectives
(gloo, NCCL, a recording fake, a same-GPU proxy), the parallel layers, and the rank launcher."""
