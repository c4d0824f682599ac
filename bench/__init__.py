"""bench: throughput measurements that reuse loaders/engine/kernels as they are (never a private copy)."""
