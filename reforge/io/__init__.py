"""Checkpoint I/O: read safetensors checkpoints tensor by tensor, map key layouts, and write sharded outputs."""
