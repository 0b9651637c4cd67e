//! Validation and quoting of table and queue names.

use crate::Error;

/// Postgres truncates identifiers longer than this many bytes.
pub const MAX_IDENTIFIER_BYTES: usize = 63;
/// The longest suffix this crate appends to a table name to derive an index or
/// constraint name (`_listeners_pkey`).
pub(crate) const LONGEST_SUFFIX: &str = "_listeners_pkey";
/// Queue names are at most this many bytes.
pub const MAX_QUEUE_BYTES: usize = 255;

/// A validated table name, optionally schema-qualified (`schema.table`).
///
/// Accepted: ASCII letters, digits and `_`, not starting with a digit, and short
/// enough that every name derived from it (indexes, constraints) fits in
/// Postgres' 63-byte identifier limit. Always quoted in SQL.
///
/// ```
/// let t = outbox::TableName::new("app.outbox").unwrap();
/// assert_eq!(t.quoted(), r#""app"."outbox""#);
/// assert!(outbox::TableName::new("outbox; drop table x").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

impl TableName {
    /// Validates a table name; the error says what is wrong and what is accepted.
    pub fn new(input: &str) -> Result<Self, Error> {
        let (schema, name) = match input.split_once('.') {
            Some((s, n)) => (Some(s), n),
            None => (None, input),
        };
        if let Some(s) = schema {
            check_ident(input, s, "schema", MAX_IDENTIFIER_BYTES)?;
        }
        check_ident(
            input,
            name,
            "table",
            MAX_IDENTIFIER_BYTES - LONGEST_SUFFIX.len(),
        )?;
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    /// The table's schema, when one was given.
    pub fn schema(&self) -> Option<&str> {
        self.schema.as_deref()
    }

    /// The table's own name, without schema.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The name quoted for SQL, schema included.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// A derived table in the same schema (`<name><suffix>`), quoted.
    pub(crate) fn derived(&self, suffix: &str) -> String {
        match &self.schema {
            Some(s) => format!("\"{s}\".\"{}{suffix}\"", self.name),
            None => format!("\"{}{suffix}\"", self.name),
        }
    }

    /// A derived identifier without schema (index or constraint names), quoted.
    pub(crate) fn ident(&self, suffix: &str) -> String {
        format!("\"{}{suffix}\"", self.name)
    }
}

impl std::fmt::Display for TableName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

fn check_ident(input: &str, part: &str, what: &str, max: usize) -> Result<(), Error> {
    let accepted = "accepted: ASCII letters, digits and '_', not starting with a digit, \
                    optionally 'schema.table'";
    if part.is_empty() {
        return Err(Error::invalid(format!(
            "invalid table name {input:?}: the {what} name is empty ({accepted})"
        )));
    }
    if let Some(c) = part
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(Error::invalid(format!(
            "invalid table name {input:?}: character {c:?} is not allowed ({accepted})"
        )));
    }
    if part.as_bytes()[0].is_ascii_digit() {
        return Err(Error::invalid(format!(
            "invalid table name {input:?}: the {what} name starts with a digit ({accepted})"
        )));
    }
    if part.len() > max {
        return Err(Error::invalid(format!(
            "invalid table name {input:?}: the {what} name is {} bytes, at most {max} are \
             accepted so that derived index names fit Postgres' {MAX_IDENTIFIER_BYTES}-byte limit",
            part.len()
        )));
    }
    Ok(())
}

/// Checks a queue name: 1 to 255 bytes, no control characters.
///
/// ```
/// assert!(outbox::validate_queue("orders").is_ok());
/// assert!(outbox::validate_queue("").is_err());
/// ```
pub fn validate_queue(queue: &str) -> Result<(), Error> {
    if queue.is_empty() {
        return Err(Error::invalid(
            "invalid queue name \"\": it is empty (accepted: 1 to 255 bytes of printable text)",
        ));
    }
    if queue.len() > MAX_QUEUE_BYTES {
        return Err(Error::invalid(format!(
            "invalid queue name {:?}...: it is {} bytes (accepted: 1 to {MAX_QUEUE_BYTES} bytes of printable text)",
            &queue[..queue.char_indices().nth(20).map_or(queue.len(), |(i, _)| i)],
            queue.len()
        )));
    }
    if queue.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "invalid queue name {queue:?}: it contains a control character (accepted: 1 to 255 bytes of printable text)"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_schema_qualified_names() {
        assert_eq!(TableName::new("outbox").unwrap().quoted(), "\"outbox\"");
        assert_eq!(
            TableName::new("s.outbox_2").unwrap().derived("_listeners"),
            "\"s\".\"outbox_2_listeners\""
        );
    }

    #[test]
    fn refuses_hostile_names_with_a_reason() {
        for (bad, why) in [
            ("", "empty"),
            ("a\"b", "character '\"'"),
            ("a;drop", "character ';'"),
            ("tablé", "character 'é'"),
            ("1abc", "starts with a digit"),
            ("a.b.c", "character '.'"),
            (".x", "schema name is empty"),
        ] {
            let err = TableName::new(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains("accepted"), "{bad:?}: {err}");
        }
        let long = "a".repeat(60);
        let err = TableName::new(&long).unwrap_err().to_string();
        assert!(err.contains("63-byte"), "{err}");
        let max = "a".repeat(MAX_IDENTIFIER_BYTES - LONGEST_SUFFIX.len());
        assert!(TableName::new(&max).is_ok());
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(validate_queue("orders.v1").is_ok());
        assert!(validate_queue("")
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(validate_queue(&"q".repeat(256))
            .unwrap_err()
            .to_string()
            .contains("256 bytes"));
        assert!(validate_queue("a\nb")
            .unwrap_err()
            .to_string()
            .contains("control"));
    }
}
