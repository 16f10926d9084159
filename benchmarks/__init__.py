"""Benchmarks of mnn against PyTorch on the CPU: ``python -m benchmarks.compare`` (``make bench``)."""
