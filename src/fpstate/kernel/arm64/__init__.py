"""The Linux arm64 host FP model: fpsimd.c, entry-common.c and signal.c (v6.17)."""
