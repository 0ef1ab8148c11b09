//! Structural checks of a config: every unknown key, wrong type and missing required key, each
//! with its key path, in one pass.
//!
//! serde stops at the first error, so the TOML tree is deserialised by a small `Deserializer`
//! of our own that records where an error happened; the offending key is then patched (an
//! unknown key removed, a bad or missing value replaced by a placeholder that deserialises as
//! whatever type is asked of it) and deserialisation is tried again, until it succeeds. The keys,
//! their types and which are required come from the `Deserialize` impls themselves, so this
//! cannot drift from the config structs.

use serde::de::value::{MapDeserializer, SeqDeserializer};
use serde::de::{self, DeserializeOwned, Deserializer, IntoDeserializer, Unexpected, Visitor};
use std::fmt;

/// A structural problem: the full key path and why.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Problem {
    pub key: String,
    pub why: String,
}

/// Deserialises `table` as a `T`, collecting every structural problem. The value comes back
/// whenever the problems could all be patched over (then its patched fields hold placeholders:
/// zero, empty, `None`, the first variant), so that semantic checks can still run on the rest.
pub(super) fn deserialize<T: DeserializeOwned>(table: toml::Table) -> (Option<T>, Vec<Problem>) {
    let mut root = Node::from(toml::Value::Table(table));
    let mut problems = Vec::new();
    // Every patch removes a key or turns a value into a placeholder, so this ends; the bound
    // is only a guard.
    for _ in 0..10_000 {
        match T::deserialize(Value {
            node: &root,
            path: Vec::new(),
        }) {
            Ok(value) => return (Some(value), problems),
            Err(fault) => {
                let key = fault.key();
                problems.push(Problem {
                    key: display_path(&key),
                    why: fault.kind.to_string(),
                });
                let patched = match fault.kind {
                    Kind::Unknown { .. } => root.remove(&key),
                    Kind::Missing(_) => root.insert(&key),
                    _ => root.replace(&key),
                };
                if !patched {
                    break;
                }
            }
        }
    }
    (None, problems)
}

/// True when key path `key` is `outer` or lies under it (`data.domains[0].name` in `data`).
pub(super) fn within(key: &str, outer: &str) -> bool {
    outer.is_empty()
        || key
            .strip_prefix(outer)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.') || rest.starts_with('['))
}

/// True when one key path lies within the other.
pub(super) fn overlaps(a: &str, b: &str) -> bool {
    within(a, b) || within(b, a)
}

#[derive(Debug, Clone, PartialEq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn display_path(path: &[Seg]) -> String {
    let mut s = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !s.is_empty() {
                    s.push('.');
                }
                let bare = !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    s.push_str(k);
                } else {
                    s.push_str(&format!("{k:?}"));
                }
            }
            Seg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    if s.is_empty() {
        s.push_str("(top level)");
    }
    s
}

/// The TOML tree, with placeholders where problems were patched over.
#[derive(Debug)]
enum Node {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Datetime,
    Array(Vec<Node>),
    Table(Vec<(String, Node)>),
    Placeholder,
}

impl From<toml::Value> for Node {
    fn from(v: toml::Value) -> Self {
        match v {
            toml::Value::String(s) => Node::Str(s),
            toml::Value::Integer(i) => Node::Int(i),
            toml::Value::Float(f) => Node::Float(f),
            toml::Value::Boolean(b) => Node::Bool(b),
            toml::Value::Datetime(_) => Node::Datetime,
            toml::Value::Array(a) => Node::Array(a.into_iter().map(Node::from).collect()),
            toml::Value::Table(t) => Node::Table(t.into_iter().map(|(k, v)| (k, Node::from(v))).collect()),
        }
    }
}

impl Node {
    fn get_mut(&mut self, path: &[Seg]) -> Option<&mut Node> {
        let Some((first, rest)) = path.split_first() else {
            return Some(self);
        };
        let child = match (self, first) {
            (Node::Table(entries), Seg::Key(k)) => entries.iter_mut().find(|(name, _)| name == k).map(|(_, n)| n),
            (Node::Array(items), Seg::Index(i)) => items.get_mut(*i),
            _ => None,
        }?;
        child.get_mut(rest)
    }

    /// Removes the key at `path`; false when there is none.
    fn remove(&mut self, path: &[Seg]) -> bool {
        let Some((Seg::Key(k), parent)) = path.split_last() else {
            return false;
        };
        match self.get_mut(parent) {
            Some(Node::Table(entries)) => {
                let before = entries.len();
                entries.retain(|(name, _)| name != k);
                entries.len() < before
            }
            _ => false,
        }
    }

    /// Adds a placeholder at `path`; false when the key is already there.
    fn insert(&mut self, path: &[Seg]) -> bool {
        let Some((Seg::Key(k), parent)) = path.split_last() else {
            return false;
        };
        match self.get_mut(parent) {
            Some(Node::Table(entries)) if !entries.iter().any(|(name, _)| name == k) => {
                entries.push((k.clone(), Node::Placeholder));
                true
            }
            _ => false,
        }
    }

    /// Replaces the value at `path` by a placeholder; false when it already is one (or is the
    /// whole file).
    fn replace(&mut self, path: &[Seg]) -> bool {
        if path.is_empty() {
            return false;
        }
        match self.get_mut(path) {
            Some(Node::Placeholder) | None => false,
            Some(node) => {
                *node = Node::Placeholder;
                true
            }
        }
    }
}

/// A deserialisation error and the path of the value it happened in.
#[derive(Debug)]
struct Fault {
    path: Option<Vec<Seg>>,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Unknown {
        key: String,
        expected: &'static [&'static str],
    },
    Missing(&'static str),
    WrongType {
        expected: String,
        got: String,
    },
    Invalid {
        expected: String,
        got: String,
        number: bool,
    },
    UnknownVariant {
        value: String,
        expected: &'static [&'static str],
    },
    Other(String),
}

impl Fault {
    fn new(kind: Kind) -> Self {
        Fault { path: None, kind }
    }

    /// Records where the error happened, unless a deeper value already did.
    fn at(mut self, path: &[Seg]) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_vec());
        }
        self
    }

    /// The key the problem is about: the value's own path, or the named key of its table.
    fn key(&self) -> Vec<Seg> {
        let mut key = self.path.clone().unwrap_or_default();
        match &self.kind {
            Kind::Unknown { key: k, .. } => key.push(Seg::Key(k.clone())),
            Kind::Missing(k) => key.push(Seg::Key((*k).to_string())),
            _ => {}
        }
        key
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Kind::Unknown { key, expected } => {
                if expected.is_empty() {
                    write!(f, "unknown key (this table takes no keys)")
                } else {
                    write!(f, "unknown key (expected one of: {})", expected.join(", "))?;
                    match closest(key, expected) {
                        Some(m) => write!(f, "; did you mean `{m}`?"),
                        None => Ok(()),
                    }
                }
            }
            Kind::Missing(_) => write!(f, "missing (required)"),
            Kind::WrongType { expected, got } => write!(f, "wrong type: expected {expected}, got {got}"),
            Kind::Invalid { expected, got, number } => {
                let what = if *number { "out of range" } else { "invalid value" };
                write!(f, "{what}: expected {expected}, got {got}")
            }
            Kind::UnknownVariant { value, expected } => {
                let names: Vec<String> = expected.iter().map(|e| format!("{e:?}")).collect();
                write!(f, "unknown value {value:?} (expected one of: {})", names.join(", "))?;
                match closest(value, expected) {
                    Some(m) => write!(f, "; did you mean {m:?}?"),
                    None => Ok(()),
                }
            }
            Kind::Other(m) => f.write_str(m),
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", display_path(&self.key()), self.kind)
    }
}

impl std::error::Error for Fault {}

impl de::Error for Fault {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Fault::new(Kind::Other(msg.to_string()))
    }

    fn invalid_type(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        Fault::new(Kind::WrongType {
            expected: expected_text(exp),
            got: got_text(unexp),
        })
    }

    fn invalid_value(unexp: Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let number = match unexp {
            Unexpected::Signed(n) => Some(n.to_string()),
            Unexpected::Unsigned(n) => Some(n.to_string()),
            Unexpected::Float(x) => Some(x.to_string()),
            _ => None,
        };
        Fault::new(Kind::Invalid {
            expected: expected_text(exp),
            number: number.is_some(),
            got: number.unwrap_or_else(|| got_text(unexp)),
        })
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        Fault::new(Kind::UnknownVariant {
            value: variant.to_string(),
            expected,
        })
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        Fault::new(Kind::Unknown {
            key: field.to_string(),
            expected,
        })
    }

    fn missing_field(field: &'static str) -> Self {
        Fault::new(Kind::Missing(field))
    }
}

/// What serde's visitors expect, in the words of a config file.
fn expected_text(exp: &dyn de::Expected) -> String {
    let s = exp.to_string();
    match s.as_str() {
        "f32" | "f64" => "a float".into(),
        "u8" => "an integer in 0..=255".into(),
        "u16" => "an integer in 0..=65535".into(),
        "u32" => "an integer in 0..=4294967295".into(),
        "u64" | "usize" => "a non-negative integer".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "an integer".into(),
        "path string" => "a string (a file path)".into(),
        "a sequence" => "an array".into(),
        _ if s.starts_with("struct ") || s.starts_with("a map") => "a table".into(),
        _ if s.starts_with("enum ") => "a string".into(),
        _ => s,
    }
}

fn got_text(u: Unexpected<'_>) -> String {
    match u {
        Unexpected::Bool(b) => format!("a boolean ({b})"),
        Unexpected::Unsigned(n) => format!("an integer ({n})"),
        Unexpected::Signed(n) => format!("an integer ({n})"),
        Unexpected::Float(x) => format!("a float ({x})"),
        Unexpected::Str(s) => format!("a string ({s:?})"),
        Unexpected::Seq => "an array".into(),
        Unexpected::Map => "a table".into(),
        Unexpected::Other(what) => format!("a {what}"),
        other => other.to_string(),
    }
}

/// The candidate closest to a misspelt `word`, if one is close enough to be a likely typo.
fn closest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word_len = word.chars().count();
    candidates
        .iter()
        .map(|c| (edit_distance(word, c), *c))
        .filter(|(d, c)| *d <= (word_len / 3).max(1) || (word_len >= 3 && c.starts_with(word)))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut d: Vec<Vec<usize>> = (0..=a.len())
        .map(|i| {
            (0..=b.len())
                .map(|j| {
                    if i == 0 {
                        j
                    } else if j == 0 {
                        i
                    } else {
                        0
                    }
                })
                .collect()
        })
        .collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j] + 1).min(d[i][j - 1] + 1).min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

fn child(path: &[Seg], seg: Seg) -> Vec<Seg> {
    let mut p = Vec::with_capacity(path.len() + 1);
    p.extend_from_slice(path);
    p.push(seg);
    p
}

/// A node of the tree being deserialised, with its path for error reports.
struct Value<'a> {
    node: &'a Node,
    path: Vec<Seg>,
}

impl<'de> IntoDeserializer<'de, Fault> for Value<'_> {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

/// Methods whose type hint only matters to a placeholder.
macro_rules! hinted {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
            match self.node {
                Node::Placeholder => Placeholder.$method(visitor).map_err(|e| e.at(&self.path)),
                _ => self.deserialize_any(visitor),
            }
        }
    )*};
}

impl<'de> Deserializer<'de> for Value<'_> {
    type Error = Fault;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        let path = &self.path;
        let result = match self.node {
            Node::Str(s) => visitor.visit_str(s),
            Node::Int(i) => visitor.visit_i64(*i),
            Node::Float(x) => visitor.visit_f64(*x),
            Node::Bool(b) => visitor.visit_bool(*b),
            Node::Datetime => Err(de::Error::invalid_type(Unexpected::Other("date-time"), &visitor)),
            Node::Array(items) => {
                let mut seq = SeqDeserializer::new(items.iter().enumerate().map(|(i, node)| Value {
                    node,
                    path: child(path, Seg::Index(i)),
                }));
                visitor.visit_seq(&mut seq).and_then(|v| seq.end().map(|()| v))
            }
            Node::Table(entries) => {
                let mut map = MapDeserializer::new(entries.iter().map(|(k, node)| {
                    (
                        k.clone(),
                        Value {
                            node,
                            path: child(path, Seg::Key(k.clone())),
                        },
                    )
                }));
                visitor.visit_map(&mut map).and_then(|v| map.end().map(|()| v))
            }
            Node::Placeholder => Placeholder.deserialize_any(visitor),
        };
        result.map_err(|e| e.at(path))
    }

    hinted! {
        deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_f32
        deserialize_f64 deserialize_char deserialize_str deserialize_string deserialize_bytes
        deserialize_byte_buf deserialize_unit deserialize_seq deserialize_map
        deserialize_identifier deserialize_ignored_any
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        // TOML has no null: a key that is there is `Some`.
        match self.node {
            Node::Placeholder => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(self, name: &'static str, visitor: V) -> Result<V::Value, Fault> {
        match self.node {
            Node::Placeholder => Placeholder.deserialize_unit_struct(name, visitor),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Fault> {
        match self.node {
            Node::Placeholder => Placeholder
                .deserialize_tuple(len, visitor)
                .map_err(|e| e.at(&self.path)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Fault> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Fault> {
        match self.node {
            Node::Placeholder => Placeholder
                .deserialize_struct(name, fields, visitor)
                .map_err(|e| e.at(&self.path)),
            _ => self.deserialize_any(visitor),
        }
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Fault> {
        let result = match self.node {
            Node::Str(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Node::Placeholder => Placeholder.deserialize_enum(name, variants, visitor),
            _ => return self.deserialize_any(visitor),
        };
        result.map_err(|e| e.at(&self.path))
    }
}

/// Stands for a value that was wrong or missing: whatever type is asked of it, it is that
/// type's zero (false, 0, "", empty, `None`, the first variant, a struct of such).
struct Placeholder;

impl<'de> IntoDeserializer<'de, Fault> for Placeholder {
    type Deserializer = Self;
    fn into_deserializer(self) -> Self {
        self
    }
}

impl<'de> Deserializer<'de> for Placeholder {
    type Error = Fault;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_unit()
    }
    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_bool(false)
    }
    fn deserialize_i8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_i64(0)
    }
    fn deserialize_i16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_i64(0)
    }
    fn deserialize_i32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_i64(0)
    }
    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_i64(0)
    }
    fn deserialize_u8<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_u64(0)
    }
    fn deserialize_u16<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_u64(0)
    }
    fn deserialize_u32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_u64(0)
    }
    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_u64(0)
    }
    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_f64(0.0)
    }
    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_char(' ')
    }
    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_str("")
    }
    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_str("")
    }
    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_bytes(&[])
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_none()
    }
    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_unit()
    }
    fn deserialize_unit_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_unit()
    }
    fn deserialize_newtype_struct<V: Visitor<'de>>(self, _name: &'static str, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_newtype_struct(self)
    }
    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_seq(SeqDeserializer::new(std::iter::empty::<Placeholder>()))
    }
    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_seq(SeqDeserializer::new((0..len).map(|_| Placeholder)))
    }
    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Fault> {
        self.deserialize_tuple(len, visitor)
    }
    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_map(MapDeserializer::new(std::iter::empty::<(&str, Placeholder)>()))
    }
    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Fault> {
        visitor.visit_map(MapDeserializer::new(fields.iter().map(|f| (*f, Placeholder))))
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Fault> {
        match variants.first() {
            Some(first) => visitor.visit_enum((*first).into_deserializer()),
            None => visitor.visit_unit(),
        }
    }
    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_str("")
    }
    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Fault> {
        visitor.visit_unit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        n: u32,
        #[serde(default)]
        inner: Inner,
        #[serde(default)]
        items: Vec<Item>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, default)]
    struct Inner {
        rate: f64,
        on: bool,
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Item {
        name: String,
        #[serde(default)]
        weight: f64,
    }

    #[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
    #[serde(rename_all = "kebab-case")]
    enum Mode {
        Fast,
        Slow,
    }

    fn run(text: &str) -> (Option<Outer>, Vec<String>) {
        let table: toml::Table = toml::from_str(text).expect("TOML");
        let (value, problems) = deserialize::<Outer>(table);
        (
            value,
            problems.into_iter().map(|p| format!("{}: {}", p.key, p.why)).collect(),
        )
    }

    #[test]
    fn a_good_tree_deserialises_as_serde_would() {
        let text = "n = 3\ninner = { rate = 1, mode = \"slow\" }\n[[items]]\nname = \"a\"\nweight = 0.5\n";
        let (value, problems) = run(text);
        assert!(problems.is_empty(), "{problems:?}");
        let expected: Outer = toml::from_str(text).expect("serde");
        assert_eq!(value, Some(expected));
    }

    #[test]
    fn every_structural_problem_is_reported_with_its_path() {
        let (value, problems) = run("bogus = 1\n[inner]\nrat = 1.0\non = \"yes\"\nmode = \"fats\"\n\
             [[items]]\nname = \"a\"\n[[items]]\nweight = \"heavy\"\nextra = 2\n");
        let expected = [
            "bogus: unknown key (expected one of: n, inner, items)",
            "inner.rat: unknown key (expected one of: rate, on, mode); did you mean `rate`?",
            "inner.on: wrong type: expected a boolean, got a string (\"yes\")",
            "inner.mode: unknown value \"fats\" (expected one of: \"fast\", \"slow\"); did you mean \"fast\"?",
            "items[1].weight: wrong type: expected a float, got a string (\"heavy\")",
            "items[1].extra: unknown key (expected one of: name, weight)",
            "items[1].name: missing (required)",
            "n: missing (required)",
        ];
        let mut sorted = problems.clone();
        sorted.sort();
        let mut want: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(sorted, want);
        let value = value.expect("every problem can be patched over");
        assert_eq!(value.items[0].name, "a", "good values survive");
    }

    #[test]
    fn out_of_range_integers_and_wrong_containers_are_named() {
        let (_, problems) = run("n = -1\ninner = 5\nitems = [1]\n");
        assert!(
            problems.contains(&"n: out of range: expected an integer in 0..=4294967295, got -1".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"inner: wrong type: expected a table, got an integer (5)".to_string()),
            "{problems:?}"
        );
        assert!(
            problems.contains(&"items[0]: wrong type: expected a table, got an integer (1)".to_string()),
            "{problems:?}"
        );
    }

    #[test]
    fn key_paths_overlap_only_along_segments() {
        assert!(overlaps("data", "data.domains[0].name"));
        assert!(overlaps("data.domains[0].name", "data.domains"));
        assert!(overlaps("rounds", "rounds"));
        assert!(!overlaps("data.meta", "data.metadata"));
        assert!(!overlaps("inner.lr", "outer.lr"));
        assert!(within("data.classes", "data") && !within("data", "data.classes"));
    }

    #[test]
    fn suggestions_are_only_for_likely_typos() {
        let keys = ["steps", "batch_size", "lr", "momentum", "weight_decay"];
        assert_eq!(closest("step", &keys), Some("steps"));
        assert_eq!(closest("batchsize", &keys), Some("batch_size"));
        assert_eq!(closest("mom", &keys), Some("momentum"));
        assert_eq!(closest("setps", &keys), Some("steps"));
        assert_eq!(closest("learning_rate", &keys), None);
        assert_eq!(
            closest("hypergrad", &["uniform", "hypergradient"]),
            Some("hypergradient")
        );
    }
}
