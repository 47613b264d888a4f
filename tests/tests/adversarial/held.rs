//! Adversarial tests: held (see main.rs).
