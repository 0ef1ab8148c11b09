//! The monitoring files under `k8s/base/monitoring/`: the Grafana dashboard and the Prometheus
//! alert rules may name only metrics the program exports (`metaloop_common::metrics::ALL`), with
//! labels those metrics have; the rules pass `promtool check rules` and their unit tests
//! (`scripts/check-monitoring`); the dashboard shows what docs/algorithms.md §7 asks for.
//!
//! PromQL is checked by a small tokenizer, not a full parser: strings, `[...]` ranges, Grafana
//! variables (`$x`, `${x}`), numbers and durations are skipped; every other identifier must be a
//! PromQL keyword, a function or aggregation followed by its `(` (or `by`/`without`), a label
//! name where PromQL expects one (`{...}` matchers, `by/without/on/ignoring/group_left/
//! group_right (...)`, the second argument of Grafana's `label_values`), or an exported metric.
//! Histograms are exported as `_bucket`, `_sum` and `_count` series only.

use metaloop_common::metrics::{self, Kind, Metric};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn monitoring(file: &str) -> PathBuf {
    root().join("k8s/base/monitoring").join(file)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

// ------------------------------------------------------------------------------------------
// The checker.

/// Labels Prometheus adds to every series it scrapes (the Kubernetes service discovery of the
/// Prometheus Operator included), besides those the program sets.
const TARGET_LABELS: &str = "job instance namespace pod container service endpoint";

/// PromQL functions (`name(`).
const FUNCTIONS: &str = "abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes \
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year days_in_month deg delta \
    deriv exp floor histogram_avg histogram_count histogram_fraction histogram_quantile histogram_stddev \
    histogram_stdvar histogram_sum holt_winters double_exponential_smoothing hour idelta increase irate label_join \
    label_replace last_over_time ln log10 log2 mad_over_time max_over_time min_over_time minute month pi \
    predict_linear present_over_time quantile_over_time rad rate resets round scalar sgn sin sinh sort \
    sort_by_label sort_by_label_desc sort_desc sqrt stddev_over_time stdvar_over_time sum_over_time tan tanh time \
    timestamp vector year";

/// Aggregation operators (`name(` or `name by (...) (`).
const AGGREGATIONS: &str =
    "sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio";

/// Grafana's Prometheus template-variable functions (only in variable queries).
const GRAFANA_FUNCTIONS: &str = "label_values label_names metrics query_result";

/// Keywords: those before a parenthesised list of label names, and the others.
const LABEL_LIST_KEYWORDS: &str = "by without on ignoring group_left group_right";
const OTHER_KEYWORDS: &str = "and or unless bool offset atan2 inf nan";

/// Whether `word` is one of the space-separated words of `list`.
fn listed(list: &str, word: &str) -> bool {
    list.split_whitespace().any(|w| w == word)
}

fn find_metric(name: &str) -> Option<&'static Metric> {
    metrics::ALL.iter().find(|m| m.name == name)
}

/// The exported metric a series name belongs to, and whether the series has an `le` label;
/// or why the name is not one the program exports.
fn exported(series: &str) -> Result<(&'static Metric, bool), String> {
    if let Some(m) = find_metric(series) {
        return if m.kind == Kind::Histogram {
            Err(format!(
                "`{series}` is a histogram: it is exported only as {series}_bucket, _sum and _count"
            ))
        } else {
            Ok((m, false))
        };
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(m) = series.strip_suffix(suffix).and_then(find_metric) {
            if m.kind == Kind::Histogram {
                return Ok((m, suffix == "_bucket"));
            }
        }
    }
    Err(format!(
        "`{series}` is not a metric the program exports (common/src/metrics.rs)"
    ))
}

fn any_label(label: &str) -> bool {
    label == "le" || listed(TARGET_LABELS, label) || metrics::ALL.iter().any(|m| m.labels.contains(&label))
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// Index just past the string literal starting at `i` (quote at `i`).
fn skip_string(s: &[char], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() && s[j] != quote {
        if s[j] == '\\' && quote != '`' {
            j += 1;
        }
        j += 1;
    }
    j + 1
}

/// Index of the next non-space character at or after `i`.
fn skip_space(s: &[char], mut i: usize) -> usize {
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    i
}

#[derive(Clone, Copy, PartialEq)]
enum Paren {
    Normal,
    /// `by (...)` and the like: label names.
    Labels,
    /// Grafana's `label_values(selector, label)`; true after the comma.
    LabelValues(bool),
}

/// What one PromQL expression names: the exported metrics (by their `Metric::name`) and
/// everything wrong with it.
#[derive(Default, Debug)]
struct Scan {
    metrics: BTreeSet<&'static str>,
    problems: Vec<String>,
}

/// Scans `expr`; `grafana` allows Grafana's variable functions.
fn scan(expr: &str, grafana: bool) -> Scan {
    let s: Vec<char> = expr.chars().collect();
    let mut out = Scan::default();
    let mut parens: Vec<Paren> = Vec::new();
    // The previous identifier, if it was the token just before.
    let mut prev_ident: Option<String> = None;
    // The metric named just before, for a `{...}` right after it.
    let mut prev_metric: Option<(&'static Metric, bool)> = None;
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        let mut ident_token: Option<String> = None;
        let mut metric_token: Option<(&'static Metric, bool)> = None;
        if c.is_whitespace() {
            i += 1;
            continue;
        } else if c == '#' {
            while i < s.len() && s[i] != '\n' {
                i += 1;
            }
            continue;
        } else if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&s, i);
        } else if c == '$' {
            // Grafana variable: ${name...} or $name.
            i += 1;
            if i < s.len() && s[i] == '{' {
                while i < s.len() && s[i] != '}' {
                    i += 1;
                }
                i += 1;
            } else {
                while i < s.len() && is_ident_char(s[i]) {
                    i += 1;
                }
            }
        } else if c == '[' {
            // A range or subquery: durations and variables only.
            while i < s.len() && s[i] != ']' {
                i += 1;
            }
            i += 1;
        } else if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // A number or a duration (1e-3, 0x1f, 5m, 1h30m).
            while i < s.len()
                && (s[i].is_ascii_alphanumeric()
                    || s[i] == '.'
                    || ((s[i] == '-' || s[i] == '+') && matches!(s[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c == '{' {
            // Label matchers, of the metric just before if any.
            let start = i;
            i += 1;
            while i < s.len() && s[i] != '}' {
                if s[i] == '"' || s[i] == '\'' || s[i] == '`' {
                    i = skip_string(&s, i);
                } else if is_ident_start(s[i]) {
                    let b = i;
                    while i < s.len() && is_ident_char(s[i]) {
                        i += 1;
                    }
                    let label: String = s[b..i].iter().collect();
                    if let Some((m, bucket)) = prev_metric {
                        let own = m.labels.contains(&label.as_str())
                            || listed(TARGET_LABELS, &label)
                            || (bucket && label == "le");
                        if !own {
                            out.problems.push(format!("`{}` has no label `{label}`", m.name));
                        }
                    } else if label != "__name__" && !any_label(&label) {
                        out.problems.push(format!("unknown label `{label}`"));
                    }
                } else {
                    i += 1;
                }
            }
            if i >= s.len() {
                out.problems.push(format!("unclosed `{{` at {start}"));
            }
            i += 1;
        } else if c == '(' {
            let kind = match prev_ident.as_deref() {
                Some(k) if listed(LABEL_LIST_KEYWORDS, k) => Paren::Labels,
                Some("label_values") if grafana => Paren::LabelValues(false),
                _ => Paren::Normal,
            };
            parens.push(kind);
            i += 1;
        } else if c == ')' {
            if parens.pop().is_none() {
                out.problems.push("unbalanced `)`".to_string());
            }
            i += 1;
        } else if c == ',' {
            if let Some(Paren::LabelValues(after)) = parens.last_mut() {
                *after = true;
            }
            i += 1;
        } else if is_ident_start(c) {
            let b = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let word: String = s[b..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let next = s.get(skip_space(&s, i)).copied();
            let next_word: String = {
                let j = skip_space(&s, i);
                s[j..].iter().take_while(|c| is_ident_char(**c)).collect()
            };
            match parens.last() {
                Some(Paren::Labels) | Some(Paren::LabelValues(true)) => {
                    if !any_label(&word) {
                        out.problems.push(format!("unknown label `{word}`"));
                    }
                }
                _ if listed(LABEL_LIST_KEYWORDS, &lower) || listed(OTHER_KEYWORDS, &lower) => {}
                _ if listed(FUNCTIONS, &word) || (grafana && listed(GRAFANA_FUNCTIONS, &word)) => {
                    if next != Some('(') {
                        out.problems
                            .push(format!("`{word}` is a function but has no `(` after it"));
                    }
                }
                _ if listed(AGGREGATIONS, &word) => {
                    if next != Some('(') && next_word != "by" && next_word != "without" {
                        out.problems
                            .push(format!("`{word}` is an aggregation but has no `(` after it"));
                    }
                }
                _ if word.starts_with("metaloop_") => match exported(&word) {
                    Ok(found) => {
                        out.metrics.insert(found.0.name);
                        metric_token = Some(found);
                    }
                    Err(e) => out.problems.push(e),
                },
                _ => out.problems.push(format!(
                    "`{word}` is neither a PromQL keyword, function nor label, nor a metric the program exports"
                )),
            }
            ident_token = Some(word);
        } else {
            // Operators and the like.
            i += 1;
        }
        prev_ident = ident_token;
        prev_metric = metric_token;
    }
    if !parens.is_empty() {
        out.problems.push("unbalanced `(`".to_string());
    }
    out
}

/// Every `metaloop_...` word in a file (help texts and descriptions included) must be exported.
fn words_named(text: &str) -> Vec<String> {
    let s: Vec<char> = text.chars().collect();
    let mut words = Vec::new();
    let mut i = 0;
    while i < s.len() {
        if is_ident_start(s[i]) && (i == 0 || !is_ident_char(s[i - 1])) {
            let b = i;
            while i < s.len() && is_ident_char(s[i]) {
                i += 1;
            }
            let w: String = s[b..i].iter().collect();
            if w.starts_with("metaloop_") {
                words.push(w);
            }
        } else {
            i += 1;
        }
    }
    words
}

// ------------------------------------------------------------------------------------------
// The files.

/// Every panel of the dashboard, rows' nested panels included.
fn all_panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(panels: &'a Value, out: &mut Vec<&'a Value>) {
        for p in panels.as_array().into_iter().flatten() {
            out.push(p);
            if let Some(nested) = p.get("panels") {
                walk(nested, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

/// (where, expression, is a template query) for every PromQL expression of the dashboard.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String, bool)> {
    let mut out = Vec::new();
    for p in all_panels(dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("panel `{title}`: a target without expr"));
            out.push((
                format!("panel `{title}` target {}", t["refId"]),
                expr.to_string(),
                false,
            ));
        }
    }
    for v in dashboard["templating"]["list"].as_array().expect("templating.list") {
        if v["type"] != "query" {
            continue;
        }
        let name = v["name"].as_str().unwrap_or("?");
        let query = match &v["query"] {
            Value::String(q) => q.clone(),
            q => q["query"]
                .as_str()
                .unwrap_or_else(|| panic!("variable `{name}`: no query"))
                .to_string(),
        };
        out.push((format!("variable `{name}`"), query, true));
        if let Some(d) = v["definition"].as_str() {
            out.push((format!("variable `{name}` (definition)"), d.to_string(), true));
        }
    }
    out
}

/// (alert, expression) for every rule of a promtool rule file, read by hand: `expr:` with an
/// inline value or a block scalar (`|`, `>`) whose lines are indented deeper than the key.
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let lines: Vec<&str> = yaml.lines().collect();
    let mut out = Vec::new();
    let mut name = String::from("?");
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let body = line.trim_start();
        let indent = line.len() - body.len();
        let body = body.strip_prefix("- ").unwrap_or(body);
        if let Some(v) = body.strip_prefix("alert:").or_else(|| body.strip_prefix("record:")) {
            name = v.trim().to_string();
        }
        if let Some(v) = body.strip_prefix("expr:") {
            let v = v.trim();
            if v.starts_with('|') || v.starts_with('>') {
                let mut expr = String::new();
                i += 1;
                while i < lines.len() {
                    let l = lines[i];
                    let deeper = l.len() - l.trim_start().len() > indent;
                    if !l.trim().is_empty() && !deeper {
                        break;
                    }
                    expr.push_str(l.trim());
                    expr.push('\n');
                    i += 1;
                }
                out.push((name.clone(), expr));
                continue;
            }
            let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
            let v = v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')).unwrap_or(v);
            out.push((name.clone(), v.to_string()));
        }
        i += 1;
    }
    out
}

fn report(problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ------------------------------------------------------------------------------------------
// Tests.

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    let script = root().join("scripts/check-monitoring");
    let out = Command::new(&script)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "scripts/check-monitoring failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_checker_catches_wrong_names() {
    let ok = scan(
        r#"histogram_quantile(0.9, sum by (le) (rate(metaloop_round_duration_seconds_bucket{namespace=~"$namespace", job=~"${job}"}[$__rate_interval])))
           / on (job) group_left sum without (reason) (increase(metaloop_workers_lost_total{reason="timeout"}[5m] offset 1h))
           or time() - metaloop_checkpoint_last_success_timestamp_seconds > 3.6e+3 unless metaloop_domain_weight{domain!=""} < bool 0"#,
        false,
    );
    assert!(ok.problems.is_empty(), "{:?}", ok.problems);
    assert_eq!(ok.metrics.len(), 4, "{:?}", ok.metrics);
    let vars = scan(r#"label_values(metaloop_job_info{namespace=~"$namespace"}, job)"#, true);
    assert!(vars.problems.is_empty(), "{:?}", vars.problems);

    for (bad, why) in [
        ("rate(metaloop_no_such_thing_total[5m])", "not a metric"),
        ("metaloop_round_duration_seconds", "histogram"),
        ("metaloop_domain_weight_bucket", "not a metric"),
        ("rate(metaloop_samples_total_bucket[5m])", "not a metric"),
        ("sum(rate(node_network_receive_bytes_total[5m]))", "neither"),
        ("up == 0", "neither"),
        (r#"metaloop_domain_weight{source="x"}"#, "no label `source`"),
        ("metaloop_round_duration_seconds_sum{le=\"1\"}", "no label `le`"),
        (
            "sum by (worker) (metaloop_samples_per_second)",
            "unknown label `worker`",
        ),
        ("rate + metaloop_train_loss", "no `(`"),
        (r#"label_values(metaloop_job_info, worker_id)"#, "unknown label"),
    ] {
        let got = scan(bad, true);
        assert!(
            got.problems.iter().any(|p| p.contains(why)),
            "`{bad}` should be refused ({why}); problems: {:?}",
            got.problems
        );
    }
}

#[test]
fn dashboard_names_only_exported_metrics() {
    let path = monitoring("dashboard.json");
    let text = read(&path);
    let dashboard: Value = serde_json::from_str(&text).expect("dashboard.json is JSON");
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() > 20, "only {} expressions", exprs.len());
    let mut problems = Vec::new();
    for (at, expr, grafana) in &exprs {
        if expr.trim().is_empty() {
            problems.push(format!("{at}: empty expression"));
        }
        for p in scan(expr, *grafana).problems {
            problems.push(format!("{at}: {p}\n    in: {expr}"));
        }
    }
    for w in words_named(&text) {
        if let Err(e) = exported(&w) {
            problems.push(format!("dashboard.json text: {e}"));
        }
    }
    report(&problems);
}

#[test]
fn dashboard_is_well_formed() {
    let dashboard: Value = serde_json::from_str(&read(&monitoring("dashboard.json"))).expect("JSON");
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion"
    );
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()), "uid");
    let vars = dashboard["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "a `datasource` variable of type prometheus"
    );
    let mut ids = BTreeSet::new();
    let mut problems = Vec::new();
    for p in all_panels(&dashboard) {
        let title = p["title"].as_str().unwrap_or("?");
        if !ids.insert(p["id"].as_u64().unwrap_or(0)) {
            problems.push(format!("panel `{title}`: id {} twice or missing", p["id"]));
        }
        for k in ["h", "w", "x", "y"] {
            if p["gridPos"][k].as_u64().is_none() {
                problems.push(format!("panel `{title}`: gridPos.{k}"));
            }
        }
        if p["type"] == "row" {
            continue;
        }
        // Every query goes to the chosen data source, never to a hard-wired one.
        let mut refs = vec![&p["datasource"]];
        refs.extend(p["targets"].as_array().into_iter().flatten().map(|t| &t["datasource"]));
        for d in refs {
            if d["uid"] != "${datasource}" {
                problems.push(format!("panel `{title}`: datasource {d} is not ${{datasource}}"));
            }
        }
        if p["targets"].as_array().is_none_or(|t| t.is_empty()) {
            problems.push(format!("panel `{title}`: no targets"));
        }
    }
    report(&problems);
}

#[test]
fn dashboard_covers_what_a_user_needs() {
    let dashboard: Value = serde_json::from_str(&read(&monitoring("dashboard.json"))).expect("JSON");
    let mut shown = BTreeSet::new();
    for (_, expr, grafana) in dashboard_exprs(&dashboard) {
        if !grafana {
            shown.extend(scan(&expr, false).metrics);
        }
    }
    // docs/algorithms.md §7: what a user needs to see.
    let topics: &[(&str, &[&str])] = &[
        ("domain weights", &[metrics::DOMAIN_WEIGHT]),
        ("task-policy weights", &[metrics::SOURCE_WEIGHT]),
        ("weight entropy", &[metrics::WEIGHT_ENTROPY]),
        ("losses", &[metrics::TRAIN_LOSS, metrics::META_LOSS, metrics::TEST_LOSS]),
        ("round duration", &[metrics::ROUND_DURATION]),
        ("samples", &[metrics::SAMPLES, metrics::SAMPLES_PER_SECOND]),
        ("workers connected", &[metrics::WORKERS_CONNECTED]),
        ("reassigned", &[metrics::REASSIGNED]),
        ("rejected", &[metrics::REJECTED]),
        ("bytes", &[metrics::RECEIVE_BYTES, metrics::TRANSMIT_BYTES]),
        ("hypergradient norm", &[metrics::HYPERGRADIENT_NORM]),
        ("rescaler weight distribution", &[metrics::RESCALER_SAMPLE_WEIGHT]),
        ("checkpoint age", &[metrics::CHECKPOINT_TIMESTAMP]),
    ];
    for (topic, names) in topics {
        assert!(
            names.iter().any(|n| shown.contains(n)),
            "no dashboard panel shows {topic} ({names:?})"
        );
    }
    // And nothing exported goes unseen.
    let unseen: Vec<_> = metrics::ALL
        .iter()
        .map(|m| m.name)
        .filter(|n| !shown.contains(n))
        .collect();
    assert!(unseen.is_empty(), "exported but on no dashboard panel: {unseen:?}");
}

#[test]
fn alert_rules_name_only_exported_metrics() {
    let text = read(&monitoring("alerts.yml"));
    let rules = rule_exprs(&text);
    let mut problems = Vec::new();
    for (alert, expr) in &rules {
        let got = scan(expr, false);
        if got.metrics.is_empty() {
            problems.push(format!("{alert}: names no metric\n    in: {expr}"));
        }
        for p in got.problems {
            problems.push(format!("{alert}: {p}\n    in: {expr}"));
        }
    }
    for w in words_named(&text) {
        if let Err(e) = exported(&w) {
            problems.push(format!("alerts.yml text: {e}"));
        }
    }
    report(&problems);
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for required in [
        "MetaloopWorkersLost",
        "MetaloopRoundStalled",
        "MetaloopWeightsCollapsed",
        "MetaloopCheckpointTooOld",
        "MetaloopCheckpointFailing",
    ] {
        assert!(names.contains(required), "alerts.yml has no {required}: {names:?}");
    }
}

#[test]
fn alert_unit_tests_feed_only_exported_series() {
    let text = read(&monitoring("alerts_test.yml"));
    let mut problems = Vec::new();
    let mut series = 0;
    for line in text.lines() {
        let Some(v) = line.trim_start().trim_start_matches("- ").strip_prefix("series:") else {
            continue;
        };
        series += 1;
        let v = v.trim().trim_matches(|c| c == '\'' || c == '"');
        for p in scan(v, false).problems {
            problems.push(format!("series {v}: {p}"));
        }
    }
    assert!(series > 0, "no input series in alerts_test.yml");
    for w in words_named(&text) {
        if let Err(e) = exported(&w) {
            problems.push(format!("alerts_test.yml text: {e}"));
        }
    }
    report(&problems);
}
