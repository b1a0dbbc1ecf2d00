"""Stand-in for flash-attn (CUDA-only) so that OpenRLHF's modules import on CPU; see ../README.md."""
