//! The report's SVG timeline: one shared time axis and a lane per kind of information.
//!
//! Lanes, top to bottom: faults (a bar from injection to heal, one row per overlap, each
//! labelled `#index kind` inside or under it, and a faint band of its colour across every lane
//! so what happened during it lines up), the manager's events (a tick per event, coloured by
//! kind, with labels where they fit), the term of each VM as a step line labelled at each step,
//! acknowledged and failed operations per time bucket, every operation's latency over time (log
//! scale fitted to the data; ok, fail and unknown in their own colours, failures larger and on
//! top), and client outages (long ones dark and labelled with their length) and split-brain
//! intervals (also shaded in red across all lanes). A legend of the fault and event colours
//! closes the picture; the time axis is drawn above and below.
//!
//! The picture stays small whatever the run's length: operations are drawn at most once per
//! 2×2-pixel cell and class, as one `<path>` per class; events at most once per pixel column
//! and kind. Hover titles (`<title>`) carry details; no script is needed.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write;

use super::events::TimelineEvent;
use super::html::{esc, millis, secs};
use crate::checker::{Outage, SplitBrainInterval};
use crate::history::Op;
use crate::schedule::FaultKind;

const WIDTH: f64 = 1200.0;
const LEFT: f64 = 150.0;
const RIGHT: f64 = 20.0;
const PLOT: f64 = WIDTH - LEFT - RIGHT;
const ROW: f64 = 18.0;
const BUCKETS: usize = 260;
/// An outage at least this long is drawn dark and labelled (shorter ones are the gaps a few
/// clients leave between operations).
const LONG_OUTAGE_NS: u64 = 200_000_000;
/// Average width of a character of the 10–11 px sans-serif text, for fitting labels.
const CHAR_W: f64 = 5.8;

/// A fault bar.
#[derive(Debug, Clone)]
pub struct FaultBar {
    /// The scheduled event's index.
    pub event: u32,
    /// Its kind (the colour).
    pub kind: FaultKind,
    /// Injected.
    pub start_ns: u64,
    /// Healed.
    pub end_ns: u64,
    /// Short label (untrusted).
    pub label: String,
    /// Hover text (untrusted).
    pub title: String,
}

/// What the timeline shows.
#[derive(Debug, Clone, Copy)]
pub struct TimelineInput<'a> {
    /// The end of the time axis.
    pub end_ns: u64,
    /// Fault bars.
    pub faults: &'a [FaultBar],
    /// Manager events.
    pub events: &'a [TimelineEvent],
    /// Client operations.
    pub history: &'a [Op],
    /// Split-brain intervals.
    pub split_brain: &'a [SplitBrainInterval],
    /// Client outages.
    pub outages: &'a [Outage],
    /// The final heal, if known.
    pub heal_ns: Option<u64>,
}

/// Maps time to x.
#[derive(Clone, Copy)]
struct Scale {
    end: f64,
}

impl Scale {
    fn x(self, t: u64) -> f64 {
        LEFT + (t as f64 / self.end).min(1.0) * PLOT
    }
}

/// The fault groups' colours, as the legend shows them.
const FAULT_GROUPS: [(&str, &str); 7] = [
    ("kill", "#b03a2e"),
    ("crash mid-transfer", "#7b241c"),
    ("stall", "#8e44ad"),
    ("partition", "#d68910"),
    ("link", "#2e86c1"),
    ("disk full", "#7e5109"),
    ("swizzle", "#148f77"),
];

fn fault_colour(kind: FaultKind) -> &'static str {
    use FaultKind::*;
    let group = match kind {
        KillPrimaryHost | KillBackupHost | KillManager | KillVm => 0,
        CrashInCheckpoint | CrashInSync => 1,
        StallPrimaryHost | StallBackupHost | StallManager | StallVm => 2,
        IsolateHost | CutPrimaryFromManager | CutPrimaryFromBackups | OneWayDrop => 3,
        LinkDelay | LinkLoss | LinkDuplicate | LinkReorder => 4,
        DiskFull => 5,
        Swizzle => 6,
    };
    FAULT_GROUPS[group].1
}

/// The event kinds the legend names, in the order of a failover.
const EVENT_LEGEND: [&str; 10] = [
    "host_down",
    "detected",
    "term_changed",
    "promoting",
    "primary_running",
    "backup_lost",
    "backup_added",
    "protected",
    "fenced",
    "lost",
];

fn event_colour(kind: &str) -> &'static str {
    match kind {
        "detected" => "#c0392b",
        "host_down" => "#e74c3c",
        "term_changed" => "#111111",
        "promoting" => "#e67e22",
        "primary_running" => "#27ae60",
        "protected" => "#2471a3",
        "backup_added" => "#16a085",
        "backup_lost" => "#7f8c8d",
        "fenced" => "#8e44ad",
        "lost" => "#ff00aa",
        _ => "#999999",
    }
}

/// Kinds whose ticks get a text label when there is room.
const LABELLED: [&str; 7] = [
    "detected",
    "term_changed",
    "promoting",
    "backup_lost",
    "protected",
    "fenced",
    "lost",
];

/// Where a kind comes in a failover (the legend's order; unknown kinds last): events of one
/// pixel column are drawn and labelled in this order, top to bottom.
fn event_rank(kind: &str) -> usize {
    EVENT_LEGEND
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(EVENT_LEGEND.len())
}

/// Renders the timeline.
pub fn render_timeline(t: &TimelineInput<'_>) -> String {
    let scale = Scale {
        end: t.end_ns.max(1) as f64,
    };
    let mut body = String::new();
    let mut y = 30.0;
    let top = y;
    y = fault_lane(&mut body, t.faults, scale, y);
    y = event_lane(&mut body, t.events, scale, y);
    y = term_lane(&mut body, t.events, scale, y, t.end_ns);
    y = throughput_lane(&mut body, t.history, scale, y, t.end_ns);
    y = latency_lane(&mut body, t.history, scale, y);
    y = trouble_lane(&mut body, t.split_brain, t.outages, scale, y);
    let bottom = y;
    let legend_y = bottom + 30.0;
    let height = legend_y + 40.0;
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"timeline\" class=\"timeline\" width=\"{WIDTH}\" \
         height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" \
         font-size=\"11\"><rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>"
    );
    // Behind everything: each fault's window as a faint band of its colour.
    for b in t.faults {
        let (x0, x1) = (scale.x(b.start_ns), scale.x(b.end_ns));
        let _ = write!(
            svg,
            "<rect x=\"{x0:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\" \
             fill-opacity=\"0.07\"/>",
            (x1 - x0).max(1.0),
            bottom - top,
            fault_colour(b.kind)
        );
    }
    axis(&mut svg, scale, t.end_ns, top, bottom);
    for i in t.split_brain {
        let (x0, x1) = (scale.x(i.start_ns), scale.x(i.end_ns));
        let _ = write!(
            svg,
            "<rect x=\"{x0:.1}\" y=\"{top}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ff0000\" \
             fill-opacity=\"0.18\"/>",
            (x1 - x0).max(2.0),
            bottom - top
        );
    }
    if let Some(h) = t.heal_ns {
        let x = scale.x(h);
        let _ = write!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#27ae60\" \
             stroke-width=\"1.5\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" \
             fill=\"#1e8449\" font-weight=\"bold\" text-anchor=\"end\">final heal</text>",
            x - 3.0,
            top - 16.0
        );
    }
    svg.push_str(&body);
    legend(&mut svg, legend_y);
    svg.push_str("</svg>");
    svg
}

/// The colours of the fault bars and of the events' ticks.
fn legend(out: &mut String, y: f64) {
    let mut row = |y: f64, title: &str, items: &mut dyn Iterator<Item = (String, &str)>| {
        let _ = write!(
            out,
            "<text x=\"8\" y=\"{:.1}\" font-weight=\"bold\">{title}</text>",
            y + 9.0
        );
        let mut x = LEFT;
        for (name, colour) in items {
            let _ = write!(
                out,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"10\" height=\"10\" rx=\"2\" \
                 fill=\"{colour}\"/><text x=\"{:.1}\" y=\"{:.1}\">{name}</text>",
                x + 14.0,
                y + 9.0
            );
            x += 14.0 + 5.4 * name.chars().count() as f64 + 18.0;
        }
    };
    row(
        y,
        "fault colours",
        &mut FAULT_GROUPS.iter().map(|&(n, c)| (n.to_string(), c)),
    );
    row(
        y + 18.0,
        "event colours",
        &mut EVENT_LEGEND
            .iter()
            .map(|&k| (k.replace('_', " "), event_colour(k))),
    );
}

fn lane_label(out: &mut String, y: f64, height: f64, label: &str) {
    let _ = write!(
        out,
        "<text x=\"8\" y=\"{:.1}\" font-weight=\"bold\">{label}</text>\
         <line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#dddddd\"/>",
        y + height / 2.0 + 4.0,
        y + height,
        WIDTH - RIGHT,
        y + height
    );
}

/// A grey line of small text under a lane's label (units, scale).
fn lane_note(out: &mut String, y: f64, height: f64, line: usize, text: &str) {
    let _ = write!(
        out,
        "<text x=\"8\" y=\"{:.1}\" fill=\"#777777\" font-size=\"10\">{text}</text>",
        y + height / 2.0 + 17.0 + 12.0 * line as f64
    );
}

/// Time ticks every "nice" step, with labels on top and vertical grid lines.
fn axis(out: &mut String, scale: Scale, end_ns: u64, top: f64, bottom: f64) {
    const STEPS_MS: [u64; 16] = [
        10, 20, 50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 15_000, 30_000, 60_000, 120_000,
        300_000, 600_000,
    ];
    let end_ms = end_ns / 1_000_000;
    let step = STEPS_MS
        .iter()
        .copied()
        .find(|s| end_ms / s <= 12)
        .unwrap_or(end_ms / 12 + 1);
    let mut t = 0;
    while t <= end_ms {
        let x = scale.x(t * 1_000_000);
        let label = if step >= 1000 {
            format!("{}s", t / 1000)
        } else {
            format!("{}.{:03}s", t / 1000, t % 1000)
        };
        let _ = write!(
            out,
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#e4e4e4\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555555\">{label}</text>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555555\">{label}</text>",
            top - 4.0,
            bottom + 13.0
        );
        t += step;
    }
}

/// Packs bars into rows so overlapping ones do not hide each other.
fn pack_rows(bars: &[FaultBar]) -> Vec<usize> {
    let mut row_end: Vec<u64> = Vec::new();
    let mut rows = Vec::with_capacity(bars.len());
    for b in bars {
        let row = match row_end.iter().position(|&e| e < b.start_ns) {
            Some(r) => r,
            None => {
                row_end.push(0);
                row_end.len() - 1
            }
        };
        row_end[row] = b.end_ns.max(b.start_ns);
        rows.push(row);
    }
    rows
}

fn fault_lane(out: &mut String, bars: &[FaultBar], scale: Scale, y: f64) -> f64 {
    let mut sorted: Vec<FaultBar> = bars.to_vec();
    sorted.sort_by_key(|b| (b.start_ns, b.end_ns));
    let rows = pack_rows(&sorted);
    let bar_rows = rows.iter().max().map_or(1, |r| r + 1) as f64;
    // Labels that do not fit in their bar go under the bars, in two rows.
    const LABEL_ROWS: usize = 2;
    let labels_y = y + 3.0 + bar_rows * ROW;
    let height = bar_rows * ROW + LABEL_ROWS as f64 * 12.0 + 8.0;
    lane_label(out, y, height, "faults");
    let mut label_end = [f64::MIN; LABEL_ROWS];
    for (b, row) in sorted.iter().zip(rows) {
        let (x0, x1) = (scale.x(b.start_ns), scale.x(b.end_ns));
        let w = (x1 - x0).max(2.0);
        let by = y + 3.0 + row as f64 * ROW;
        let colour = fault_colour(b.kind);
        let _ = write!(
            out,
            "<g><title>{}</title><rect x=\"{x0:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" \
             height=\"{:.1}\" rx=\"2\" fill=\"{colour}\"/>",
            esc(&b.title),
            ROW - 4.0,
        );
        let label = format!("#{} {}", b.event, b.label);
        let width = |text: &str| CHAR_W * text.chars().count().min(40) as f64;
        if w >= width(&label) + 6.0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#ffffff\">{}</text>",
                x0 + 3.0,
                by + ROW - 8.0,
                esc(&label)
            );
        } else if let Some(r) = (0..LABEL_ROWS).find(|&r| label_end[r] < x0) {
            let _ = write!(
                out,
                "<text x=\"{x0:.1}\" y=\"{:.1}\" fill=\"{colour}\" font-size=\"10\">{}</text>",
                labels_y + 10.0 + r as f64 * 12.0,
                esc(&label)
            );
            label_end[r] = x0 + width(&label) + 4.0;
        } else {
            let short = format!("#{}", b.event);
            if w >= width(&short) + 4.0 {
                let _ = write!(
                    out,
                    "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#ffffff\">{short}</text>",
                    x0 + 2.0,
                    by + ROW - 8.0
                );
            }
        }
        out.push_str("</g>");
    }
    y + height
}

fn event_lane(out: &mut String, events: &[TimelineEvent], scale: Scale, y: f64) -> f64 {
    let height = 58.0;
    lane_label(out, y, height, "manager events");
    // One tick per pixel column and kind; the title says how many it stands for.
    let mut ticks: BTreeMap<(i64, usize, &str), Vec<&TimelineEvent>> = BTreeMap::new();
    for e in events {
        let px = scale.x(e.time_ns) as i64;
        let kind = e.kind.as_str();
        ticks
            .entry((px, event_rank(kind), kind))
            .or_default()
            .push(e);
    }
    let mut label_end = [f64::MIN; 3];
    for ((px, _, kind), group) in &ticks {
        let x = *px as f64;
        let mut title = group
            .iter()
            .take(5)
            .map(|e| format!("{} {}", secs(e.time_ns), e.text))
            .collect::<Vec<_>>()
            .join("\n");
        if group.len() > 5 {
            title.push_str(&format!("\n… and {} more", group.len() - 5));
        }
        let colour = event_colour(kind);
        // Events of one decision share a pixel: their dots are staggered by kind.
        let stagger = event_rank(kind) % 4;
        let cy = y + 37.0 + 4.0 * stagger as f64;
        let _ = write!(
            out,
            "<g><title>{}</title><line x1=\"{x:.1}\" y1=\"{cy:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" \
             stroke=\"{colour}\" stroke-width=\"2\"/><circle cx=\"{x:.1}\" cy=\"{cy:.1}\" r=\"3\" \
             fill=\"{colour}\"/></g>",
            esc(&title),
            y + height - 2.0,
        );
        if LABELLED.contains(kind) {
            // The first free row from the top, so a decision's events read in order.
            if let Some(row) = (0..label_end.len()).find(|&r| label_end[r] < x) {
                let label = kind.replace('_', " ");
                let _ = write!(
                    out,
                    "<text x=\"{x:.1}\" y=\"{:.1}\" fill=\"{colour}\" font-size=\"10\">{}</text>",
                    y + 10.0 + row as f64 * 11.0,
                    esc(&label)
                );
                label_end[row] = x + CHAR_W * label.len() as f64;
            }
        }
    }
    y + height
}

fn term_lane(out: &mut String, events: &[TimelineEvent], scale: Scale, y: f64, end: u64) -> f64 {
    let height = 60.0;
    lane_label(out, y, height, "term");
    // Each VM's term over time: it only grows (an event about an older instance, a fencing
    // say, does not take it back). Before its first event a VM had that event's term, or the
    // one before if the event is the change itself.
    let mut by_vm: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for e in events {
        let Some(term) = e.term else { continue };
        let points = by_vm.entry(e.vm.as_deref().unwrap_or("-")).or_default();
        match points.last() {
            None => {
                let before = if e.kind == "term_changed" {
                    term.saturating_sub(1).max(1)
                } else {
                    term
                };
                points.push((0, before));
                if term > before {
                    points.push((e.time_ns, term));
                }
            }
            Some(&(_, last)) if term > last => points.push((e.time_ns, term)),
            Some(_) => {}
        }
    }
    let terms = || by_vm.values().flatten().map(|&(_, t)| t);
    let (min_term, max_term) = (terms().min().unwrap_or(1), terms().max().unwrap_or(1));
    let span = (max_term - min_term).max(1) as f64;
    let ty = |term: u64| y + height - 8.0 - ((term - min_term) as f64 / span) * (height - 24.0);
    const PALETTE: [&str; 4] = ["#1f618d", "#b9770e", "#6c3483", "#117a65"];
    for (i, (vm, points)) in by_vm.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut d = format!("M{:.1},{:.1}", scale.x(points[0].0), ty(points[0].1));
        let mut labels = String::new();
        let mut label_end = f64::MIN;
        for (j, &(t, term)) in points.iter().enumerate() {
            let x = scale.x(t);
            if j > 0 {
                let _ = write!(d, " H{x:.1} V{:.1}", ty(term));
            }
            let text = format!("{term}");
            if x > label_end {
                let _ = write!(
                    labels,
                    "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"{colour}\" font-size=\"10\">{text}</text>",
                    x + 3.0,
                    ty(term) - 3.0
                );
                label_end = x + CHAR_W * text.len() as f64 + 6.0;
            }
        }
        let last = points.last().map_or(0, |p| p.1);
        let _ = write!(d, " H{:.1}", scale.x(end));
        let _ = write!(
            out,
            "<g><title>vm {} term up to {last}</title><path d=\"{d}\" fill=\"none\" \
             stroke=\"{colour}\" stroke-width=\"2\"/>{labels}<text x=\"{:.1}\" y=\"{:.1}\" \
             fill=\"{colour}\" text-anchor=\"end\">vm {} (term {last})</text></g>",
            esc(vm),
            WIDTH - RIGHT - 110.0 * i as f64,
            y + 11.0,
            esc(vm)
        );
    }
    y + height
}

fn throughput_lane(out: &mut String, history: &[Op], scale: Scale, y: f64, end: u64) -> f64 {
    let height = 50.0;
    lane_label(out, y, height, "ops done / bucket");
    let bucket_ns = (end / BUCKETS as u64).max(1);
    let mut ok = vec![0u64; BUCKETS];
    let mut bad = vec![0u64; BUCKETS];
    for op in history {
        let b = ((op.complete_ns / bucket_ns) as usize).min(BUCKETS - 1);
        if op.is_ok() {
            ok[b] += 1;
        } else {
            bad[b] += 1;
        }
    }
    let max = ok.iter().chain(&bad).copied().max().unwrap_or(0).max(1);
    for (counts, colour) in [(&ok, "#58d68d"), (&bad, "#e74c3c")] {
        let mut d = String::new();
        for (i, &c) in counts.iter().enumerate().filter(|(_, &c)| c > 0) {
            let x = scale.x(i as u64 * bucket_ns);
            let w = scale.x((i as u64 + 1) * bucket_ns) - x;
            let h = (c as f64 / max as f64) * (height - 6.0);
            let _ = write!(d, "M{x:.1},{:.1}h{w:.1}v{h:.1}h{:.1}z", y + height - h, -w);
        }
        if !d.is_empty() {
            let _ = write!(out, "<path d=\"{d}\" fill=\"{colour}\"/>");
        }
    }
    lane_note(
        out,
        y,
        height,
        0,
        &format!("per {}, max {max}", millis(bucket_ns)),
    );
    y + height
}

/// The name of a power of ten of nanoseconds.
fn decade_name(exp: i32) -> &'static str {
    match exp {
        3 => "1 µs",
        4 => "10 µs",
        5 => "100 µs",
        6 => "1 ms",
        7 => "10 ms",
        8 => "100 ms",
        9 => "1 s",
        10 => "10 s",
        11 => "100 s",
        _ => "",
    }
}

fn latency_lane(out: &mut String, history: &[Op], scale: Scale, y: f64) -> f64 {
    let height = 170.0;
    lane_label(out, y, height, "latency (log)");
    // The decades the data spans (at least one), so no height goes to empty ones.
    let lats = || history.iter().map(|o| o.latency_ns().max(1) as f64);
    let min_lat = lats().fold(f64::INFINITY, f64::min);
    let max_lat = lats().fold(0.0, f64::max);
    let min_exp = if min_lat.is_finite() {
        (min_lat.log10().floor() as i32).clamp(3, 9)
    } else {
        6
    };
    let max_exp = (max_lat.max(1.0).log10().ceil() as i32).clamp(min_exp + 1, 11);
    let (lo, hi) = (f64::from(min_exp), f64::from(max_exp));
    let ly = |lat: u64| {
        let e = (lat.max(1) as f64).log10().clamp(lo, hi);
        y + height - 4.0 - (e - lo) / (hi - lo) * (height - 8.0)
    };
    for exp in min_exp..=max_exp {
        let gy = ly(10f64.powi(exp) as u64);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#e8e8e8\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#777777\" \
             font-size=\"9\">{}</text>",
            WIDTH - RIGHT,
            LEFT - 4.0,
            gy + 3.0,
            decade_name(exp)
        );
    }
    // Class 0 ok, 1 fail, 2 unknown; one mark per 2×2 cell and class; failures larger.
    let mut seen: HashSet<(i32, i32, u8)> = HashSet::new();
    let mut paths: HashMap<u8, String> = HashMap::new();
    let mut counts = [0u64; 3];
    for op in history {
        let class = if op.is_ok() {
            0
        } else if op.is_fail() {
            1
        } else {
            2
        };
        counts[class as usize] += 1;
        let (px, py) = (scale.x(op.invoke_ns), ly(op.latency_ns()));
        if seen.insert(((px / 2.0) as i32, (py / 2.0) as i32, class)) {
            let (size, half) = if class == 0 { (2.0, 1.0) } else { (5.0, 2.5) };
            let _ = write!(
                paths.entry(class).or_default(),
                "M{:.1},{:.1}h{size}v{size}h-{size}z",
                px - half,
                py - half
            );
        }
    }
    let styles = [
        ("#2874a6", "ok"),
        ("#e67e22", "fail"),
        ("#e74c3c", "unknown"),
    ];
    for class in 0..3u8 {
        if let Some(d) = paths.get(&class) {
            let (colour, name) = styles[class as usize];
            let _ = write!(
                out,
                "<path d=\"{d}\" fill=\"{colour}\"><title>{name}: {} ops</title></path>",
                counts[class as usize]
            );
        }
    }
    for (i, (colour, name)) in styles.iter().enumerate() {
        let ky = y + height / 2.0 + 12.0 + 13.0 * i as f64;
        let _ = write!(
            out,
            "<rect x=\"8\" y=\"{ky:.1}\" width=\"9\" height=\"9\" fill=\"{colour}\"/>\
             <text x=\"21\" y=\"{:.1}\" font-size=\"10\">{name} ({})</text>",
            ky + 8.5,
            counts[i]
        );
    }
    y + height
}

fn trouble_lane(
    out: &mut String,
    split: &[SplitBrainInterval],
    outages: &[Outage],
    scale: Scale,
    y: f64,
) -> f64 {
    let height = 2.0 * ROW + 12.0;
    lane_label(out, y, height, "outages / split");
    lane_note(
        out,
        y,
        height,
        0,
        &format!("dark: ≥ {} ms", LONG_OUTAGE_NS / 1_000_000),
    );
    let bar_y = y + 14.0;
    let mut label_end = f64::MIN;
    for o in outages {
        let (x0, x1) = (scale.x(o.start_ns), scale.x(o.end_ns));
        let long = o.end_ns - o.start_ns >= LONG_OUTAGE_NS;
        let _ = write!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{bar_y:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{}\">\
             <title>no acknowledged op for {}</title></rect>",
            (x1 - x0).max(1.0),
            ROW - 6.0,
            if long { "#555555" } else { "#cccccc" },
            millis(o.end_ns - o.start_ns)
        );
        if long && x0 > label_end {
            let text = short_duration(o.end_ns - o.start_ns);
            let _ = write!(
                out,
                "<text x=\"{x0:.1}\" y=\"{:.1}\" fill=\"#333333\" font-size=\"10\">{text}</text>",
                y + 10.0
            );
            label_end = x0 + CHAR_W * text.chars().count() as f64 + 4.0;
        }
    }
    for i in split {
        let (x0, x1) = (scale.x(i.start_ns), scale.x(i.end_ns));
        let _ = write!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ff0000\">\
             <title>split brain {} and {} for {}</title></rect>",
            bar_y + ROW,
            (x1 - x0).max(2.0),
            ROW - 6.0,
            esc(&i.hosts[0]),
            esc(&i.hosts[1]),
            millis(i.end_ns - i.start_ns)
        );
    }
    y + height
}

/// `1.2 s` or `340 ms`.
fn short_duration(ns: u64) -> String {
    if ns >= 1_000_000_000 {
        format!("{}.{} s", ns / 1_000_000_000, ns / 100_000_000 % 10)
    } else {
        format!("{} ms", ns / 1_000_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::history::tests::{failed, set, unknown};

    #[test]
    fn many_ops_stay_small() {
        let mut h = Vec::new();
        for i in 0..50_000u64 {
            let t = i * 4_000_000;
            let op = set(
                1,
                i,
                "k",
                &format!("v{i}"),
                (t, t + 300_000 + (i % 97) * 10_000),
            );
            h.push(match i % 500 {
                0 => failed(op),
                1 => unknown(op),
                _ => op,
            });
        }
        let svg = render_timeline(&TimelineInput {
            end_ns: 200_000_000_000,
            faults: &[],
            events: &[],
            history: &h,
            split_brain: &[],
            outages: &[],
            heal_ns: Some(190_000_000_000),
        });
        assert!(svg.len() < 500_000, "{} bytes", svg.len());
        assert!(svg.contains("ok (49800)"));
        assert!(svg.contains("final heal"));
    }

    #[test]
    fn overlapping_faults_get_rows() {
        let bar = |s, e| FaultBar {
            event: 0,
            kind: FaultKind::Swizzle,
            start_ns: s,
            end_ns: e,
            label: String::new(),
            title: String::new(),
        };
        assert_eq!(
            pack_rows(&[bar(0, 10), bar(5, 20), bar(11, 12), bar(21, 30)]),
            vec![0, 1, 0, 0]
        );
    }
}
