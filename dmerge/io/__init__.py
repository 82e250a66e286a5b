"""I/O at the edges: safetensors headers, byte-range reads, positional writes."""
