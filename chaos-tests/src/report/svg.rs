//! The report's SVG timeline: one shared time axis and a lane per kind of information.
//!
//! Lanes, top to bottom: faults (a bar from injection to heal, labelled, one row per overlap),
//! the manager's events (a tick per event, coloured by kind, with labels where they fit), the
//! term of each VM as a step line, acknowledged and failed operations per time bucket, every
//! operation's latency over time (log scale; ok, fail and unknown in their own colours), and
//! client outages and split-brain intervals (which are also shaded in red across all lanes).
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

fn fault_colour(kind: FaultKind) -> &'static str {
    use FaultKind::*;
    match kind {
        KillPrimaryHost | KillBackupHost | KillManager | KillVm => "#b03a2e",
        CrashInCheckpoint | CrashInSync => "#7b241c",
        StallPrimaryHost | StallBackupHost | StallManager | StallVm => "#8e44ad",
        IsolateHost | CutPrimaryFromManager | CutPrimaryFromBackups | OneWayDrop => "#d68910",
        LinkDelay | LinkLoss | LinkDuplicate | LinkReorder => "#2e86c1",
        DiskFull => "#7e5109",
        Swizzle => "#148f77",
    }
}

fn event_colour(kind: &str) -> &'static str {
    match kind {
        "detected" | "host_down" => "#c0392b",
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
const LABELLED: [&str; 5] = ["detected", "term_changed", "promoting", "protected", "lost"];

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
    let mut svg = String::new();
    let height = bottom + 30.0;
    let _ = write!(
        svg,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"timeline\" width=\"{WIDTH}\" \
         height=\"{height}\" viewBox=\"0 0 {WIDTH} {height}\" font-family=\"sans-serif\" \
         font-size=\"11\"><rect width=\"100%\" height=\"100%\" fill=\"#ffffff\"/>"
    );
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
             stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#27ae60\" \
             text-anchor=\"end\">final heal</text>",
            x - 3.0,
            top - 16.0
        );
    }
    svg.push_str(&body);
    svg.push_str("</svg>");
    svg
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
            "<line x1=\"{x:.1}\" y1=\"{top}\" x2=\"{x:.1}\" y2=\"{bottom}\" stroke=\"#eeeeee\"/>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#555555\">{label}</text>",
            top - 4.0
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
    let height = (rows.iter().max().map_or(1, |r| r + 1) as f64) * ROW + 6.0;
    lane_label(out, y, height, "faults");
    for (b, row) in sorted.iter().zip(rows) {
        let (x0, x1) = (scale.x(b.start_ns), scale.x(b.end_ns));
        let w = (x1 - x0).max(2.0);
        let by = y + 3.0 + row as f64 * ROW;
        let _ = write!(
            out,
            "<g><title>{}</title><rect x=\"{x0:.1}\" y=\"{by:.1}\" width=\"{w:.1}\" \
             height=\"{:.1}\" rx=\"2\" fill=\"{}\"/>",
            esc(&b.title),
            ROW - 4.0,
            fault_colour(b.kind)
        );
        // Labels only where they fit (about 6 px per character).
        let label = esc(&b.label);
        if w >= 6.0 * b.label.chars().count().min(40) as f64 + 6.0 {
            let _ = write!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#ffffff\">{label}</text>",
                x0 + 3.0,
                by + ROW - 8.0
            );
        }
        out.push_str("</g>");
    }
    y + height
}

fn event_lane(out: &mut String, events: &[TimelineEvent], scale: Scale, y: f64) -> f64 {
    let height = 58.0;
    lane_label(out, y, height, "manager events");
    // One tick per pixel column and kind; the title says how many it stands for.
    let mut ticks: BTreeMap<(i64, &str), Vec<&TimelineEvent>> = BTreeMap::new();
    for e in events {
        let px = scale.x(e.time_ns) as i64;
        ticks.entry((px, e.kind.as_str())).or_default().push(e);
    }
    let mut label_end = [f64::MIN; 3];
    for ((px, kind), group) in &ticks {
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
        let _ = write!(
            out,
            "<g><title>{}</title><line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" \
             stroke=\"{colour}\" stroke-width=\"2\"/><circle cx=\"{x:.1}\" cy=\"{:.1}\" r=\"3\" \
             fill=\"{colour}\"/></g>",
            esc(&title),
            y + 38.0,
            y + height - 2.0,
            y + 38.0
        );
        if LABELLED.contains(kind) {
            let row = (0..label_end.len())
                .min_by(|&a, &b| label_end[a].total_cmp(&label_end[b]))
                .unwrap_or(0);
            if label_end[row] < x {
                let label = esc(kind);
                let _ = write!(
                    out,
                    "<text x=\"{x:.1}\" y=\"{:.1}\" fill=\"{colour}\" font-size=\"10\">{label}</text>",
                    y + 10.0 + row as f64 * 11.0
                );
                label_end[row] = x + 6.0 * kind.len() as f64;
            }
        }
    }
    y + height
}

fn term_lane(out: &mut String, events: &[TimelineEvent], scale: Scale, y: f64, end: u64) -> f64 {
    let height = 60.0;
    lane_label(out, y, height, "term");
    let mut by_vm: BTreeMap<&str, Vec<(u64, u64)>> = BTreeMap::new();
    for e in events {
        if let Some(term) = e.term {
            by_vm
                .entry(e.vm.as_deref().unwrap_or("-"))
                .or_default()
                .push((e.time_ns, term));
        }
    }
    let max_term = by_vm
        .values()
        .flatten()
        .map(|&(_, t)| t)
        .max()
        .unwrap_or(1)
        .max(1);
    let ty = |term: u64| y + height - 4.0 - (term as f64 / max_term as f64) * (height - 14.0);
    const PALETTE: [&str; 4] = ["#1f618d", "#b9770e", "#6c3483", "#117a65"];
    for (i, (vm, points)) in by_vm.iter().enumerate() {
        let colour = PALETTE[i % PALETTE.len()];
        let mut d = format!("M{:.1},{:.1}", scale.x(points[0].0), ty(points[0].1));
        let mut last = points[0].1;
        for &(t, term) in &points[1..] {
            if term != last {
                let _ = write!(d, " H{:.1} V{:.1}", scale.x(t), ty(term));
                last = term;
            }
        }
        let _ = write!(d, " H{:.1}", scale.x(end));
        let _ = write!(
            out,
            "<g><title>vm {} term up to {last}</title><path d=\"{d}\" fill=\"none\" \
             stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{:.1}\" y=\"{:.1}\" \
             fill=\"{colour}\">{} ({last})</text></g>",
            esc(vm),
            LEFT + 4.0 + 90.0 * i as f64,
            y + 10.0,
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
    let _ = write!(
        out,
        "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555555\" font-size=\"10\">max {max} per {}</text>",
        WIDTH - RIGHT - 140.0,
        y + 10.0,
        millis(bucket_ns)
    );
    y + height
}

fn latency_lane(out: &mut String, history: &[Op], scale: Scale, y: f64) -> f64 {
    let height = 200.0;
    lane_label(out, y, height, "latency (log)");
    let min_exp = 4.0; // 10 µs
    let max_lat = history
        .iter()
        .map(Op::latency_ns)
        .max()
        .unwrap_or(0)
        .max(1_000_000);
    let max_exp = (max_lat as f64).log10().ceil().max(min_exp + 1.0);
    let ly = |lat: u64| {
        let e = (lat.max(1) as f64).log10().clamp(min_exp, max_exp);
        y + height - 4.0 - (e - min_exp) / (max_exp - min_exp) * (height - 8.0)
    };
    let names = [
        "10 µs", "100 µs", "1 ms", "10 ms", "100 ms", "1 s", "10 s", "100 s",
    ];
    for (i, name) in names.iter().enumerate() {
        let exp = min_exp + i as f64;
        if exp > max_exp {
            break;
        }
        let gy = ly(10f64.powf(exp) as u64);
        let _ = write!(
            out,
            "<line x1=\"{LEFT}\" y1=\"{gy:.1}\" x2=\"{:.1}\" y2=\"{gy:.1}\" stroke=\"#f0f0f0\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" fill=\"#888888\" \
             font-size=\"9\">{name}</text>",
            WIDTH - RIGHT,
            LEFT - 4.0,
            gy + 3.0
        );
    }
    // Class 0 ok, 1 fail, 2 unknown; one mark per 2×2 cell and class.
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
            let size = if class == 0 { 2.0 } else { 3.0 };
            let _ = write!(
                paths.entry(class).or_default(),
                "M{px:.1},{py:.1}h{size}v{size}h-{size}z"
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
        let _ = write!(
            out,
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"8\" height=\"8\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\">{name} ({})</text>",
            WIDTH - RIGHT - 330.0 + 110.0 * i as f64,
            y + 4.0,
            WIDTH - RIGHT - 318.0 + 110.0 * i as f64,
            y + 11.0,
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
    let height = 2.0 * ROW;
    lane_label(out, y, height, "outages / split");
    for o in outages {
        let (x0, x1) = (scale.x(o.start_ns), scale.x(o.end_ns));
        let _ = write!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#aaaaaa\">\
             <title>no acknowledged op for {}</title></rect>",
            y + 3.0,
            (x1 - x0).max(1.0),
            ROW - 6.0,
            millis(o.end_ns - o.start_ns)
        );
    }
    for i in split {
        let (x0, x1) = (scale.x(i.start_ns), scale.x(i.end_ns));
        let _ = write!(
            out,
            "<rect x=\"{x0:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"#ff0000\">\
             <title>split brain {} and {} for {}</title></rect>",
            y + ROW + 1.0,
            (x1 - x0).max(2.0),
            ROW - 6.0,
            esc(&i.hosts[0]),
            esc(&i.hosts[1]),
            millis(i.end_ns - i.start_ns)
        );
    }
    y + height
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
