//! The two pgoutput (protocol version 1) messages table capture reads: a
//! relation's description and an inserted row. Everything else a
//! publication can send (updates, deletes, truncates, types, origins) is
//! skipped by the caller.

use std::collections::HashMap;

/// The type oid of `bytea`, whose text form is hex (`\x...`).
pub(crate) const BYTEA_OID: u32 = 17;

/// A relation as pgoutput describes it before its first change in a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Relation {
    pub(crate) schema: String,
    pub(crate) name: String,
    /// Column names and type oids, in the order of the tuple data.
    pub(crate) columns: Vec<(String, u32)>,
}

/// One column value of an inserted row, in text format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Value {
    Null,
    /// An unchanged TOASTed value (never in an insert).
    Unchanged,
    Text(Vec<u8>),
}

/// A pgoutput message of interest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Change {
    Relation(u32, Relation),
    Insert(u32, Vec<Value>),
    /// Any other message.
    Other,
}

struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.b.len() < n {
            return Err("pgoutput message ends early".into());
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn cstr(&mut self) -> Result<String, String> {
        let end = self
            .b
            .iter()
            .position(|&c| c == 0)
            .ok_or("pgoutput string without its terminator")?;
        let s = String::from_utf8_lossy(&self.b[..end]).into_owned();
        self.b = &self.b[end + 1..];
        Ok(s)
    }
}

/// Parses one pgoutput message (the payload of an XLogData).
pub(crate) fn parse(data: &[u8]) -> Result<Change, String> {
    let mut r = Reader { b: data };
    match r.u8()? {
        b'R' => {
            let relid = r.u32()?;
            let schema = r.cstr()?;
            let name = r.cstr()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let _flags = r.u8()?;
                let col = r.cstr()?;
                let oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push((col, oid));
            }
            Ok(Change::Relation(
                relid,
                Relation {
                    schema,
                    name,
                    columns,
                },
            ))
        }
        b'I' => {
            let relid = r.u32()?;
            if r.u8()? != b'N' {
                return Err("pgoutput insert without its new tuple".into());
            }
            let n = r.u16()?;
            let mut values = Vec::with_capacity(n as usize);
            for _ in 0..n {
                values.push(match r.u8()? {
                    b'n' => Value::Null,
                    b'u' => Value::Unchanged,
                    b't' => {
                        let len = r.u32()? as usize;
                        Value::Text(r.take(len)?.to_vec())
                    }
                    other => return Err(format!("pgoutput column kind {other:?} is not text")),
                });
            }
            Ok(Change::Insert(relid, values))
        }
        _ => Ok(Change::Other),
    }
}

/// A column's bytes from its text form: `bytea` is hex-decoded, anything
/// else (text, json, jsonb, numbers, uuids) is taken as written.
pub(crate) fn column_bytes(text: &[u8], oid: u32) -> Result<Vec<u8>, String> {
    if oid != BYTEA_OID {
        return Ok(text.to_vec());
    }
    let hex = text
        .strip_prefix(b"\\x")
        .ok_or("a bytea value not in hex form")?;
    if hex.len() % 2 != 0 {
        return Err("a bytea value of odd hex length".into());
    }
    hex.chunks(2)
        .map(|p| {
            std::str::from_utf8(p)
                .ok()
                .and_then(|s| u8::from_str_radix(s, 16).ok())
                .ok_or_else(|| "a bytea value with a non-hex digit".to_owned())
        })
        .collect()
}

/// Relations seen in this session, by oid.
pub(crate) type Relations = HashMap<u32, Relation>;

#[cfg(test)]
mod tests {
    use super::*;

    fn relation_bytes() -> Vec<u8> {
        let mut b = vec![b'R'];
        b.extend(16384u32.to_be_bytes());
        b.extend(b"public\0outbox_events\0");
        b.push(b'd');
        b.extend(2u16.to_be_bytes());
        for (name, oid) in [("id", 2950u32), ("payload", 17)] {
            b.push(0);
            b.extend(name.as_bytes());
            b.push(0);
            b.extend(oid.to_be_bytes());
            b.extend((-1i32).to_be_bytes());
        }
        b
    }

    #[test]
    fn a_relation_and_an_insert_are_read() {
        let Change::Relation(id, rel) = parse(&relation_bytes()).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(id, 16384);
        assert_eq!(
            (rel.schema.as_str(), rel.name.as_str()),
            ("public", "outbox_events")
        );
        assert_eq!(
            rel.columns,
            vec![("id".into(), 2950), ("payload".into(), 17)]
        );

        let mut b = vec![b'I'];
        b.extend(16384u32.to_be_bytes());
        b.push(b'N');
        b.extend(2u16.to_be_bytes());
        b.push(b'n');
        b.push(b't');
        b.extend(6u32.to_be_bytes());
        b.extend(b"\\x6869");
        assert_eq!(
            parse(&b).unwrap(),
            Change::Insert(16384, vec![Value::Null, Value::Text(b"\\x6869".to_vec())])
        );
        assert_eq!(column_bytes(b"\\x6869", BYTEA_OID).unwrap(), b"hi");
        assert_eq!(column_bytes(b"{\"a\":1}", 3802).unwrap(), b"{\"a\":1}");
    }

    #[test]
    fn cut_messages_are_errors_not_panics() {
        let b = relation_bytes();
        for n in 1..b.len() {
            assert!(parse(&b[..n]).is_err(), "cut at {n}");
        }
        assert!(column_bytes(b"\\x6", BYTEA_OID).is_err());
        assert!(column_bytes(b"\\xzz", BYTEA_OID).is_err());
        assert_eq!(parse(b"Yabc").unwrap(), Change::Other);
    }
}
