//! Empty on purpose: see `Cargo.toml`. The programs are in `main.rs`.
#![no_std]
