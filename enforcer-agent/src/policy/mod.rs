//! Policy parsing, checking and compiling (owned by a helper; being written).
