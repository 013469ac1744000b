//! The SVG of `baton bench`: accepted sends per second over time, one line per chain, one panel
//! per scenario. Plain SVG, no script, so it shows in any browser or README.

use std::fmt::Write;

use super::Row;

/// The series' time resolution.
pub const BUCKET_MS: u64 = 100;

/// Points per second-long window: the lines plot a moving one-second rate.
const WINDOW: usize = (1000 / BUCKET_MS) as usize;

const COLOURS: [&str; 8] = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// One panel per scenario: sends per second (one-second moving sum) per chain over time, and
/// the configured rate as a dashed line.
pub fn svg(rows: &[Row]) -> String {
    let (w, h, pad) = (760.0, 200.0, 50.0);
    let total_h = rows.len().max(1) as f64 * (h + pad) + pad;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{:.0}" height="{total_h:.0}" font-family="sans-serif" font-size="11">"#,
        w + 2.0 * pad
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    for (i, row) in rows.iter().enumerate() {
        let top = pad + i as f64 * (h + pad);
        let rates: Vec<Vec<f64>> = row
            .series
            .iter()
            .map(|buckets| {
                (0..buckets.len())
                    .map(|b| buckets[b.saturating_sub(WINDOW - 1)..=b].iter().map(|&n| n as f64).sum::<f64>())
                    .collect()
            })
            .collect();
        let len = rates.iter().map(Vec::len).max().unwrap_or(0).max(1);
        let peak =
            rates.iter().flatten().copied().fold(row.scenario.limited_rate().unwrap_or(0.0), f64::max).max(1.0) * 1.1;
        let seconds = len as f64 * BUCKET_MS as f64 / 1000.0;
        let x = |b: usize| pad + b as f64 / len as f64 * w;
        let y = |v: f64| top + h - v / peak * h;
        let _ = writeln!(
            s,
            r##"<text x="{pad}" y="{:.0}" font-weight="bold">{}: {} ({} chains, {:.0} sends/s)</text>"##,
            top - 8.0,
            esc(&row.scenario.name),
            esc(&row.scenario.what),
            row.scenario.chains,
            row.sends_per_second
        );
        let _ = writeln!(s, r##"<rect x="{pad}" y="{top:.0}" width="{w}" height="{h}" fill="none" stroke="#999"/>"##);
        let _ =
            writeln!(s, r##"<text x="{:.0}" y="{:.0}" text-anchor="end">{:.0}/s</text>"##, pad - 4.0, top + 10.0, peak);
        let _ = writeln!(s, r##"<text x="{:.0}" y="{:.0}" text-anchor="end">0</text>"##, pad - 4.0, top + h);
        let _ = writeln!(
            s,
            r##"<text x="{:.0}" y="{:.0}" text-anchor="end">{seconds:.1} s</text>"##,
            pad + w,
            top + h + 14.0
        );
        if let Some(rate) = row.scenario.limited_rate() {
            let _ = writeln!(
                s,
                r##"<line x1="{pad}" x2="{:.0}" y1="{:.1}" y2="{:.1}" stroke="#000" stroke-dasharray="4 3"/>"##,
                pad + w,
                y(rate),
                y(rate)
            );
        }
        for (c, chain) in rates.iter().enumerate() {
            let points: Vec<String> =
                chain.iter().enumerate().map(|(b, v)| format!("{:.1},{:.1}", x(b), y(*v))).collect();
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.2" points="{}"/>"#,
                COLOURS[c % COLOURS.len()],
                points.join(" ")
            );
        }
    }
    s.push_str("</svg>\n");
    s
}
