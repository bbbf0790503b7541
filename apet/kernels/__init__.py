"""GPU kernels for the torch path (imported lazily; never part of exported graphs)."""
