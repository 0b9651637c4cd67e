//! Handlers that live in a library crate, to prove that `outbox::App::new` finds
//! them in a binary that links this crate.
//!
//! `inventory` only sees crates the linker keeps: a binary (or test) that names
//! nothing from this crate must write `use outbox_handlers_lib as _;`.

use serde::{Deserialize, Serialize};

/// The queue [`greet`] handles.
pub const GREETINGS_QUEUE: &str = "lib.greetings";

/// The queue [`count_words`] handles.
pub const WORDS_QUEUE: &str = "lib.words";

/// A greeting request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Greeting {
    /// Who to greet.
    pub name: String,
}

/// Builds the greeting for a [`Greeting`].
///
/// ```
/// # async fn f() {
/// let text = outbox_handlers_lib::greet(outbox_handlers_lib::Greeting { name: "Ada".into() }).await;
/// assert_eq!(text, "hello, Ada");
/// # }
/// ```
#[outbox::subscriber("lib.greetings")]
pub async fn greet(greeting: Greeting) -> String {
    format!("hello, {}", greeting.name)
}

/// Counts the words of a text; an empty text is rejected for good.
#[outbox::subscriber("lib.words", retry = outbox::NoRetry, no_dlq)]
pub async fn count_words(text: String, meta: outbox::Meta) -> Result<(), outbox::HandlerError> {
    if text.trim().is_empty() {
        return Err(outbox::HandlerError::reject(format!(
            "row {} of {} has no words",
            meta.id, meta.queue
        )));
    }
    Ok(())
}
