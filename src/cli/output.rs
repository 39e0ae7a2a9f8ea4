//! Plain-text formatting shared by the commands: padded tables, UTC clock times, short
//! durations, truncation and folding of multi-line text into one table cell. Pure functions, no terminal handling.

use std::time::{Duration, UNIX_EPOCH};

/// A table of padded columns. The last column is never padded, so lines carry no trailing
/// spaces; columns marked with [`Table::right`] are right-aligned (numbers).
#[derive(Debug, Clone)]
pub struct Table {
    header: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(header: &[&str]) -> Table {
        Table {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            right: vec![false; header.len()],
            rows: Vec::new(),
        }
    }

    /// Right-aligns the given columns (0-based).
    pub fn right(mut self, columns: &[usize]) -> Table {
        for &c in columns {
            if let Some(r) = self.right.get_mut(c) {
                *r = true;
            }
        }
        self
    }

    /// Appends a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.header.len(), String::new());
        self.rows.push(cells);
    }

    /// Renders the header and rows, each line prefixed by `indent` and ending in a newline.
    pub fn render(&self, indent: &str) -> String {
        let columns = self.header.len();
        let mut widths: Vec<usize> = self.header.iter().map(|h| width(h)).collect();
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(width(cell));
            }
        }
        let mut out = String::new();
        for line in std::iter::once(&self.header).chain(&self.rows) {
            let mut text = String::from(indent);
            for (i, cell) in line.iter().enumerate() {
                let pad = " ".repeat(widths[i] - width(cell));
                let last = i + 1 == columns;
                if self.right[i] {
                    text.push_str(&pad);
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    if !last {
                        text.push_str(&pad);
                    }
                }
                if !last {
                    text.push_str("  ");
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Display width of a cell: its number of characters (arrows and the like count as one).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `2026-05-01 12:00:00 UTC` for milliseconds since the Unix epoch (negative clamps to 0).
pub fn timestamp_utc(ms: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64);
    // RFC 3339 with seconds: `2026-05-01T12:00:00Z`.
    let rfc = humantime::format_rfc3339_seconds(at).to_string();
    format!("{} UTC", rfc.trim_end_matches('Z').replacen('T', " ", 1))
}

/// `HH:MM:SS` (UTC) for milliseconds since the Unix epoch.
pub fn clock_utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

/// A duration in its two largest units: `45s`, `3m 4s`, `2h 5m`, `1d 3h`. Negative reads `0s`.
pub fn short_duration(ms: i64) -> String {
    let secs = ms.max(0) / 1000;
    let units = [
        (secs / 86_400, "d"),
        ((secs / 3600) % 24, "h"),
        ((secs / 60) % 60, "m"),
        (secs % 60, "s"),
    ];
    let first = units.iter().position(|(n, _)| *n > 0).unwrap_or(3);
    units[first..]
        .iter()
        .take(2)
        .enumerate()
        .filter(|(i, (n, _))| *i == 0 || *n > 0)
        .map(|(_, (n, u))| format!("{n}{u}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// At most `max` characters of `s`, ending in `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// `text` for a table cell: on one line (each line break, with the blanks around it, becomes
/// ` ⏎ `), and at most `max` characters, ending in `…` when cut. The full text stays in `--json`
/// and the evidence.
pub fn one_line(text: &str, max: usize) -> String {
    let folded = text
        .trim()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ⏎ ");
    truncate(&folded, max)
}

/// A fraction (0..=1) as a percentage with two decimals: `0.0123` → `1.23%`.
pub fn percent(fraction: f64) -> String {
    format!("{:.2}%", fraction * 100.0)
}

/// `1 stage`, `4 stages`.
pub fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("{n} {word}")
    } else {
        format!("{n} {word}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_right_align_numbers() {
        let mut t = Table::new(&["NAME", "COUNT", "NOTE"]).right(&[1]);
        t.row(vec!["a".into(), "1200".into(), "x".into()]);
        t.row(vec!["longer".into(), "3".into()]);
        assert_eq!(
            t.render("  "),
            "  NAME    COUNT  NOTE\n  a        1200  x\n  longer      3\n"
        );
    }

    #[test]
    fn tables_count_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["1 → 2".into(), "x".into()]);
        t.row(vec!["1".into(), "y".into()]);
        assert_eq!(t.render(""), "A      B\n1 → 2  x\n1      y\n");
    }

    #[test]
    fn times_are_utc() {
        // 2024-02-29 23:59:58.5 UTC.
        let ms = 1_709_251_198_500;
        assert_eq!(clock_utc(ms), "23:59:58");
        assert_eq!(timestamp_utc(ms), "2024-02-29 23:59:58 UTC");
        assert_eq!(clock_utc(0), "00:00:00");
    }

    #[test]
    fn durations_keep_two_units() {
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(-5), "0s");
        assert_eq!(short_duration(45_999), "45s");
        assert_eq!(short_duration(184_000), "3m 4s");
        assert_eq!(short_duration(3_600_000), "1h");
        assert_eq!(short_duration(7_500_000), "2h 5m");
        assert_eq!(short_duration(97_200_000 + 59_000), "1d 3h");
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("short", 60), "short");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("ééééé", 5), "ééééé");
        assert_eq!(truncate(&"x".repeat(100), 60).chars().count(), 60);
    }

    #[test]
    fn multi_line_text_is_folded_to_one_line_and_cut() {
        let nginx = "nginx: [emerg] unknown directive \"upstrem\" in /etc/nginx/serin.conf:3\r\n\
                     nginx: configuration file /etc/nginx/nginx.conf test failed\n";
        assert_eq!(
            one_line(nginx, 200),
            "nginx: [emerg] unknown directive \"upstrem\" in /etc/nginx/serin.conf:3 ⏎ \
             nginx: configuration file /etc/nginx/nginx.conf test failed"
        );
        assert_eq!(one_line("a\n\n  b  \n", 60), "a ⏎ b");
        assert_eq!(one_line("plain", 60), "plain");
        let cut = one_line(&"line\n".repeat(50), 40);
        assert_eq!(cut.chars().count(), 40);
        assert!(cut.ends_with('…') && !cut.contains('\n'), "{cut}");
    }

    #[test]
    fn percentages_and_plurals() {
        assert_eq!(percent(0.0123), "1.23%");
        assert_eq!(percent(0.0), "0.00%");
        assert_eq!(plural(1, "stage"), "1 stage");
        assert_eq!(plural(0, "trigger"), "0 triggers");
    }
}
