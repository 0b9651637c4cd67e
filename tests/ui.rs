//! Compile-time behaviour of `#[outbox::subscriber]` and the publishers
//! (`#[kafka::publisher]`, `#[nats::publisher]`):
//! every error the macros can give has a case in `tests/ui/fail` with the expected
//! message beside it (`.stderr`), and `tests/ui/pass` holds the shapes that must
//! compile (and run: each pass case checks what it built in `main`).
//!
//! After changing a message, regenerate with `TRYBUILD=overwrite cargo test --test ui`
//! and read every changed `.stderr`.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.compile_fail("tests/ui/fail/*.rs");
    cases.pass("tests/ui/pass/*.rs");
}
