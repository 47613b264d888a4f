//! Adversarial tests: aliases (see main.rs).
