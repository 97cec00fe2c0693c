//! A file's YAML text to documents, at a cost bounded whatever the text holds.
//!
//! YAML aliases (`*name`) repeat the node their anchor (`&name`) names, so a few
//! kilobytes can stand for gigabytes ("billion laughs"): serde_yaml_ng 0.10 only
//! stops a document whose aliases are followed more than 100 times its own event
//! count, which still lets the expansion grow with the square of the text (a 30 KB
//! file expanded to 4 GB). So:
//!
//! - every document is first read *shallowly* ([`Head`]): its `apiVersion` and
//!   `kind`, every other value skipped without following aliases (linear in the
//!   text). Only documents of kinds we read (and `List`s) are expanded;
//! - expansion counts nodes and bytes of text, aliases expanded, against one budget
//!   for the whole file ([`Limits`]), and stops at the first node over it.
//!
//! Aliases stay allowed within the budget: kubectl accepts them (with its own
//! limit on aliasing), and manifests sharing a label set through an anchor exist.

use serde::de::{
    self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor,
};
use serde_json::{Map, Number, Value};

use super::Limits;

/// Why a file's text did not become documents.
#[derive(Debug, thiserror::Error)]
pub enum YamlError {
    #[error("invalid YAML: {0}")]
    Syntax(serde_yaml_ng::Error),
    #[error(
        "document {document}: more than {limit} YAML nodes with its aliases expanded \
         (the limit per file)"
    )]
    TooManyNodes { document: usize, limit: usize },
    #[error(
        "document {document}: more than {limit} bytes of text with its aliases expanded \
         (the limit per file)"
    )]
    TooMuchText { document: usize, limit: usize },
}

/// What a document is, as read without expanding it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Head {
    /// An empty document (`---` alone, or `null`).
    Empty,
    /// A scalar or a sequence: not a Kubernetes object.
    NotMapping,
    /// A mapping; `apiVersion` and `kind` are empty when missing or not strings.
    Object { api_version: String, kind: String },
}

/// One document of a file.
#[derive(Clone, Debug, PartialEq)]
pub enum Doc {
    Empty,
    NotMapping,
    /// A mapping whose kind the caller did not ask for: never expanded.
    Skipped {
        api_version: String,
        kind: String,
    },
    /// A mapping the caller asked for, expanded.
    Expanded(Value),
}

/// The documents of `text`, in order, each expanded only when the iterator
/// reaches it: a caller that converts a document before taking the next holds
/// one document's tree at a time, not the file's (measured: no lower peak at
/// 100 000 Pods, since a tree's strings move into the objects made of it; it
/// bounds what is transient to one document). Those whose
/// `apiVersion` and `kind` `expand` accepts are expanded (within `limits`, for
/// all of them together); the others are only named. A syntax error anywhere
/// fails here, before anything is expanded; a document over the budget ends
/// the iteration with its error (the caller drops what it made of the others).
pub fn documents<'t, F: Fn(&str, &str) -> bool>(
    text: &'t str,
    limits: &Limits,
    expand: F,
) -> Result<Documents<'t, F>, YamlError> {
    // First pass: every document's head. It also finds syntax errors anywhere in
    // the file before anything is expanded.
    let heads = serde_yaml_ng::Deserializer::from_str(text)
        .map(|document| document.deserialize_any(HeadVisitor))
        .collect::<Result<Vec<Head>, _>>()
        .map_err(YamlError::Syntax)?;
    Ok(Documents {
        heads: heads.into_iter(),
        parsed: serde_yaml_ng::Deserializer::from_str(text),
        budget: Budget::new(limits),
        limits: (limits.nodes, limits.text_bytes),
        index: 0,
        expand,
        failed: false,
    })
}

/// See [`documents`].
#[allow(missing_debug_implementations)] // the parser has no Debug
pub struct Documents<'t, F> {
    heads: std::vec::IntoIter<Head>,
    /// Second pass: the parser's events for a document are collected either
    /// way (linear); skipping one costs nothing more.
    parsed: serde_yaml_ng::Deserializer<'t>,
    budget: Budget,
    /// The budget's limits (nodes, text bytes), for the errors.
    limits: (usize, usize),
    index: usize,
    expand: F,
    /// After an error, nothing more.
    failed: bool,
}

impl<F: Fn(&str, &str) -> bool> Iterator for Documents<'_, F> {
    type Item = Result<Doc, YamlError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let head = self.heads.next()?;
        let document = self.parsed.next()?;
        let i = self.index;
        self.index += 1;
        let doc = match head {
            Head::Empty => Doc::Empty,
            Head::NotMapping => Doc::NotMapping,
            Head::Object { api_version, kind } if !(self.expand)(&api_version, &kind) => {
                Doc::Skipped { api_version, kind }
            }
            Head::Object { .. } => match Node(&mut self.budget).deserialize(document) {
                Ok(value) => Doc::Expanded(value),
                Err(e) => {
                    self.failed = true;
                    let (nodes, text_bytes) = self.limits;
                    return Some(Err(match self.budget.exceeded {
                        Some(Exceeded::Nodes) => YamlError::TooManyNodes {
                            document: i,
                            limit: nodes,
                        },
                        Some(Exceeded::Text) => YamlError::TooMuchText {
                            document: i,
                            limit: text_bytes,
                        },
                        None => YamlError::Syntax(e),
                    }));
                }
            },
        };
        Some(Ok(doc))
    }
}

/// Reads a document's head: only `apiVersion` and `kind` are looked at.
struct HeadVisitor;

impl<'de> Visitor<'de> for HeadVisitor {
    type Value = Head;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Head, E> {
        Ok(Head::Empty)
    }

    fn visit_none<E: de::Error>(self) -> Result<Head, E> {
        Ok(Head::Empty)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Head, E> {
        Ok(Head::NotMapping)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Head, A::Error> {
        // Skipping does not follow aliases: linear in the text.
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Head::NotMapping)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Head, A::Error> {
        let (mut api_version, mut kind) = (String::new(), String::new());
        // A repeated key: the last one counts, as when the document is expanded.
        while let Some(key) = map.next_key_seed(KeySeed(None))? {
            match key.as_str() {
                "apiVersion" => api_version = map.next_value_seed(NameSeed)?,
                "kind" => kind = map.next_value_seed(NameSeed)?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Head::Object { api_version, kind })
    }
}

/// `apiVersion` or `kind`: a string, or empty for another scalar. A sequence or
/// a mapping there is an error at once (it is not walked: an alias to a large
/// node would make every repetition of the key cost that node's size).
struct NameSeed;

impl<'de> DeserializeSeed<'de> for NameSeed {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for NameSeed {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        Ok(v.to_owned())
    }

    fn visit_unit<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_none<E: de::Error>(self) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<String, E> {
        Ok(String::new())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(de::Error::invalid_type(Unexpected::Seq, &self))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<String, A::Error> {
        Err(de::Error::invalid_type(Unexpected::Map, &self))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Exceeded {
    Nodes,
    Text,
}

/// What is left of a file's budget.
#[derive(Debug)]
struct Budget {
    nodes: usize,
    text_bytes: usize,
    exceeded: Option<Exceeded>,
}

impl Budget {
    fn new(limits: &Limits) -> Self {
        Self {
            nodes: limits.nodes,
            text_bytes: limits.text_bytes,
            exceeded: None,
        }
    }

    /// Takes one node (and `text` bytes of a string) from the budget, before it
    /// is allocated.
    fn take<E: de::Error>(&mut self, text: usize) -> Result<(), E> {
        let Some(nodes) = self.nodes.checked_sub(1) else {
            self.exceeded = Some(Exceeded::Nodes);
            return Err(E::custom("too many YAML nodes"));
        };
        let Some(text_bytes) = self.text_bytes.checked_sub(text) else {
            self.exceeded = Some(Exceeded::Text);
            return Err(E::custom("too much text"));
        };
        (self.nodes, self.text_bytes) = (nodes, text_bytes);
        Ok(())
    }
}

/// A mapping key, counted when a budget is given.
struct KeySeed<'b>(Option<&'b mut Budget>);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = String;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        // As serde_json's own keys: a scalar read as a string; a sequence or a
        // mapping as a key is an error (without walking it).
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = String;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a string key")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
        if let Some(budget) = self.0 {
            budget.take(v.len())?;
        }
        Ok(v.to_owned())
    }
}

/// A node, expanded into a JSON value within the budget.
struct Node<'b>(&'b mut Budget);

impl<'de> DeserializeSeed<'de> for Node<'_> {
    type Value = Value;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// The same values serde_json's own `Value` would make of the document.
impl<'de> Visitor<'de> for Node<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Bool(v))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Number(v.into()))
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.0.take(0)?;
        serde::Deserialize::deserialize(de::value::I128Deserializer::new(v)).map(Value::Number)
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        self.0.take(0)?;
        serde::Deserialize::deserialize(de::value::U128Deserializer::new(v)).map(Value::Number)
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.0.take(v.len())?;
        Ok(Value::String(v.to_owned()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.0.take(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.0.take(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Node(&mut *self.0))? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.0.take(0)?;
        let mut object = Map::new();
        while let Some(key) = map.next_key_seed(KeySeed(Some(&mut *self.0)))? {
            let value = map.next_value_seed(Node(&mut *self.0))?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(_: &str, _: &str) -> bool {
        true
    }

    /// Every document at once.
    fn documents(
        text: &str,
        limits: &Limits,
        expand: impl Fn(&str, &str) -> bool,
    ) -> Result<Vec<Doc>, YamlError> {
        super::documents(text, limits, expand)?.collect()
    }

    fn expanded(text: &str) -> Vec<Value> {
        documents(text, &Limits::default(), all)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|d| match d {
                Doc::Expanded(v) => Some(v),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn documents_expand_to_what_serde_json_makes_of_them() {
        let text = "a: &x [1, -2, 3.5, .nan, true, ~, \"s\", 18446744073709551615]\nb: *x\nc: {d: e}\n---\n---\n- list\n---\nkind: Pod\n";
        let ours = documents(text, &Limits::default(), |_, kind| kind.is_empty()).ok();
        let theirs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(text)
            .map(|d| serde::Deserialize::deserialize(d).unwrap_or(Value::Bool(false)))
            .collect();
        assert_eq!(
            ours,
            Some(vec![
                Doc::Expanded(theirs[0].clone()),
                Doc::Empty,
                Doc::NotMapping,
                Doc::Skipped {
                    api_version: String::new(),
                    kind: "Pod".to_owned()
                },
            ])
        );
    }

    #[test]
    fn the_head_takes_the_last_of_repeated_keys_and_skips_the_rest() {
        let text = "kind: A\nspec: {x: [1, 2]}\nkind: B\napiVersion: v1\n";
        let Ok(docs) = documents(text, &Limits::default(), |_, _| false) else {
            panic!("parses");
        };
        assert_eq!(
            docs,
            vec![Doc::Skipped {
                api_version: "v1".to_owned(),
                kind: "B".to_owned()
            }]
        );
    }

    #[test]
    fn a_document_over_the_node_budget_is_refused_at_the_first_node_over() {
        let limits = Limits {
            nodes: 10,
            ..Limits::default()
        };
        // 1 mapping + 2 keys + 1 scalar + 1 sequence + 5 items = 10 nodes.
        let fits = "a: b\nc: [1, 2, 3, 4, 5]\n";
        assert_eq!(expanded(fits).len(), 1);
        assert!(documents(fits, &limits, all).is_ok());
        let over = "a: b\nc: [1, 2, 3, 4, 5, 6]\n";
        assert!(matches!(
            documents(over, &limits, all),
            Err(YamlError::TooManyNodes {
                document: 0,
                limit: 10
            })
        ));
    }

    #[test]
    fn the_budget_is_for_the_whole_file() {
        let limits = Limits {
            text_bytes: 12,
            ..Limits::default()
        };
        // Keys and strings count: "kind" + "Pod" = 7 bytes per document.
        let text = "kind: Pod\n---\nkind: Pod\n";
        assert!(matches!(
            documents(text, &limits, all),
            Err(YamlError::TooMuchText {
                document: 1,
                limit: 12
            })
        ));
        // Documents not expanded cost nothing.
        assert!(documents(text, &limits, |_, _| false).is_ok());
    }

    #[test]
    fn a_syntax_error_in_any_document_fails_the_text_before_anything_is_expanded() {
        let text = "kind: Pod\n---\nspec: [unclosed\n";
        assert!(matches!(
            documents(text, &Limits::default(), all),
            Err(YamlError::Syntax(_))
        ));
    }

    #[test]
    fn a_kind_that_is_not_a_string_fails_without_walking_the_alias() {
        let text = "spec: &big [1, 2, 3]\nkind: *big\n";
        let err = documents(text, &Limits::default(), all).err();
        assert!(
            matches!(&err, Some(YamlError::Syntax(e)) if e.to_string().contains("expected a string")),
            "{err:?}"
        );
    }
}
