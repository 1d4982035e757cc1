"""The runtime around Megatron-Core: distributed init, CPU backend, model build, training loop."""
