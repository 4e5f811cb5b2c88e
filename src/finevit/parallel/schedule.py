"""One call that runs forward and backward over a step's micro-batches, whatever the layout.

megatron-core picks the schedule (no pipelining, 1F1B, or interleaved 1F1B with virtual
stages); we hand it the process groups explicitly so that it never falls back to the global
parallel state, and a static [seq_length, 1, hidden] shape for the tensors sent between stages
(packed batches are padded to the token budget for exactly this reason).
"""

from typing import Any, Callable, Sequence

from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

# forward(chunk, micro_batch) -> (output tensor, loss_func(output) -> (loss, num_tokens, logs))
ForwardFn = Callable[[Any, Any], tuple[Any, Callable]]


def forward_backward(chunks: Sequence, micro_batches: Sequence, forward: ForwardFn,
                     pg: ProcessGroupCollection, seq_length: int,
                     forward_only: bool = False) -> list[dict]:
    """Returns the per-micro-batch logs on the last pipeline stage, [] elsewhere."""
    interleaved = len(chunks) > 1
    schedule = get_forward_backward_func(pp_size=pg.pp.size(),
                                         vp_size=len(chunks) if interleaved else None)
    config = chunks[0].config

    def forward_step(data_iterator, chunk):
        return forward(chunk, next(data_iterator))

    # Each virtual chunk walks the same micro-batches in order, so each gets its own iterator.
    iterators = [iter(micro_batches) for _ in chunks]
    return schedule(
        forward_step_func=forward_step,
        data_iterator=iterators if interleaved else iterators[0],
        model=list(chunks) if interleaved else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
        p2p_communicator=P2PCommunicator(pp_group=pg.pp, config=config),
        pg_collection=pg,
    )
