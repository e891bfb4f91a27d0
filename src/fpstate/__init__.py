"""fpstate: a model of the CPU's extended register state and of how Linux and KVM manage it.

Layers (data flows downwards; nothing imports upwards)::

    cli / tools     layout, decode, compat, cost, run, explore, conform
    check           invariants, scenarios, explorer, variants
    kvm             guest FPU (x86), fp ownership (arm64)
    kernel          boot sizing, fpstate, permissions, XFD, switching, signals, regsets
    x86, arm64      CPUID profiles, layouts, register files, instructions
    host            the same questions answered by the real CPU, kernel and KVM
"""

__version__ = "0.1.0"
