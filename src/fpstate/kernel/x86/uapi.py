"""Constants of the x86 user ABI that both the model and the host probes speak.

arch/x86/include/uapi/asm/prctl.h: the arch_prctl() options of the XSTATE permission
interface and the two AMX component numbers they take. One place, so the kernel model
(`xstate_prctl`), the real-kernel probes (`fpstate.host.prctl`) and the KVM backend
(`fpstate.host.kvm_uapi`) cannot disagree.
"""

ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025
ARCH_XCOMP_TILECFG = 17
ARCH_XCOMP_TILEDATA = 18
