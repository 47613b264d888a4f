//! Adversarial tests: tamper (see main.rs).
