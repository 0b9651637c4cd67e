//! Relay demo (placeholder).
fn main() {}
