//! Adversarial tests: loader (see main.rs).
