//! `baton report`: one self-contained HTML page (inline CSS and SVG, no script, nothing fetched)
//! picturing a run from its [`Timeline`]: a lane per chain with its hops and pages over time,
//! coloured by outcome, restarts and duplicate deliveries marked, stuck chains and failures
//! highlighted; the send rate over time; the run's counts and each chain's detail.
//!
//! Every value from the database (job, run key, reasons, errors) is escaped for HTML and has its
//! control characters replaced, so a hostile value can neither inject markup nor break a line.

use std::fmt::Write;

use crate::engine::run::ChainStatus;
use crate::engine::state::State;
use crate::engine::timeline::{HopSpan, Timeline};

/// Plot geometry (pixels).
const LABEL_W: f64 = 120.0;
const PLOT_W: f64 = 1040.0;
const LANE_H: f64 = 36.0;
const AXIS_H: f64 = 26.0;
const RATE_H: f64 = 150.0;

/// Hop colours by outcome, with the legend's words.
const OUTCOMES: [(&str, &str, &str); 9] = [
    ("continued", "#4c8fd6", "handed over to the next hop"),
    ("ended", "#2e9d5b", "chain ended: no page left"),
    ("completed", "#17703a", "completed the run"),
    ("parked", "#d99a22", "parked (run pausing)"),
    ("stopped", "#7b7b7b", "stopped (run over)"),
    ("failed", "#c9302c", "failed the run"),
    ("error", "#e0524e", "hop failed with an error"),
    ("duplicate", "#8e44ad", "duplicate delivery, turned away"),
    ("", "#b9b9b9", "no end recorded: killed, crashed or still running"),
];

fn colour(outcome: Option<&str>) -> &'static str {
    let outcome = outcome.unwrap_or_default();
    OUTCOMES.iter().find(|(o, _, _)| *o == outcome).map_or("#b9b9b9", |(_, c, _)| c)
}

pub use crate::text::html_escape as esc;

/// The time range the page draws: the run's start to its end (or now).
struct Scale {
    from: i64,
    to: i64,
}

impl Scale {
    fn x(&self, at_ms: i64) -> f64 {
        let span = (self.to - self.from).max(1) as f64;
        LABEL_W + (at_ms.clamp(self.from, self.to) - self.from) as f64 / span * PLOT_W
    }
}

/// The whole page.
pub fn html(t: &Timeline) -> String {
    let s = &t.status;
    let last = t.hops.iter().filter_map(|h| h.ended_at_ms.or(Some(h.started_at_ms))).max().unwrap_or(s.created_at_ms);
    let to = s.finished_at_ms.unwrap_or(t.now_ms).max(last).max(s.created_at_ms + 1000);
    let scale = Scale { from: s.created_at_ms, to };
    let mut page = String::new();
    let title = format!("baton report: {} {} ({})", esc(&s.job), esc(&s.run_key), esc(&s.run_id));
    let _ = write!(
        page,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\n<style>{CSS}</style></head>\n<body>\n<h1>{title}</h1>\n"
    );
    page.push_str(&summary(t));
    page.push_str("<h2>Chains over time</h2>\n");
    page.push_str(&lanes(t, &scale));
    page.push_str(&legend());
    page.push_str("<h2>Items settled per second</h2>\n");
    page.push_str(&rate(t, &scale));
    page.push_str("<h2>Chains</h2>\n");
    page.push_str(&chain_table(&s.chains));
    page.push_str("</body></html>\n");
    page
}

const CSS: &str = "body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}\
h2{font-size:16px;margin-top:28px}table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;\
text-align:left}.num{text-align:right}.bad{color:#c9302c;font-weight:600}.ok{color:#17703a;font-weight:600}\
.legend span{display:inline-block;margin-right:14px}.sw{display:inline-block;width:12px;height:12px;margin-right:4px;\
vertical-align:-1px}svg{display:block}code{font-size:12px}";

fn summary(t: &Timeline) -> String {
    let s = &t.status;
    let good = s.status.as_str() == "succeeded";
    let duplicates = t.hops.iter().filter(|h| h.outcome.as_deref() == Some("duplicate")).count();
    let unended = t.hops.iter().filter(|h| h.ended_at_ms.is_none()).count();
    let errors = t.hops.iter().filter(|h| matches!(h.outcome.as_deref(), Some("error" | "failed"))).count();
    let restarts: i64 = s.chains.iter().map(|c| c.restarts).sum();
    let stuck = s.chains.iter().filter(|c| c.stuck).count();
    let mut out = format!(
        "<p>Status <span class=\"{}\">{}</span>{}</p>\n<table><tr>",
        if good { "ok" } else { "bad" },
        esc(s.status.as_str()),
        s.reason.as_deref().map(|r| format!(": {}", esc(r))).unwrap_or_default()
    );
    let cells: [(&str, i64); 16] = [
        ("items", s.total),
        ("done", s.done),
        ("failed", s.failed),
        ("skipped", s.skipped),
        ("unknown", s.unknown),
        ("pending", s.pending + s.claimed),
        ("pages", s.pages_done),
        ("hops", t.hops.len() as i64 - duplicates as i64),
        ("duplicates", duplicates as i64),
        ("restarts", restarts),
        ("no end", unended as i64),
        ("hop errors", errors as i64),
        ("stuck chains", stuck as i64),
        ("SES delivered", s.mail.delivered),
        ("SES bounced", s.mail.hard_bounced + s.mail.soft_bounced),
        ("SES complaints", s.mail.complained),
    ];
    for (name, _) in &cells {
        let _ = write!(out, "<th>{name}</th>");
    }
    out.push_str("<th>elapsed</th></tr><tr>");
    for (name, value) in &cells {
        let bad =
            *value > 0 && matches!(*name, "failed" | "unknown" | "hop errors" | "stuck chains" | "SES complaints");
        let _ = write!(out, "<td class=\"num{}\">{value}</td>", if bad { " bad" } else { "" });
    }
    let _ = writeln!(out, "<td class=\"num\">{:.1} s</td></tr></table>", s.elapsed_ms as f64 / 1000.0);
    out
}

/// A lane per chain: hops as bars coloured by outcome, the pages they worked as thin bars below,
/// a diamond per duplicate delivery, a circled R where the sweeper restarted the chain.
fn lanes(t: &Timeline, scale: &Scale) -> String {
    let chains = t.status.chains.len().max(1);
    let height = AXIS_H + LANE_H * chains as f64 + 4.0;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{height}\" role=\"img\" aria-label=\"hops per chain over time\">\n",
        LABEL_W + PLOT_W + 10.0
    );
    axis(&mut svg, scale, height);
    for (i, chain) in t.status.chains.iter().enumerate() {
        let y = AXIS_H + LANE_H * i as f64;
        let fill = if i % 2 == 0 { "#f6f7f9" } else { "#ffffff" };
        let _ =
            writeln!(svg, "<rect x=\"{LABEL_W}\" y=\"{y}\" width=\"{PLOT_W}\" height=\"{LANE_H}\" fill=\"{fill}\"/>");
        let (label_colour, mark) = if chain.stuck { ("#c9302c", " STUCK") } else { ("#222", "") };
        let _ = writeln!(
            svg,
            "<text x=\"4\" y=\"{}\" fill=\"{label_colour}\" font-size=\"13\" font-weight=\"{}\">chain {}{mark}</text>",
            y + 22.0,
            if chain.stuck { 700 } else { 400 },
            chain.chain
        );
        let hops: Vec<&HopSpan> = t.hops.iter().filter(|h| h.chain == chain.chain).collect();
        draw_hops(&mut svg, &hops, scale, y, t.now_ms);
        for page in t.pages.iter().filter(|p| p.chain == Some(chain.chain)) {
            let (x0, x1) = (scale.x(page.claimed_at_ms), scale.x(page.finished_at_ms.unwrap_or(t.now_ms)));
            let colour = if page.status == "done" { "#1f4e79" } else { "#d99a22" };
            let _ = writeln!(
                svg,
                "<rect x=\"{x0:.1}\" y=\"{}\" width=\"{:.1}\" height=\"5\" fill=\"{colour}\"><title>page {} ({} items, {}, attempt {})</title></rect>",
                y + 27.0,
                (x1 - x0).max(1.0),
                page.page,
                page.items,
                esc(&page.status),
                page.attempts
            );
        }
        if chain.stuck {
            let _ = writeln!(
                svg,
                "<rect x=\"{LABEL_W}\" y=\"{y}\" width=\"{PLOT_W}\" height=\"{LANE_H}\" fill=\"none\" stroke=\"#c9302c\" stroke-width=\"2\"/>"
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn draw_hops(svg: &mut String, hops: &[&HopSpan], scale: &Scale, y: f64, now_ms: i64) {
    let mut restarts = 0;
    for (i, hop) in hops.iter().enumerate() {
        let x0 = scale.x(hop.started_at_ms);
        let tip = |what: &str| {
            format!(
                "<title>hop {} {what}{}</title>",
                hop.hop,
                hop.trace_id.as_deref().map(|t| format!(", trace {}", esc(t))).unwrap_or_default()
            )
        };
        if hop.outcome.as_deref() == Some("duplicate") {
            let _ = writeln!(
                svg,
                "<path d=\"M{x0:.1} {} l4 4 l-4 4 l-4 -4 z\" fill=\"#8e44ad\">{}</path>",
                y + 1.0,
                tip("duplicate delivery")
            );
            continue;
        }
        // A hop without an end lasted until its chain's next hop started (or until now).
        let next = hops[i + 1..].iter().find(|h| h.outcome.as_deref() != Some("duplicate")).map(|h| h.started_at_ms);
        let end = hop.ended_at_ms.or(next).unwrap_or(now_ms);
        let width = (scale.x(end) - x0).max(1.5);
        let outcome = hop.outcome.as_deref().unwrap_or("no end recorded");
        let dash = if hop.ended_at_ms.is_none() { " stroke=\"#555\" stroke-dasharray=\"3 2\"" } else { "" };
        let _ = writeln!(
            svg,
            "<rect x=\"{x0:.1}\" y=\"{}\" width=\"{width:.1}\" height=\"16\" rx=\"2\" fill=\"{}\"{dash}>{}</rect>",
            y + 9.0,
            colour(hop.outcome.as_deref()),
            tip(&format!("{}: {} pages", esc(outcome), hop.pages))
        );
        if hop.restarts > restarts {
            let _ = writeln!(
                svg,
                "<circle cx=\"{x0:.1}\" cy=\"{}\" r=\"6\" fill=\"#fff\" stroke=\"#c9302c\" stroke-width=\"2\"><title>restarted by the sweeper at hop {}</title></circle><text x=\"{:.1}\" y=\"{}\" font-size=\"9\" fill=\"#c9302c\" font-weight=\"700\">R</text>",
                y + 17.0,
                hop.hop,
                x0 - 3.0,
                y + 20.5
            );
        }
        restarts = restarts.max(hop.restarts);
    }
}

/// A time axis: a tick every "nice" interval.
fn axis(svg: &mut String, scale: &Scale, height: f64) {
    let span_s = (scale.to - scale.from) as f64 / 1000.0;
    let step = [0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0]
        .into_iter()
        .find(|s| span_s / s <= 12.0)
        .unwrap_or(7200.0);
    let mut at = 0.0;
    while at <= span_s + 1e-9 {
        let x = scale.x(scale.from + (at * 1000.0) as i64);
        let _ = writeln!(
            svg,
            "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{height}\" stroke=\"#ddd\"/><text x=\"{x:.1}\" y=\"14\" font-size=\"11\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            AXIS_H - 6.0,
            seconds(at)
        );
        at += step;
    }
}

fn seconds(s: f64) -> String {
    if s >= 60.0 { format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64) } else { format!("{s:.1}s") }
}

fn legend() -> String {
    let mut out = String::from("<p class=\"legend\">");
    for (_, colour, words) in OUTCOMES {
        let _ = write!(out, "<span><i class=\"sw\" style=\"background:{colour}\"></i>{words}</span>");
    }
    out.push_str(
        "<span><i class=\"sw\" style=\"background:#1f4e79;height:5px\"></i>page done</span>\
         <span><i class=\"sw\" style=\"background:#d99a22;height:5px\"></i>page released</span>\
         <span>R: restarted by the sweeper</span><span>red lane: stuck chain</span></p>\n",
    );
    out
}

/// Items done (and failed) per second, per bucket of the timeline.
fn rate(t: &Timeline, scale: &Scale) -> String {
    let per_s = |n: i64| n as f64 * 1000.0 / t.bucket_ms as f64;
    let peak = t.settled.iter().map(|b| per_s(b.done + b.failed)).fold(1.0, f64::max);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" role=\"img\" aria-label=\"items settled per second\">\n",
        LABEL_W + PLOT_W + 10.0,
        RATE_H + 20.0
    );
    let y = |v: f64| 10.0 + RATE_H - v / peak * RATE_H;
    let _ = writeln!(
        svg,
        "<text x=\"4\" y=\"16\" font-size=\"11\" fill=\"#555\">{peak:.0}/s</text><text x=\"4\" y=\"{}\" font-size=\"11\" fill=\"#555\">0</text><line x1=\"{LABEL_W}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#999\"/>",
        RATE_H + 10.0,
        RATE_H + 10.0,
        LABEL_W + PLOT_W,
        RATE_H + 10.0
    );
    let width = (scale.x(scale.from + t.bucket_ms) - LABEL_W).max(1.0);
    for b in &t.settled {
        let x = scale.x(b.at_ms);
        let (done, failed) = (per_s(b.done), per_s(b.failed + b.unknown));
        let _ = writeln!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"#4c8fd6\"><title>{done:.0}/s done</title></rect>",
            y(done),
            RATE_H + 10.0 - y(done)
        );
        if failed > 0.0 {
            let _ = writeln!(
                svg,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"#c9302c\"><title>{failed:.0}/s failed or unknown</title></rect>",
                y(done + failed),
                y(done) - y(done + failed)
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

fn chain_table(chains: &[ChainStatus]) -> String {
    let mut out = String::from(
        "<table><tr><th>chain</th><th>status</th><th>hops</th><th>budget</th><th>restarts</th><th>lost at hops</th>\
         <th>heartbeat age</th><th>last error</th><th>last trace id</th></tr>\n",
    );
    for c in chains {
        let lost: Vec<String> = c.lost_at_hops.iter().map(i64::to_string).collect();
        let _ = writeln!(
            out,
            "<tr{}><td>{}</td><td>{}{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td><td class=\"num\">{:.1} s</td><td>{}</td><td><code>{}</code></td></tr>",
            if c.stuck { " class=\"bad\"" } else { "" },
            c.chain,
            esc(c.status.as_str()),
            if c.stuck { " (STUCK)" } else { "" },
            c.hops,
            c.hop_budget,
            c.restarts,
            lost.join(", "),
            c.heartbeat_age_ms as f64 / 1000.0,
            c.last_error.as_deref().map(esc).unwrap_or_default(),
            c.last_trace_id.as_deref().map(esc).unwrap_or_default()
        );
    }
    out.push_str("</table>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::esc;

    #[test]
    fn values_from_data_cannot_inject_markup_or_break_lines() {
        assert_eq!(esc("<script>a&b\"'</script>"), "&lt;script&gt;a&amp;b&quot;&#39;&lt;/script&gt;");
        assert_eq!(esc("a\r\nb\u{1b}[31m\u{202e}"), "a\u{fffd}\u{fffd}b\u{fffd}[31m\u{fffd}");
    }
}
