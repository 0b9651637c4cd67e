//! Handlers that live in a library crate (filled in by the macros work).
