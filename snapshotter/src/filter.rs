//! containerd's List filters, the subset snapshot clients use: a list of
//! alternatives (any may match), each a comma-separated conjunction of
//! `FIELD==VALUE`, `FIELD!=VALUE` or `FIELD` (present), where FIELD is
//! `name`, `parent`, `kind` or `labels.KEY` (KEY may be double-quoted).
//! Hand-written: containerd's filter grammar has no Rust implementation.

use crate::error::SnapshotError;
use crate::store::{Kind, Record};

pub struct Filter {
    alternatives: Vec<Vec<Term>>,
}

struct Term {
    field: Field,
    op: Op,
}

enum Field {
    Name,
    Parent,
    Kind,
    Label(String),
}

enum Op {
    Present,
    Equal(String),
    NotEqual(String),
}

impl Filter {
    pub fn parse(filters: &[String]) -> Result<Filter, SnapshotError> {
        let alternatives = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| f.split(',').map(|t| parse_term(t.trim(), f)).collect())
            .collect::<Result<_, _>>()?;
        Ok(Filter { alternatives })
    }

    pub fn matches(&self, name: &str, r: &Record) -> bool {
        self.alternatives.is_empty()
            || self
                .alternatives
                .iter()
                .any(|terms| terms.iter().all(|t| t.matches(name, r)))
    }
}

fn parse_term(term: &str, filter: &str) -> Result<Term, SnapshotError> {
    let bad = || SnapshotError::InvalidArgument(format!("unsupported filter {filter:?}"));
    let (field, op) = if let Some((f, v)) = term.split_once("!=") {
        (f, Op::NotEqual(unquote(v)))
    } else if let Some((f, v)) = term.split_once("==") {
        (f, Op::Equal(unquote(v)))
    } else {
        (term, Op::Present)
    };
    let field = match field.trim() {
        "name" => Field::Name,
        "parent" => Field::Parent,
        "kind" => Field::Kind,
        f => Field::Label(unquote(f.strip_prefix("labels.").ok_or_else(bad)?)),
    };
    Ok(Term { field, op })
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s)
        .to_owned()
}

impl Term {
    fn matches(&self, name: &str, r: &Record) -> bool {
        let value: Option<String> = match &self.field {
            Field::Name => Some(name.to_owned()),
            // containerd's adaptor: no parent is the empty string.
            Field::Parent => Some(r.parent.clone().unwrap_or_default()),
            Field::Kind => Some(
                match r.kind {
                    Kind::View => "view",
                    Kind::Active => "active",
                    Kind::Committed => "committed",
                }
                .to_owned(),
            ),
            Field::Label(k) => r.labels.get(k).cloned(),
        };
        match &self.op {
            Op::Present => value.is_some(),
            Op::Equal(v) => value.as_deref() == Some(v.as_str()),
            // containerd compares a missing field as "".
            Op::NotEqual(v) => value.as_deref().unwrap_or("") != v,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn filters() {
        let r = Record {
            id: 1,
            kind: Kind::Committed,
            parent: Some("p".into()),
            labels: HashMap::from([("containerd.io/gc.root".to_string(), "x".to_string())]),
            created: SystemTime::UNIX_EPOCH,
            updated: SystemTime::UNIX_EPOCH,
            usage: None,
            remote: None,
        };
        let f = |s: &[&str]| {
            Filter::parse(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        assert!(f(&[]).matches("n", &r));
        assert!(f(&["kind==committed,parent==p"]).matches("n", &r));
        assert!(!f(&["kind==active"]).matches("n", &r));
        assert!(f(&["kind==active", "name==n"]).matches("n", &r));
        assert!(f(&[r#"labels."containerd.io/gc.root""#]).matches("n", &r));
        assert!(f(&["labels.other!=1"]).matches("n", &r));
        assert!(f(&[r#"parent!="""#]).matches("n", &r));
        let mut root = r.clone();
        root.parent = None;
        assert!(!f(&[r#"parent!="""#]).matches("n", &root));
        assert!(Filter::parse(&["size>3".into()]).is_err());
    }
}
