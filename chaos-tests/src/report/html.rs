//! Escaping and small formatting helpers of the report. Every text that comes from a file of
//! the run directory (keys, values, host names, event details, error texts) is untrusted and
//! goes through [`esc`] before it reaches the page, in text and in attributes alike.

use std::fmt::Write;

/// Longest untrusted text shown whole; longer ones are cut with an ellipsis.
pub const MAX_TEXT: usize = 200;

/// Escapes for HTML/SVG text and double- or single-quoted attributes, and cuts overlong text.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_TEXT) + 8);
    for (i, c) in text.chars().enumerate() {
        if i == MAX_TEXT {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters other than tab and newline are not valid in XML (SVG).
            c if c.is_control() && c != '\t' && c != '\n' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// `ns` as seconds with millisecond precision (`12.345 s`).
pub fn secs(ns: u64) -> String {
    format!("{}.{:03} s", ns / 1_000_000_000, ns / 1_000_000 % 1000)
}

/// `ns` as milliseconds with one decimal (`12.3 ms`).
pub fn millis(ns: u64) -> String {
    format!("{}.{} ms", ns / 1_000_000, ns / 100_000 % 10)
}

/// The p-th percentile (0..=100) of sorted values, nearest rank.
pub fn percentile(sorted: &[u64], p: u64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as u64).div_ceil(100).max(1) as usize;
    Some(sorted[rank.min(sorted.len()) - 1])
}

/// An HTML table under construction; cells are given already escaped.
pub struct Table {
    html: String,
}

impl Table {
    /// A table with these (trusted) column headers (none: no header row).
    pub fn new(class: &str, headers: &[&str]) -> Table {
        let mut html = format!("<table class=\"{class}\">");
        if !headers.is_empty() {
            html.push_str("<thead><tr>");
            for h in headers {
                let _ = write!(html, "<th>{h}</th>");
            }
            html.push_str("</tr></thead>");
        }
        html.push_str("<tbody>");
        Table { html }
    }

    /// A row of a key (a header cell) and its value, both escaped.
    pub fn key_row(&mut self, key: &str, value: &str) {
        let _ = write!(self.html, "<tr><th>{key}</th><td>{value}</td></tr>");
    }

    /// A row of escaped cells.
    pub fn row(&mut self, cells: &[String]) {
        self.html.push_str("<tr>");
        for c in cells {
            let _ = write!(self.html, "<td>{c}</td>");
        }
        self.html.push_str("</tr>");
    }

    /// The finished table.
    pub fn finish(mut self) -> String {
        self.html.push_str("</tbody></table>");
        self.html
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_quotes_and_controls() {
        assert_eq!(
            esc(r#"<script>alert('x' & "y")</script>"#),
            "&lt;script&gt;alert(&#39;x&#39; &amp; &quot;y&quot;)&lt;/script&gt;"
        );
        assert_eq!(esc("a\u{0}b\u{1b}"), "a\u{fffd}b\u{fffd}");
        let long = "x".repeat(500);
        assert_eq!(esc(&long).chars().count(), MAX_TEXT + 1);
    }

    #[test]
    fn formats_times_and_percentiles() {
        assert_eq!(secs(12_345_678_901), "12.345 s");
        assert_eq!(millis(1_234_567), "1.2 ms");
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), Some(50));
        assert_eq!(percentile(&v, 99), Some(99));
        assert_eq!(percentile(&v, 100), Some(100));
        assert_eq!(percentile(&v, 0), Some(1));
        assert_eq!(percentile(&[], 50), None);
    }
}
