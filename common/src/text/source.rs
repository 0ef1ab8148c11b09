//! Reading labelled text from JSONL, CSV or Parquet, chosen by the file's extension. Every
//! problem is named by row (1-based, data rows only) and column, and all of a file's problems are
//! reported at once (up to [`MAX_PROBLEMS`], then a count), so a bad file is fixed in one pass.

use super::{TextError, MAX_PROBLEMS};
use parquet::basic::{ConvertedType, LogicalType, Type as PhysicalType};
use parquet::column::reader::{ColumnReader, ColumnReaderImpl};
use parquet::data_type::{ByteArray, DataType};
use parquet::file::reader::{FileReader, SerializedFileReader};
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

/// Which columns hold what. `text` and `label` default to `text` and `label`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Columns {
    pub text: String,
    pub label: String,
    /// A column naming each row's domain (kept as names, see [`Categorical`]).
    pub domain: Option<String>,
    /// A column naming each row's task.
    pub task: Option<String>,
}

impl Default for Columns {
    fn default() -> Self {
        Self {
            text: "text".into(),
            label: "label".into(),
            domain: None,
            task: None,
        }
    }
}

/// How to read a source: its columns and the label map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourceOptions {
    pub columns: Columns,
    /// The label map: `labels[k]` is the label of class `k`. A row's label is looked up by its
    /// text: a string as it is, an integer in decimal (so `[“0”, “1”]` maps the integer labels
    /// of a `datasets` ClassLabel column, and CSV, JSONL and Parquet agree).
    pub labels: Vec<String>,
}

impl SourceOptions {
    /// Options with the default columns (`text`, `label`).
    pub fn new(labels: &[&str]) -> Self {
        Self {
            columns: Columns::default(),
            labels: labels.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    pub(super) fn check(&self) -> Result<(), TextError> {
        if self.labels.is_empty() {
            return Err(TextError::LabelMap {
                reason: "it is empty".into(),
            });
        }
        let mut seen = BTreeSet::new();
        for l in &self.labels {
            if !seen.insert(l.as_str()) {
                return Err(TextError::LabelMap {
                    reason: format!("label `{l}` appears twice in {}", show_map(&self.labels)),
                });
            }
        }
        Ok(())
    }
}

/// Values of a column kept as a dictionary: `names` in order of first appearance, `ids[row]`
/// indexes them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Categorical {
    pub names: Vec<String>,
    pub ids: Vec<u32>,
}

impl Categorical {
    /// The name of `row`'s value.
    pub fn value(&self, row: usize) -> &str {
        &self.names[self.ids[row] as usize]
    }

    fn push(&mut self, index: &mut HashMap<String, u32>, value: String) {
        let next = self.names.len() as u32;
        let id = *index.entry(value.clone()).or_insert_with(|| {
            self.names.push(value);
            next
        });
        self.ids.push(id);
    }

    pub(super) fn select(&self, rows: &[usize]) -> Self {
        Self {
            names: self.names.clone(),
            ids: rows.iter().map(|&r| self.ids[r]).collect(),
        }
    }
}

/// The rows of a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRows {
    pub texts: Vec<String>,
    /// Class ids, `0..labels.len()` of the label map.
    pub labels: Vec<i64>,
    pub domains: Option<Categorical>,
    pub tasks: Option<Categorical>,
}

impl TextRows {
    pub fn len(&self) -> usize {
        self.texts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.texts.is_empty()
    }
}

/// A source's format, from its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    /// `.jsonl`, `.csv` or `.parquet` (any case); `None` for anything else.
    pub fn of(path: &Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "jsonl" => Some(Self::Jsonl),
            "csv" => Some(Self::Csv),
            "parquet" => Some(Self::Parquet),
            _ => None,
        }
    }

    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Jsonl => "jsonl",
            Self::Csv => "csv",
            Self::Parquet => "parquet",
        }
    }
}

/// Where a row is: its 1-based number among the data rows, and for text formats the line of
/// the file it starts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RowRef {
    pub format: Format,
    /// 1-based; a CSV header is not counted, nor are JSONL's blank lines.
    pub row: usize,
    /// 1-based line of the file where the row starts (JSONL and CSV).
    pub line: Option<u64>,
}

impl fmt::Display for RowRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.format, self.line) {
            (Format::Csv, Some(line)) => {
                write!(f, "row {} (not counting the header; line {line} of the file)", self.row)
            }
            (_, Some(line)) => write!(f, "row {} (line {line})", self.row),
            (_, None) => write!(f, "row {}", self.row),
        }
    }
}

/// One problem with a data file, naming the row and column (the file is named by the
/// [`TextError::Data`] that holds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The column is in no row, or not in the header or schema.
    MissingColumn {
        column: String,
        role: &'static str,
        /// The columns the file has.
        found: Vec<String>,
    },
    /// One JSONL row lacks a column that others have.
    RowMissingColumn {
        at: RowRef,
        column: String,
        found: Vec<String>,
    },
    /// A value (or, with `at: None`, a whole Parquet column) of the wrong type.
    WrongType {
        at: Option<RowRef>,
        column: String,
        found: String,
        expected: &'static str,
    },
    UnknownLabel {
        at: RowRef,
        column: String,
        label: String,
        map: Vec<String>,
    },
    /// Empty or only whitespace.
    EmptyText {
        at: RowRef,
        column: String,
    },
    Null {
        at: RowRef,
        column: String,
    },
    /// Bytes that are not UTF-8; `column` is `None` where the row could not be split into
    /// columns (a JSONL line whose bad bytes lie in a column not read).
    BadUtf8 {
        at: RowRef,
        column: Option<String>,
        /// Byte offset of the first bad byte, in the value (or the line).
        offset: usize,
    },
    /// A JSONL line that is not JSON, or not an object; `column` is the character position.
    BadJson {
        at: RowRef,
        column: usize,
        reason: String,
    },
    /// A CSV row whose field count differs from the header's.
    Ragged {
        at: RowRef,
        fields: usize,
        header: Vec<String>,
    },
    /// A CSV row the reader could not split.
    BadCsv {
        at: RowRef,
        reason: String,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingColumn { column, role, found } => {
                write!(
                    f,
                    "no column `{column}` (the {role} column); the file has: {}",
                    show_cols(found)
                )
            }
            Self::RowMissingColumn { at, column, found } => {
                write!(f, "{at}: no column `{column}`; the row has: {}", show_cols(found))
            }
            Self::WrongType {
                at: Some(at),
                column,
                found,
                expected,
            } => write!(f, "{at}, column `{column}`: {found}, expected {expected}"),
            Self::WrongType {
                at: None,
                column,
                found,
                expected,
            } => write!(f, "column `{column}` has type {found}, expected {expected}"),
            Self::UnknownLabel { at, column, label, map } => {
                write!(
                    f,
                    "{at}, column `{column}`: label {label:?} is not in the label map {}",
                    show_map(map)
                )
            }
            Self::EmptyText { at, column } => {
                write!(f, "{at}, column `{column}`: the text is empty or only whitespace")
            }
            Self::Null { at, column } => write!(f, "{at}, column `{column}`: null"),
            Self::BadUtf8 {
                at,
                column: Some(column),
                offset,
            } => write!(
                f,
                "{at}, column `{column}`: invalid UTF-8 at byte offset {offset} of the value"
            ),
            Self::BadUtf8 {
                at,
                column: None,
                offset,
            } => write!(
                f,
                "{at}: invalid UTF-8 at byte offset {offset} of the line (in a column not read)"
            ),
            Self::BadJson { at, column, reason } => {
                write!(f, "{at}, character {column}: malformed JSON: {reason}")
            }
            Self::Ragged { at, fields, header } => {
                let n = header.len();
                if *fields < n {
                    write!(
                        f,
                        "{at}: {fields} fields where the header has {n}; no value for column(s) {}",
                        show_cols(&header[*fields..])
                    )
                } else {
                    write!(
                        f,
                        "{at}: {fields} fields where the header has {n} ({})",
                        show_cols(header)
                    )
                }
            }
            Self::BadCsv { at, reason } => write!(f, "{at}: unreadable CSV: {reason}"),
        }
    }
}

fn show_cols(cols: &[String]) -> String {
    if cols.is_empty() {
        return "none".into();
    }
    cols.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
}

fn show_map(map: &[String]) -> String {
    let shown: Vec<String> = map.iter().take(10).map(|l| format!("{l:?}")).collect();
    let rest = if map.len() > 10 {
        format!(", ... ({} labels)", map.len())
    } else {
        String::new()
    };
    format!("[{}{rest}]", shown.join(", "))
}

/// Reads `path` (format by extension) with `options`.
///
/// # Errors
/// [`TextError::Data`] with every problem of the file (up to [`MAX_PROBLEMS`] listed), or the
/// file's unreadability, unknown format or emptiness; a bad label map.
pub fn read_source(path: &Path, options: &SourceOptions) -> Result<TextRows, TextError> {
    format_of(path)?;
    let bytes = std::fs::read(path).map_err(|error| TextError::Read {
        path: path.into(),
        error,
    })?;
    parse_source(bytes, path, options)
}

/// The format of `path`, or an error naming it.
pub(super) fn format_of(path: &Path) -> Result<Format, TextError> {
    Format::of(path).ok_or_else(|| TextError::Format {
        path: path.into(),
        reason: "unknown format: the file name must end in .jsonl, .csv or .parquet".into(),
    })
}

/// As [`read_source`], on the file's bytes already read (`path` gives the format and names the
/// file in errors).
///
/// # Errors
/// As [`read_source`].
pub fn parse_source(bytes: Vec<u8>, path: &Path, options: &SourceOptions) -> Result<TextRows, TextError> {
    options.check()?;
    let format = format_of(path)?;
    let mut b = Builder::new(options);
    match format {
        Format::Jsonl => jsonl(strip_bom(&bytes), &mut b),
        Format::Csv => csv_rows(strip_bom(&bytes), &mut b).map_err(|reason| TextError::Format {
            path: path.into(),
            reason,
        })?,
        Format::Parquet => parquet_rows(bytes, path, &mut b)?,
    }
    b.finish(path)
}

fn strip_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
}

/// One cell of a row as the format gave it.
enum Cell {
    Text(String),
    Int(i64),
    Null,
    /// Already reported (missing column, wrong type, bad bytes).
    Bad,
}

/// Turns cells into [`TextRows`], collecting problems.
struct Builder<'a> {
    options: &'a SourceOptions,
    label_index: HashMap<&'a str, i64>,
    rows: TextRows,
    domain_index: HashMap<String, u32>,
    task_index: HashMap<String, u32>,
    problems: Vec<Problem>,
    more: usize,
}

impl<'a> Builder<'a> {
    fn new(options: &'a SourceOptions) -> Self {
        let c = &options.columns;
        Self {
            options,
            label_index: options
                .labels
                .iter()
                .enumerate()
                .map(|(i, l)| (l.as_str(), i as i64))
                .collect(),
            rows: TextRows {
                texts: Vec::new(),
                labels: Vec::new(),
                domains: c.domain.as_ref().map(|_| Categorical::default()),
                tasks: c.task.as_ref().map(|_| Categorical::default()),
            },
            domain_index: HashMap::new(),
            task_index: HashMap::new(),
            problems: Vec::new(),
            more: 0,
        }
    }

    fn problem(&mut self, p: Problem) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.more += 1;
        }
    }

    /// The requested columns: (name, role), text and label first.
    fn wanted(&self) -> Vec<(String, &'static str)> {
        let c = &self.options.columns;
        let mut w = vec![(c.text.clone(), "text"), (c.label.clone(), "label")];
        if let Some(d) = &c.domain {
            w.push((d.clone(), "domain"));
        }
        if let Some(t) = &c.task {
            w.push((t.clone(), "task"));
        }
        w
    }

    /// One row: `cells` in the order of [`Self::wanted`].
    fn row(&mut self, at: RowRef, cells: Vec<Cell>) {
        let options: &'a SourceOptions = self.options;
        let c = &options.columns;
        let mut cells = cells.into_iter();
        let mut ok = true;
        let text = match cells.next() {
            Some(Cell::Text(s)) if s.trim().is_empty() => {
                self.problem(Problem::EmptyText {
                    at,
                    column: c.text.clone(),
                });
                None
            }
            Some(Cell::Text(s)) => Some(s),
            Some(Cell::Int(i)) => {
                self.problem(Problem::WrongType {
                    at: Some(at),
                    column: c.text.clone(),
                    found: format!("the number {i}"),
                    expected: "a string",
                });
                None
            }
            Some(Cell::Null) => {
                self.problem(Problem::Null {
                    at,
                    column: c.text.clone(),
                });
                None
            }
            Some(Cell::Bad) | None => None,
        };
        ok &= text.is_some();
        let label = match self.name(at, &c.label, cells.next()) {
            Some(l) => match self.label_index.get(l.as_str()) {
                Some(&k) => Some(k),
                None => {
                    self.problem(Problem::UnknownLabel {
                        at,
                        column: c.label.clone(),
                        label: l,
                        map: options.labels.clone(),
                    });
                    None
                }
            },
            None => None,
        };
        ok &= label.is_some();
        let domain = match &c.domain {
            Some(col) => {
                let v = self.name(at, col, cells.next());
                ok &= v.is_some();
                v
            }
            None => None,
        };
        let task = match &c.task {
            Some(col) => {
                let v = self.name(at, col, cells.next());
                ok &= v.is_some();
                v
            }
            None => None,
        };
        // Once a problem is found nothing more is kept: the rows are thrown away anyway.
        if !ok || !self.problems.is_empty() {
            return;
        }
        self.rows.texts.extend(text);
        self.rows.labels.extend(label);
        if let (Some(d), Some(v)) = (self.rows.domains.as_mut(), domain) {
            d.push(&mut self.domain_index, v);
        }
        if let (Some(t), Some(v)) = (self.rows.tasks.as_mut(), task) {
            t.push(&mut self.task_index, v);
        }
    }

    /// A label, domain or task value as text.
    fn name(&mut self, at: RowRef, column: &str, cell: Option<Cell>) -> Option<String> {
        match cell {
            Some(Cell::Text(s)) => Some(s),
            Some(Cell::Int(i)) => Some(i.to_string()),
            Some(Cell::Null) => {
                self.problem(Problem::Null {
                    at,
                    column: column.to_owned(),
                });
                None
            }
            Some(Cell::Bad) | None => None,
        }
    }

    fn finish(self, path: &Path) -> Result<TextRows, TextError> {
        if !self.problems.is_empty() {
            return Err(TextError::Data {
                path: path.into(),
                problems: self.problems,
                more: self.more,
            });
        }
        if self.rows.is_empty() {
            return Err(TextError::Empty { path: path.into() });
        }
        Ok(self.rows)
    }
}

fn json_type(v: &serde_json::Value) -> String {
    use serde_json::Value;
    match v {
        Value::Null => "null".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(_) => "a string".into(),
        Value::Array(_) => "an array".into(),
        Value::Object(_) => "an object".into(),
    }
}

/// JSONL: one object per line; blank lines are skipped (and not counted as rows).
fn jsonl(bytes: &[u8], b: &mut Builder<'_>) {
    use serde_json::{Map, Value};
    let wanted = b.wanted();
    // First every line, then the columns: one that no row has is reported once, not per row.
    // Per row: the object and the offset of a bad byte in the line, or why it is no object.
    // Problems are reported in row order, after any column missing from the whole file.
    type Parsed = Result<(Map<String, Value>, Option<usize>), Problem>;
    let mut parsed: Vec<(RowRef, Parsed)> = Vec::new();
    let mut keys = BTreeSet::new();
    let mut row = 0;
    for (i, line) in bytes.split(|&c| c == b'\n').enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        row += 1;
        let at = RowRef {
            format: Format::Jsonl,
            row,
            line: Some(i as u64 + 1),
        };
        // Bad bytes: parse what is there, and name the columns read that hold them.
        let (text, bad_at) = match std::str::from_utf8(line) {
            Ok(s) => (std::borrow::Cow::Borrowed(s), None),
            Err(e) => (String::from_utf8_lossy(line), Some(e.valid_up_to())),
        };
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => {
                keys.extend(map.keys().cloned());
                parsed.push((at, Ok((map, bad_at))));
            }
            Ok(other) => parsed.push((
                at,
                Err(Problem::BadJson {
                    at,
                    column: 1,
                    reason: format!("{}, expected an object", json_type(&other)),
                }),
            )),
            Err(e) => {
                let message = e.to_string();
                let reason = message.rsplit_once(" at line ").map_or(message.as_str(), |(m, _)| m);
                parsed.push((
                    at,
                    Err(Problem::BadJson {
                        at,
                        column: e.column(),
                        reason: reason.to_owned(),
                    }),
                ));
            }
        }
    }
    let found: Vec<String> = keys.iter().cloned().collect();
    let absent: Vec<bool> = wanted.iter().map(|(c, _)| !keys.contains(c)).collect();
    if parsed.iter().any(|(_, p)| p.is_ok()) {
        for ((column, role), &gone) in wanted.iter().zip(&absent) {
            if gone {
                b.problem(Problem::MissingColumn {
                    column: column.clone(),
                    role,
                    found: found.clone(),
                });
            }
        }
    }
    for (at, p) in parsed {
        let (map, bad) = match p {
            Ok(object) => object,
            Err(problem) => {
                b.problem(problem);
                continue;
            }
        };
        let mut reported_bad = false;
        let mut cells = Vec::with_capacity(wanted.len());
        for ((column, _), &gone) in wanted.iter().zip(&absent) {
            if gone {
                cells.push(Cell::Bad);
                continue;
            }
            // Cloned, not taken: one column may serve two roles (a label that is also the task).
            let cell = match map.get(column).cloned() {
                None => {
                    let mut has: Vec<String> = map.keys().cloned().collect();
                    has.sort();
                    b.problem(Problem::RowMissingColumn {
                        at,
                        column: column.clone(),
                        found: has,
                    });
                    Cell::Bad
                }
                Some(Value::String(s)) => match (&bad, s.find('\u{FFFD}')) {
                    (Some(_), Some(offset)) => {
                        reported_bad = true;
                        b.problem(Problem::BadUtf8 {
                            at,
                            column: Some(column.clone()),
                            offset,
                        });
                        Cell::Bad
                    }
                    _ => Cell::Text(s),
                },
                Some(Value::Number(n)) if n.as_i64().is_some() => Cell::Int(n.as_i64().unwrap_or_default()),
                Some(Value::Null) => Cell::Null,
                Some(other) => {
                    b.problem(Problem::WrongType {
                        at: Some(at),
                        column: column.clone(),
                        found: json_type(&other),
                        expected: "a string or an integer",
                    });
                    Cell::Bad
                }
            };
            cells.push(cell);
        }
        if let (Some(offset), false) = (bad, reported_bad) {
            b.problem(Problem::BadUtf8 {
                at,
                column: None,
                offset,
            });
        }
        b.row(at, cells);
    }
}

/// CSV with a header line; quoted fields may span lines. An unreadable header is a format error.
fn csv_rows(bytes: &[u8], b: &mut Builder<'_>) -> Result<(), String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(bytes);
    let header = reader
        .byte_headers()
        .map_err(|e| format!("unreadable CSV header: {e}"))?
        .clone();
    let mut names = Vec::with_capacity(header.len());
    for (i, h) in header.iter().enumerate() {
        let name = std::str::from_utf8(h).map_err(|e| {
            format!(
                "invalid UTF-8 in the header's field {} at byte {}",
                i + 1,
                e.valid_up_to()
            )
        })?;
        names.push(name.to_owned());
    }
    let wanted = b.wanted();
    let mut index = Vec::with_capacity(wanted.len());
    for (column, role) in &wanted {
        let at = names.iter().position(|n| n == column);
        if at.is_none() {
            b.problem(Problem::MissingColumn {
                column: column.clone(),
                role,
                found: names.clone(),
            });
        }
        index.push(at);
    }
    let mut record = csv::ByteRecord::new();
    let mut row = 0;
    loop {
        let line_before = reader.position().line();
        let more = reader.read_byte_record(&mut record);
        row += 1;
        let line = record.position().map_or(line_before, csv::Position::line);
        let at = RowRef {
            format: Format::Csv,
            row,
            line: Some(line),
        };
        match more {
            Ok(false) => break,
            Ok(true) => {}
            Err(e) => {
                b.problem(Problem::BadCsv {
                    at,
                    reason: e.to_string(),
                });
                if matches!(e.kind(), csv::ErrorKind::Io(_)) {
                    break;
                }
                continue;
            }
        }
        if record.len() != names.len() {
            b.problem(Problem::Ragged {
                at,
                fields: record.len(),
                header: names.clone(),
            });
            continue;
        }
        let mut cells = Vec::with_capacity(wanted.len());
        for ((column, _), i) in wanted.iter().zip(&index) {
            let Some(i) = *i else {
                cells.push(Cell::Bad);
                continue;
            };
            let field = record.get(i).unwrap_or_default();
            cells.push(match std::str::from_utf8(field) {
                Ok(s) => Cell::Text(s.to_owned()),
                Err(e) => {
                    b.problem(Problem::BadUtf8 {
                        at,
                        column: Some(column.clone()),
                        offset: e.valid_up_to(),
                    });
                    Cell::Bad
                }
            });
        }
        b.row(at, cells);
    }
    Ok(())
}

/// What a Parquet column may hold for a role.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Bytes,
    Int,
}

/// Parquet: flat columns (no nesting); text as strings (or binary holding UTF-8), labels,
/// domains and tasks as strings or integers.
fn parquet_rows(bytes: Vec<u8>, path: &Path, b: &mut Builder<'_>) -> Result<(), TextError> {
    let unreadable = |e: parquet::errors::ParquetError| TextError::Format {
        path: path.into(),
        reason: format!("not a readable Parquet file: {e}{}", codec_hint(&e.to_string())),
    };
    let reader = SerializedFileReader::new(bytes::Bytes::from(bytes)).map_err(unreadable)?;
    let meta = reader.metadata();
    let schema = meta.file_metadata().schema_descr();
    let found: Vec<String> = schema
        .root_schema()
        .get_fields()
        .iter()
        .map(|f| f.name().to_owned())
        .collect();
    let n = usize::try_from(meta.file_metadata().num_rows()).unwrap_or(0);
    let wanted = b.wanted();
    // Per wanted column: its leaf index and kind, when usable.
    let mut plan: Vec<Option<(usize, Kind)>> = Vec::with_capacity(wanted.len());
    for (i, (column, role)) in wanted.iter().enumerate() {
        let leaf = (0..schema.num_columns()).find(|&c| {
            let d = schema.column(c);
            let parts = d.path().parts();
            parts.len() == 1 && parts[0] == *column
        });
        let expected = if i == 0 { "a string" } else { "a string or an integer" };
        let Some(leaf) = leaf else {
            if found.contains(column) {
                b.problem(Problem::WrongType {
                    at: None,
                    column: column.clone(),
                    found: "a nested type".into(),
                    expected,
                });
            } else {
                b.problem(Problem::MissingColumn {
                    column: column.clone(),
                    role,
                    found: found.clone(),
                });
            }
            plan.push(None);
            continue;
        };
        let d = schema.column(leaf);
        let is_text = matches!(
            d.logical_type_ref(),
            Some(LogicalType::String | LogicalType::Enum | LogicalType::Json)
        ) || matches!(
            d.converted_type(),
            ConvertedType::UTF8 | ConvertedType::ENUM | ConvertedType::JSON
        ) || (d.logical_type_ref().is_none() && d.converted_type() == ConvertedType::NONE);
        let kind = match d.physical_type() {
            PhysicalType::BYTE_ARRAY if is_text => Some(Kind::Bytes),
            PhysicalType::INT32 | PhysicalType::INT64
                if i > 0
                    && !matches!(
                        d.logical_type_ref(),
                        Some(
                            LogicalType::Decimal { .. }
                                | LogicalType::Date
                                | LogicalType::Time { .. }
                                | LogicalType::Timestamp { .. }
                        )
                    ) =>
            {
                Some(Kind::Int)
            }
            _ => None,
        };
        if d.max_rep_level() > 0 || kind.is_none() {
            let mut ty = d.physical_type().to_string();
            if let Some(l) = d.logical_type_ref() {
                ty = format!("{ty} ({l:?})");
            }
            if d.max_rep_level() > 0 {
                ty = format!("a repeated {ty}");
            }
            b.problem(Problem::WrongType {
                at: None,
                column: column.clone(),
                found: ty,
                expected,
            });
            plan.push(None);
        } else {
            plan.push(kind.map(|k| (leaf, k)));
        }
    }
    let mut columns: Vec<Vec<Cell>> = Vec::with_capacity(wanted.len());
    for ((column, _), p) in wanted.iter().zip(&plan) {
        let Some((leaf, _)) = *p else {
            columns.push(Vec::new());
            continue;
        };
        let mut cells = Vec::with_capacity(n);
        for g in 0..reader.num_row_groups() {
            let group = reader.get_row_group(g).map_err(unreadable)?;
            let col = group.get_column_reader(leaf).map_err(unreadable)?;
            let max_def = schema.column(leaf).max_def_level();
            read_column(col, max_def, &mut cells, column, b).map_err(|e| TextError::Format {
                path: path.into(),
                reason: format!(
                    "not a readable Parquet file: row group {g}, column `{column}`: {e}{}",
                    codec_hint(&e.to_string())
                ),
            })?;
        }
        if cells.len() != n {
            return Err(TextError::Format {
                path: path.into(),
                reason: format!(
                    "not a readable Parquet file: column `{column}` has {} values, the file {n} rows",
                    cells.len()
                ),
            });
        }
        columns.push(cells);
    }
    let mut iters: Vec<_> = columns.into_iter().map(Vec::into_iter).collect();
    for row in 0..n {
        let at = RowRef {
            format: Format::Parquet,
            row: row + 1,
            line: None,
        };
        let cells = iters.iter_mut().map(|it| it.next().unwrap_or(Cell::Bad)).collect();
        b.row(at, cells);
    }
    Ok(())
}

/// What to do about a compression codec this build leaves out.
fn codec_hint(error: &str) -> &'static str {
    if error.contains("Disabled feature") {
        " (this build reads uncompressed, snappy and lz4 Parquet; pyarrow and `datasets` write snappy by default)"
    } else {
        ""
    }
}

/// Appends one row group's values of a flat column as cells (rows numbered on from
/// `cells.len() + 1`).
fn read_column(
    col: ColumnReader,
    max_def: i16,
    cells: &mut Vec<Cell>,
    column: &str,
    b: &mut Builder<'_>,
) -> parquet::errors::Result<()> {
    match col {
        ColumnReader::ByteArrayColumnReader(mut r) => drain(&mut r, max_def, cells, |row, v: ByteArray| {
            match std::str::from_utf8(v.data()) {
                Ok(s) => Cell::Text(s.to_owned()),
                Err(e) => {
                    b.problem(Problem::BadUtf8 {
                        at: RowRef {
                            format: Format::Parquet,
                            row,
                            line: None,
                        },
                        column: Some(column.to_owned()),
                        offset: e.valid_up_to(),
                    });
                    Cell::Bad
                }
            }
        }),
        ColumnReader::Int32ColumnReader(mut r) => drain(&mut r, max_def, cells, |_, v| Cell::Int(i64::from(v))),
        ColumnReader::Int64ColumnReader(mut r) => drain(&mut r, max_def, cells, |_, v| Cell::Int(v)),
        _ => Err(parquet::errors::ParquetError::General("unexpected column type".into())),
    }
}

/// Reads a whole column chunk, spreading its values over the rows its definition levels say
/// are present (the others are null).
fn drain<T: DataType>(
    r: &mut ColumnReaderImpl<T>,
    max_def: i16,
    cells: &mut Vec<Cell>,
    mut convert: impl FnMut(usize, T::T) -> Cell,
) -> parquet::errors::Result<()> {
    const CHUNK: usize = 4096;
    let mut defs: Vec<i16> = Vec::new();
    let mut values: Vec<T::T> = Vec::new();
    loop {
        defs.clear();
        values.clear();
        let def_buf = if max_def > 0 { Some(&mut defs) } else { None };
        let (records, _, _) = r.read_records(CHUNK, def_buf, None, &mut values)?;
        if records == 0 {
            return Ok(());
        }
        let mut vals = values.drain(..);
        for i in 0..records {
            let row = cells.len() + 1;
            if max_def > 0 && defs.get(i) != Some(&max_def) {
                cells.push(Cell::Null);
                continue;
            }
            let v = vals
                .next()
                .ok_or_else(|| parquet::errors::ParquetError::General("fewer values than rows".into()))?;
            cells.push(convert(row, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows `tests/data/text/make_fixtures.py` writes to `rows.parquet`.
    const ROWS: [(&str, &str, &str, i64); 4] = [
        ("A fine film.", "pos", "a", 7),
        ("Dull, \"slow\" and long", "neg", "b", 7),
        ("Café crème, 東京\nsecond line", "pos", "a", 8),
        ("ok", "neg", "c", 9),
    ];

    fn fixture(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/text")
            .join(name)
    }

    fn options() -> SourceOptions {
        let mut o = SourceOptions::new(&["neg", "pos"]);
        o.columns.domain = Some("movie".into());
        o.columns.task = Some("task".into());
        o
    }

    fn write(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.path().join(name);
        std::fs::write(&p, bytes).expect("write");
        p
    }

    fn message(path: &Path, o: &SourceOptions) -> String {
        read_source(path, o).expect_err("should fail").to_string()
    }

    #[test]
    fn every_format_reads_the_same_rows_the_same_way() {
        let dir = tempfile::tempdir().expect("tmp");
        let jsonl: String = ROWS
            .iter()
            .map(|(t, l, m, k)| {
                format!(
                    "{}\n",
                    serde_json::json!({"text": t, "label": l, "movie": m, "task": k})
                )
            })
            .collect();
        // A BOM, CRLF line ends and a blank line, which exports may have.
        let jsonl = format!("\u{FEFF}{}\r\n", jsonl.replace('\n', "\r\n"));
        let j = write(&dir, "rows.jsonl", jsonl.as_bytes());
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["label", "text", "task", "movie"]).expect("csv");
        for (t, l, m, k) in ROWS {
            w.write_record([l, t, &k.to_string(), m]).expect("csv");
        }
        let c = write(&dir, "rows.CSV", &w.into_inner().expect("csv"));
        let want = TextRows {
            texts: ROWS.iter().map(|r| r.0.to_owned()).collect(),
            labels: vec![1, 0, 1, 0],
            domains: Some(Categorical {
                names: vec!["a".into(), "b".into(), "c".into()],
                ids: vec![0, 1, 0, 2],
            }),
            tasks: Some(Categorical {
                names: vec!["7".into(), "8".into(), "9".into()],
                ids: vec![0, 0, 1, 2],
            }),
        };
        for p in [j, c, fixture("rows.parquet")] {
            assert_eq!(read_source(&p, &options()).expect("reads"), want, "{}", p.display());
        }
        // Integer labels (a `datasets` ClassLabel) through a map of their decimal text.
        let mut o = SourceOptions::new(&["0", "1"]);
        o.columns.text = "sentence".into();
        o.columns.label = "y".into();
        let ints = read_source(&fixture("ints.parquet"), &o).expect("ints");
        assert_eq!((ints.labels, &ints.texts[3][..]), (vec![1, 0, 1, 0], "ok"));
        let j = write(&dir, "ints.jsonl", b"{\"sentence\": \"ok\", \"y\": 1}\n");
        assert_eq!(read_source(&j, &o).expect("int json").labels, [1]);
    }

    #[test]
    fn jsonl_problems_name_the_file_row_and_column_all_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut bytes = Vec::new();
        for line in [
            &br#"{"text": "good", "label": "pos"}"#[..],
            br#"{"text": "  ", "label": "pos"}"#,
            br#"{"text": "x", "label": "maybe"}"#,
            br#"{"text": "x", "label": 1.5}"#,
            br#"{"text": "x" "label": "pos"}"#,
            b"",
            b"{\"text\": \"bad \xff\", \"label\": \"neg\"}",
            br#"{"label": "neg"}"#,
            br#"[1, 2]"#,
            br#"{"text": "x", "label": null}"#,
        ] {
            bytes.extend_from_slice(line);
            bytes.push(b'\n');
        }
        let p = write(&dir, "bad.jsonl", &bytes);
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        let rows: Vec<usize> = m
            .match_indices("  - row ")
            .map(|(i, _)| m[i + 8..].split(' ').next().and_then(|r| r.parse().ok()).unwrap_or(0))
            .collect();
        assert_eq!(rows, [2, 3, 4, 5, 6, 7, 8, 9], "in row order:\n{m}");
        let expect = [
            "data file ",
            "bad.jsonl has 8 problems:",
            "row 2 (line 2), column `text`: the text is empty or only whitespace",
            "row 3 (line 3), column `label`: label \"maybe\" is not in the label map [\"neg\", \"pos\"]",
            "row 4 (line 4), column `label`: the number 1.5, expected a string or an integer",
            "row 5 (line 5), character 14: malformed JSON: expected `,` or `}`",
            "row 6 (line 7), column `text`: invalid UTF-8 at byte offset 4 of the value",
            "row 7 (line 8): no column `text`; the row has: `label`",
            "row 8 (line 9), character 1: malformed JSON: an array, expected an object",
            "row 9 (line 10), column `label`: null",
        ];
        for e in expect {
            assert!(m.contains(e), "missing {e:?} in:\n{m}");
        }
        let p = write(
            &dir,
            "other.jsonl",
            b"{\"text\": \"x\", \"label\": \"pos\", \"note\": \"\xc3\"}\n",
        );
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        assert!(
            m.contains("row 1 (line 1): invalid UTF-8 at byte offset 39 of the line (in a column not read)"),
            "{m}"
        );
        let p = write(&dir, "cols.jsonl", b"{\"sentence\": \"x\", \"label\": \"pos\"}\n");
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        assert!(
            m.contains("cols.jsonl has 1 problem:")
                && m.contains("no column `text` (the text column); the file has: `label`, `sentence`"),
            "{m}"
        );
        // More than MAX_PROBLEMS: the first are listed, the rest counted.
        let many: String = (0..30).map(|_| "{\"text\": \"x\", \"label\": \"huh\"}\n").collect();
        let p = write(&dir, "many.jsonl", many.as_bytes());
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        assert!(
            m.contains("has 30 problems:") && m.contains("row 20 (line 20)") && !m.contains("row 21"),
            "{m}"
        );
        assert!(m.ends_with("... and 10 more"), "{m}");
        let p = write(&dir, "empty.jsonl", b"\n\n");
        assert!(message(&p, &options()).contains("holds no rows"));
    }

    #[test]
    fn csv_problems_name_the_row_without_the_header_and_the_line() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(
            &dir,
            "bad.csv",
            b"text,label\ngood,pos\n\"  \",pos\nx\nx,pos,extra\n\"two\nlines \xff\",neg\nx,maybe\n",
        );
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        let expect = [
            "bad.csv has 5 problems:",
            "row 2 (not counting the header; line 3 of the file), column `text`: the text is empty",
            "row 3 (not counting the header; line 4 of the file): 1 fields where the header has 2; no value for column(s) `label`",
            "row 4 (not counting the header; line 5 of the file): 3 fields where the header has 2 (`text`, `label`)",
            "row 5 (not counting the header; line 6 of the file), column `text`: invalid UTF-8 at byte offset 10 of the value",
            "row 6 (not counting the header; line 8 of the file), column `label`: label \"maybe\" is not in the label map",
        ];
        for e in expect {
            assert!(m.contains(e), "missing {e:?} in:\n{m}");
        }
        let p = write(&dir, "cols.csv", b"text,y\nx,pos\n");
        let m = message(&p, &SourceOptions::new(&["neg", "pos"]));
        assert!(
            m.contains("no column `label` (the label column); the file has: `text`, `y`"),
            "{m}"
        );
    }

    #[test]
    fn parquet_problems_name_the_row_and_column_and_bad_files_the_file() {
        let mut o = SourceOptions::new(&["neg", "pos"]);
        o.columns.domain = Some("movie".into());
        let m = message(&fixture("bad.parquet"), &o);
        let expect = [
            "bad.parquet has 6 problems:",
            "column `movie` has type DOUBLE, expected a string or an integer",
            "row 2, column `text`: invalid UTF-8 at byte offset 4 of the value",
            "row 3, column `text`: the text is empty or only whitespace",
            "row 4, column `text`: null",
            "row 4, column `label`: label \"maybe\" is not in the label map [\"neg\", \"pos\"]",
            "row 5, column `label`: null",
        ];
        for e in expect {
            assert!(m.contains(e), "missing {e:?} in:\n{m}");
        }
        o.columns.domain = Some("nope".into());
        let m = message(&fixture("rows.parquet"), &o);
        assert!(
            m.contains("no column `nope` (the domain column); the file has: `text`, `label`, `movie`, `task`"),
            "{m}"
        );
        o.columns.domain = None;
        o.columns.text = "task".into();
        let m = message(&fixture("rows.parquet"), &o);
        assert!(m.contains("column `task` has type INT64"), "{m}");
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(&dir, "junk.parquet", b"PAR1 not really PAR1");
        let m = message(&p, &o);
        assert!(
            m.contains("junk.parquet") && m.contains("not a readable Parquet file"),
            "{m}"
        );
        let o = SourceOptions::new(&["neg", "pos"]);
        assert_eq!(
            read_source(&fixture("lz4.parquet"), &o).expect("lz4").texts,
            ["lz4 text"]
        );
        let m = message(&fixture("zstd.parquet"), &o);
        assert!(
            m.contains("zstd.parquet: not a readable Parquet file")
                && m.contains("zstd")
                && m.contains("snappy and lz4"),
            "{m}"
        );
        let good = std::fs::read(fixture("rows.parquet")).expect("fixture");
        let p = write(&dir, "cut.parquet", &good[..good.len() / 2]);
        assert!(message(&p, &o).contains("cut.parquet: not a readable Parquet file"));
    }

    #[test]
    fn bad_paths_and_label_maps_are_named() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = write(&dir, "rows.tsv", b"x");
        assert!(message(&p, &options()).contains("rows.tsv: unknown format"));
        assert!(message(&dir.path().join("gone.jsonl"), &options()).contains("gone.jsonl"));
        let p = write(&dir, "ok.jsonl", b"{\"text\": \"x\", \"label\": \"a\"}\n");
        assert!(message(&p, &SourceOptions::new(&[])).contains("label map: it is empty"));
        assert!(message(&p, &SourceOptions::new(&["a", "b", "a"])).contains("label `a` appears twice"));
    }
}
