//! Adversarial tests: sockets (see main.rs).
