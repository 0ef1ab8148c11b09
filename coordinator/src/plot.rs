//! `plot.svg` in the run directory: every domain weight (or the task policy's source weights)
//! and the losses per round, as a picture a person would rather look at than the JSON lines.
//! Plain SVG text, no dependencies.

use crate::rundir::RoundRecord;
use std::fmt::Write;

const W: f64 = 900.0;
const PANEL_H: f64 = 260.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const GAP: f64 = 60.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

struct Series {
    name: String,
    points: Vec<(f64, f64)>,
}

/// Renders the run so far: weights (top panel, when there is more than one domain or a task
/// policy) and losses.
pub fn render(records: &[RoundRecord]) -> String {
    let policy = records.first().is_some_and(|r| r.source_weights.is_some());
    let of = |r: &RoundRecord| -> Option<std::collections::BTreeMap<String, f64>> {
        if policy {
            r.source_weights.clone()
        } else {
            Some(r.domain_weights.clone())
        }
    };
    let mut weights: Vec<Series> = Vec::new();
    if let Some(first) = records.first().and_then(of) {
        if first.len() > 1 {
            for name in first.keys() {
                let points = records
                    .iter()
                    .filter_map(|r| of(r).and_then(|w| w.get(name).map(|w| (r.round as f64, *w))))
                    .collect();
                weights.push(Series {
                    name: name.clone(),
                    points,
                });
            }
        }
    }
    let pick = |name: &str, f: &dyn Fn(&RoundRecord) -> Option<f64>| Series {
        name: name.into(),
        points: records
            .iter()
            .filter_map(|r| f(r).filter(|v| v.is_finite()).map(|v| (r.round as f64, v)))
            .collect(),
    };
    let losses: Vec<Series> = vec![
        pick("train loss", &|r| Some(r.train_loss)),
        pick("meta loss", &|r| r.meta_loss),
        pick("test loss", &|r| r.test_loss),
        pick("test accuracy", &|r| r.test_accuracy),
    ]
    .into_iter()
    .filter(|s| !s.points.is_empty())
    .collect();
    let panels: Vec<(&str, &[Series])> = [
        (
            if policy {
                "source-task policy w_t"
            } else {
                "domain weights"
            },
            weights.as_slice(),
        ),
        ("losses and accuracy", losses.as_slice()),
    ]
    .into_iter()
    .filter(|(_, s)| !s.is_empty())
    .collect();
    let height = TOP + panels.len() as f64 * (PANEL_H + GAP);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, (title, series)) in panels.iter().enumerate() {
        panel(&mut svg, title, series, TOP + i as f64 * (PANEL_H + GAP));
    }
    svg.push_str("</svg>\n");
    svg
}

fn panel(svg: &mut String, title: &str, series: &[Series], top: f64) {
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, 0.0f64, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    y1 *= 1.05;
    let plot_w = W - LEFT - RIGHT;
    let sx = |x: f64| LEFT + (x - x0) / (x1 - x0) * plot_w;
    let sy = |y: f64| top + PANEL_H - (y - y0) / (y1 - y0) * PANEL_H;
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">{title}</text>"#,
        top - 8.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
    );
    for t in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(t) / 4.0;
        let py = sy(y);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" x2="{}" y1="{py:.1}" y2="{py:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end">{y:.2}</text>"##,
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        );
        let x = x0 + (x1 - x0) * f64::from(t) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.0}</text>"#,
            sx(x),
            top + PANEL_H + 16.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">round</text>"#,
        LEFT + plot_w / 2.0,
        top + PANEL_H + 32.0
    );
    for (i, s) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
            .collect();
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="1.8" points="{}"/>"#,
            path.join(" ")
        );
        let ly = top + 14.0 + i as f64 * 18.0;
        let last = s.points.last().map_or(String::new(), |p| format!(" ({:.2})", p.1));
        let _ = writeln!(
            svg,
            r#"<line x1="{}" x2="{}" y1="{ly}" y2="{ly}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}{last}</text>"#,
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
}

/// `weights.svg`: histograms of Ω's weights (20 bins over 0..1) for clean and for corrupted
/// training samples, as fractions of each group, so a user sees at a glance whether Ω tells
/// them apart.
pub fn histogram(clean: &[f64], corrupted: &[f64]) -> String {
    const BINS: usize = 20;
    let hist = |v: &[f64]| {
        let mut h = [0.0f64; BINS];
        for &w in v {
            h[((w.clamp(0.0, 1.0) * BINS as f64) as usize).min(BINS - 1)] += 1.0;
        }
        let n = v.len().max(1) as f64;
        h.map(|c| c / n)
    };
    let groups = [
        ("clean", hist(clean), COLOURS[0], clean.len()),
        ("corrupted", hist(corrupted), COLOURS[1], corrupted.len()),
    ];
    let top = groups.iter().flat_map(|g| g.1).fold(0.0f64, f64::max).max(1e-9) * 1.05;
    let plot_w = W - LEFT - RIGHT;
    let sx = |x: f64| LEFT + x * plot_w;
    let sy = |y: f64| TOP + PANEL_H - y / top * PANEL_H;
    let mut svg = String::new();
    let height = TOP + PANEL_H + GAP;
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        svg,
        r#"<text x="{LEFT}" y="{}" font-size="14" font-weight="bold">loss weights given by the rescaler</text>"#,
        TOP - 8.0
    );
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PANEL_H}" fill="none" stroke="#999"/>"##
    );
    for t in 0..=4 {
        let x = f64::from(t) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{x:.2}</text>"#,
            sx(x),
            TOP + PANEL_H + 16.0
        );
        let y = top * f64::from(t) / 4.0;
        let _ = writeln!(
            svg,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.2}</text>"#,
            LEFT - 6.0,
            sy(y) + 4.0
        );
    }
    let _ = writeln!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">weight (fraction of each group per bin)</text>"#,
        LEFT + plot_w / 2.0,
        TOP + PANEL_H + 32.0
    );
    let bar = plot_w / BINS as f64 / 2.0;
    for (g, (name, h, colour, n)) in groups.iter().enumerate() {
        for (i, &f) in h.iter().enumerate() {
            let x = sx(i as f64 / BINS as f64) + g as f64 * bar;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{colour}" fill-opacity="0.8"/>"#,
                sy(f),
                bar - 1.0,
                TOP + PANEL_H - sy(f)
            );
        }
        let ly = TOP + 14.0 + g as f64 * 18.0;
        let _ = writeln!(
            svg,
            r#"<rect x="{}" y="{}" width="20" height="10" fill="{colour}"/><text x="{}" y="{}">{name} ({n})</text>"#,
            W - RIGHT + 10.0,
            ly - 8.0,
            W - RIGHT + 36.0,
            ly + 2.0
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn record(round: u64, w: f64) -> RoundRecord {
        RoundRecord {
            round,
            train_loss: 1.0 / (round + 1) as f64,
            samples: 64,
            meta_loss: Some(0.5),
            domain_weights: BTreeMap::from([("a<b".to_string(), w), ("c".to_string(), 2.0 - w)]),
            hypergradient_norm: None,
            excess_loss: None,
            domain_alignment: None,
            omega_grad_norm: None,
            source_weights: None,
            rewards: None,
            policy_grad_norm: None,
            meta_accuracy: None,
            test_loss: Some(0.7),
            test_accuracy: Some(0.9),
            seconds: 0.1,
            compute_seconds: 0.05,
            samples_per_second: 1.0,
            workers: 1,
            bytes_in: 0,
            bytes_out: 0,
            reassigned: 0,
        }
    }

    #[test]
    fn histogram_has_a_bar_per_bin_and_group() {
        let svg = histogram(&[0.9, 0.95, 1.0], &[0.0, 0.1]);
        assert_eq!(svg.matches("fill-opacity").count(), 40);
        assert!(svg.contains("clean (3)") && svg.contains("corrupted (2)"));
    }

    #[test]
    fn plots_one_line_per_domain_and_per_loss() {
        let svg = render(&[record(0, 1.0), record(1, 1.5), record(2, 1.8)]);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2 + 4);
        assert!(
            svg.contains("a&lt;b (1.80)"),
            "legend shows the escaped name and last value"
        );
        assert!(render(&[]).contains("</svg>"));
    }

    #[test]
    fn plots_the_policy_weights_of_a_task_policy_run() {
        let records: Vec<RoundRecord> = (0u32..3)
            .map(|i| RoundRecord {
                domain_weights: BTreeMap::new(),
                source_weights: Some(BTreeMap::from([
                    ("x".to_string(), 0.1 * f64::from(i)),
                    ("y".to_string(), 1.0 - 0.1 * f64::from(i)),
                ])),
                ..record(u64::from(i), 1.0)
            })
            .collect();
        let svg = render(&records);
        assert!(svg.contains("source-task policy"));
        assert_eq!(svg.matches("<polyline").count(), 2 + 4);
        assert!(svg.contains("y (0.80)"), "{svg}");
    }
}
