"""The KVM/arm64 FP model: ownership, traps, one_reg, ID registers, invariants (v6.17)."""
