"""Models: plain modules built from megatron-core blocks; parallel wiring comes in through
the layer spec and the process groups passed to each constructor."""
