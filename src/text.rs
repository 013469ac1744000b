//! Text from data (recipients' names, keys, reasons, SQL) made safe to show on a terminal or in
//! a message: control characters (ESC, CR, LF, ...) and bidirectional overrides escaped, so a
//! hostile value can neither move the cursor, fake lines nor reorder what is shown. (Headers
//! are another matter: [`crate::mail::header_text`].)

/// `s` with its control characters escaped (`\r`, `\n`, `\u{1b}`), and bidirectional
/// overrides and line separators too (`\u{202e}`): they reorder or break what the terminal
/// shows (CVE-2021-42574, "Trojan Source").
pub fn printable(s: &str) -> String {
    s.chars()
        .flat_map(|c| match c {
            c if c.is_control() => c.escape_default().collect::<Vec<_>>(),
            c if is_bidi_control(c) => c.escape_unicode().collect(),
            c => vec![c],
        })
        .collect()
}

/// Bidirectional overrides and line separators: they reorder or break what is shown.
pub fn is_bidi_control(c: char) -> bool {
    matches!(c, '\u{200E}' | '\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{2028}' | '\u{2029}')
}

/// Characters that show as nothing (zero-width spaces and joiners, the byte-order mark, the
/// soft hyphen, word joiners) or reorder text: an address holding one is not what it looks like.
pub fn is_invisible(c: char) -> bool {
    is_bidi_control(c) || matches!(c, '\u{00AD}' | '\u{200B}'..='\u{200D}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}')
}

/// HTML-escaped, control characters and bidirectional overrides replaced (a value from data
/// never breaks a page: the run report, the unsubscribe pages).
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() || is_bidi_control(c) => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// [`printable`] for multi-line text: line breaks and tabs kept, every other control character
/// and bidirectional override escaped.
pub fn printable_text(s: &str) -> String {
    s.split('\n')
        .map(|line| line.split('\t').map(|part| printable(part.trim_end_matches('\r'))).collect::<Vec<_>>().join("\t"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// At most 40 characters of `s`, [`printable`]: a value quoted inside a message.
pub fn printable_short(s: &str) -> String {
    printable_at_most(s, 40)
}

/// At most `max` characters of `s` (an ellipsis says when it was cut), [`printable`].
pub fn printable_at_most(s: &str, max: usize) -> String {
    let cut: String = s.chars().take(max).collect();
    let more = if cut.len() < s.len() { "…" } else { "" };
    format!("{}{more}", printable(&cut))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_from_data_are_escaped() {
        assert_eq!(printable("Eve\u{1b}[2J\r\nBcc: x"), "Eve\\u{1b}[2J\\r\\nBcc: x");
        assert_eq!(printable("a\u{202E}b"), "a\\u{202e}b");
        assert_eq!(printable("Zoë 田中"), "Zoë 田中");
        assert_eq!(printable_text("a\r\n\tb\u{1b}[2J"), "a\n\tb\\u{1b}[2J");
        assert_eq!(printable_short(&"k".repeat(50)), format!("{}…", "k".repeat(40)));
    }
}
