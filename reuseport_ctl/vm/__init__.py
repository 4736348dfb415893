"""The VM runner: boot another kernel (a Debian kernel package, a bzImage or
a kernel build tree) under QEMU with virtme-ng, run one command in it as
root over the host's read-only root filesystem, and return its output and
exit status. `reuseport-ctl vm` and scripts/vm are its command line."""
from .accel import Accel, kvm_usable
from .errors import EXIT_INTERRUPTED, EXIT_OUTPUT_LOST, EXIT_TIMEOUT, EXIT_VM, VMError
from .kernels import Kernel, resolve
from .runner import RunResult, missing_tools, run, vm_available

__all__ = ["Accel", "kvm_usable", "EXIT_INTERRUPTED", "EXIT_OUTPUT_LOST", "EXIT_TIMEOUT", "EXIT_VM", "VMError",
           "Kernel", "resolve", "RunResult", "missing_tools", "run", "vm_available"]
