//! Process attestation (owned by a helper; being written).
