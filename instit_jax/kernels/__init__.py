"""Native kernels behind XLA custom calls (see `cpu.py`)."""
