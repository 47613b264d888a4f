//! Kernel struct offsets from BTF (owned by a helper; being written).
