//! Building newsletter messages: addresses, RFC 5322 bytes (`mail-builder`), and the signed
//! one-click unsubscribe link (RFC 8058: `List-Unsubscribe` + `List-Unsubscribe-Post`).
//!
//! Nothing from data reaches a header raw: header text ([`header_text`]) has its control
//! characters (CR, LF, NUL, ESC, ...) folded into spaces and is RFC 2047-encoded by
//! `mail-builder`; addresses are checked and their domains IDNA-encoded ([`deliverable`]);
//! display names and the unsubscribe base come from the validated config, which refuses control
//! characters. `tests/engine/mime.rs` parses hostile messages with an independent parser.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;
use sha2::Sha256;

/// Splits `Name <address>` or `address` and checks the address.
pub fn parse_mailbox(s: &str) -> Result<(Option<String>, String), String> {
    let s = s.trim();
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        return Err(format!("contains the control character {:?}; a header cannot carry it", c));
    }
    let (name, addr) = match (s.rfind('<'), s.ends_with('>')) {
        (Some(open), true) => {
            let name = s[..open].trim().trim_matches('"').trim();
            (if name.is_empty() { None } else { Some(name.to_owned()) }, s[open + 1..s.len() - 1].trim())
        }
        _ => (None, s),
    };
    check_address(addr)?;
    Ok((name, addr.to_owned()))
}

/// Why an address cannot be mailed, if it cannot.
pub fn check_address(addr: &str) -> Result<(), String> {
    if addr.trim().is_empty() {
        return Err("the address is empty".into());
    }
    let shown = crate::text::printable_short(addr);
    if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{shown}` contains white space or control characters"));
    }
    if let Some(c) = addr.chars().find(|c| crate::text::is_invisible(*c)) {
        return Err(format!("`{shown}` contains the invisible character U+{:04X}", c as u32));
    }
    // Quoted local parts, comments and domain literals are legal but carry header syntax; SES
    // and most receivers refuse them anyway.
    if let Some(c) = addr.chars().find(|c| "\"<>,;:()\\[]".contains(*c)) {
        return Err(format!("`{shown}` contains {c:?}, which baton does not send to (quoted or commented addresses)"));
    }
    match addr.parse::<email_address::EmailAddress>() {
        Ok(parsed) if parsed.domain().contains('.') => Ok(()),
        Ok(_) => Err(format!("`{shown}` has no dot in its domain")),
        Err(e) => Err(format!("`{shown}` is not a valid address: {e}")),
    }
}

/// Longest subject kept (RFC 5322's line limit; `mail-builder` folds and encodes within it).
pub const MAX_SUBJECT_CHARS: usize = 998;

/// Text fit for an unstructured header: every run of control characters (CR, LF, TAB, NUL, ESC,
/// NEL, ...) and Unicode line or paragraph separators becomes one space, so data can neither
/// start a header of its own nor end the header block; trimmed and cut to
/// [`MAX_SUBJECT_CHARS`].
pub fn header_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(MAX_SUBJECT_CHARS));
    let mut gap = false;
    for c in s.chars() {
        if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
            gap = true;
            continue;
        }
        if gap && !out.is_empty() {
            out.push(' ');
        }
        gap = false;
        out.push(c);
    }
    let out = out.trim();
    match out.char_indices().nth(MAX_SUBJECT_CHARS) {
        Some((cut, _)) => out[..cut].trim_end().to_owned(),
        None => out.to_owned(),
    }
}

/// The address as it goes on the wire, or why it cannot be mailed: checked by
/// [`check_address`], its domain IDNA-encoded (`zoë@bücher.de` goes out as
/// `zoë@xn--bcher-kva.de`), and a local part that is not ASCII refused unless `smtputf8` (it
/// needs the SMTPUTF8 extension, which SES and many receivers do not offer).
pub fn deliverable(addr: &str, smtputf8: bool) -> Result<String, String> {
    let addr = addr.trim();
    check_address(addr)?;
    let (local, domain) = addr.rsplit_once('@').ok_or_else(|| format!("`{addr}` has no @"))?;
    if !local.is_ascii() && !smtputf8 {
        return Err(format!(
            "the local part `{local}` is not ASCII and needs SMTPUTF8 (set `smtputf8 = true` if your provider \
             and your recipients' servers accept it)"
        ));
    }
    let domain = idna::domain_to_ascii(domain).map_err(|e| format!("the domain of `{addr}` is not valid IDNA: {e}"))?;
    Ok(format!("{local}@{domain}"))
}

/// The forms under which an address goes on the suppression list, or why it cannot: trimmed
/// and lower-cased (as the page load compares, `LOWER(TRIM(email))`), and for an
/// internationalised domain both its Unicode and its ASCII (`xn--`) form, so a source holding
/// either form matches. The first form is the address as SES reports it (ASCII domain).
pub fn suppression_keys(addr: &str) -> Result<Vec<String>, String> {
    let addr = addr.trim();
    check_address(addr)?;
    let (local, domain) = addr.rsplit_once('@').ok_or_else(|| format!("`{addr}` has no @"))?;
    let local = local.to_lowercase();
    let ascii = idna::domain_to_ascii(domain).map_err(|e| format!("the domain of `{addr}` is not valid IDNA: {e}"))?;
    let (unicode, _) = idna::domain_to_unicode(&ascii);
    let mut keys = vec![format!("{local}@{ascii}")];
    let unicode = format!("{local}@{}", unicode.to_lowercase());
    if unicode != keys[0] {
        keys.push(unicode);
    }
    Ok(keys)
}

type HmacSha256 = Hmac<Sha256>;

fn unsubscribe_signature(secret: &str, job: &str, address: &str) -> String {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(b"baton-unsubscribe\0");
    mac.update(job.as_bytes());
    mac.update(b"\0");
    mac.update(address.to_ascii_lowercase().as_bytes());
    URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes())
}

/// The per-recipient unsubscribe URL: `base?list=JOB&r=BASE64(address)&sig=HMAC`.
pub fn unsubscribe_url(base: &str, secret: &str, job: &str, address: &str) -> String {
    let sep = if base.contains('?') { '&' } else { '?' };
    format!(
        "{base}{sep}list={job}&r={}&sig={}",
        URL_SAFE_NO_PAD.encode(address.as_bytes()),
        unsubscribe_signature(secret, job, address)
    )
}

/// Checks an unsubscribe request's `r` and `sig`; returns the address it is for.
pub fn verify_unsubscribe(secret: &str, job: &str, r: &str, sig: &str) -> Option<String> {
    let address = String::from_utf8(URL_SAFE_NO_PAD.decode(r).ok()?).ok()?;
    let expected = unsubscribe_signature(secret, job, &address);
    // Constant-time comparison through the MAC's own verifier.
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(expected.as_bytes());
    let a = mac.finalize().into_bytes();
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(sig.as_bytes());
    mac.verify_slice(&a).ok()?;
    Some(address)
}

pub struct Message<'a> {
    pub from: (Option<&'a str>, &'a str),
    pub to: &'a str,
    pub subject: &'a str,
    pub text: Option<&'a str>,
    pub html: Option<&'a str>,
    pub unsubscribe_url: &'a str,
    pub message_id: &'a str,
    pub date: i64,
}

/// The complete RFC 5322 message.
pub fn build(m: &Message<'_>) -> std::io::Result<Vec<u8>> {
    let from_name = m.from.0.map(header_text).filter(|n| !n.is_empty());
    let mut b = MessageBuilder::new()
        .from(match &from_name {
            Some(name) => (name.as_str(), m.from.1).into(),
            None => mail_builder::headers::address::Address::from(m.from.1),
        })
        .to(mail_builder::headers::address::Address::from(m.to))
        .header("Subject", subject_header(m.subject))
        .message_id(m.message_id)
        .date(m.date)
        .header("List-Unsubscribe", Raw::new(format!("<{}>", url_for_header(m.unsubscribe_url)?)))
        .header("List-Unsubscribe-Post", Raw::new("List-Unsubscribe=One-Click"));
    if let Some(t) = m.text {
        b = b.text_body(t);
    }
    if let Some(h) = m.html {
        b = b.html_body(h);
    }
    b.write_to_vec()
}

/// The subject header: [`header_text`], RFC 2047-encoded by `mail-builder`, except that text
/// which itself looks like an encoded word (`=?utf-8?B?...?=`) is always encoded, so a reader
/// shows it as typed instead of decoding it into something else.
fn subject_header(subject: &str) -> mail_builder::headers::HeaderType<'static> {
    let text = header_text(subject);
    if !text.contains("=?") {
        return mail_builder::headers::text::Text::new(text).into();
    }
    // Encoded words of at most 45 bytes (60 encoded), split on character boundaries, folded.
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(format!("=?utf-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(&chunk)));
            chunk.clear();
        }
        chunk.push(c);
    }
    words.push(format!("=?utf-8?B?{}?=", base64::engine::general_purpose::STANDARD.encode(&chunk)));
    Raw::new(words.join("\r\n ")).into()
}

/// A URL bound for a header inside `<...>`: refused if it holds anything that could end the
/// header or the bracket (the config check refuses such a base already; this is the backstop).
fn url_for_header(url: &str) -> std::io::Result<&str> {
    match url.chars().find(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"')) {
        Some(c) => Err(std::io::Error::other(format!("the unsubscribe URL contains {c:?}"))),
        None => Ok(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes_and_addresses() {
        assert_eq!(parse_mailbox("News <news@example.com>").unwrap(), (Some("News".into()), "news@example.com".into()));
        assert_eq!(parse_mailbox("a@b.co").unwrap(), (None, "a@b.co".into()));
        for bad in ["", "  ", "nobody", "a@b", "a b@c.com", "@example.com", "x@", "\"a>,b\"@x.com", "a(c)@x.com"] {
            assert!(check_address(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn suppression_keys_fold_case_and_keep_both_forms_of_a_domain() {
        assert_eq!(suppression_keys("  Ann.Lee@Example.COM ").unwrap(), vec!["ann.lee@example.com"]);
        let both = vec!["zoë@xn--bcher-kva.de".to_owned(), "zoë@bücher.de".to_owned()];
        assert_eq!(suppression_keys("Zoë@Bücher.de").unwrap(), both);
        assert_eq!(suppression_keys("zoë@xn--bcher-kva.de").unwrap(), both);
        for bad in [
            "",
            "no-at-sign",
            "a@b\r\nBcc: x@y",
            "two@@example.com",
            "\u{feff}ann@example.com",
            "an\u{200b}n@example.com",
        ] {
            assert!(suppression_keys(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn unsubscribe_tokens_verify_and_resist_tampering() {
        let url = unsubscribe_url("https://x.test/u", "0123456789abcdef", "news", "Zoë@example.com");
        let q: std::collections::HashMap<_, _> =
            url.split_once('?').unwrap().1.split('&').map(|kv| kv.split_once('=').unwrap()).collect();
        assert_eq!(
            verify_unsubscribe("0123456789abcdef", "news", q["r"], q["sig"]).as_deref(),
            Some("Zoë@example.com")
        );
        assert!(verify_unsubscribe("0123456789abcdeX", "news", q["r"], q["sig"]).is_none());
        assert!(verify_unsubscribe("0123456789abcdef", "other", q["r"], q["sig"]).is_none());
        let other = URL_SAFE_NO_PAD.encode("eve@example.com");
        assert!(verify_unsubscribe("0123456789abcdef", "news", &other, q["sig"]).is_none());
    }

    fn sample() -> Message<'static> {
        Message {
            from: (Some("News"), "news@example.com"),
            to: "a@example.com",
            subject: "Hello Zoë",
            text: Some("hi"),
            html: Some("<p>hi</p>"),
            unsubscribe_url: "https://x.test/u?r=1",
            message_id: "m1@baton",
            date: 0,
        }
    }

    #[test]
    fn message_carries_one_click_unsubscribe_headers() {
        let raw = build(&sample()).unwrap();
        let s = String::from_utf8(raw).unwrap();
        assert!(s.contains("List-Unsubscribe: <https://x.test/u?r=1>\r\n"), "{s}");
        assert!(s.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"));
        assert!(s.contains("Message-ID: <m1@baton>"));
    }

    #[test]
    fn a_subject_that_looks_encoded_is_encoded() {
        let raw = build(&Message { subject: "=?utf-8?B?QmNj?=", ..sample() }).unwrap();
        let s = String::from_utf8(raw).unwrap();
        assert!(s.contains("Subject: =?utf-8?B?PT91dGYtOD9CP1FtTmo/PQ==?=\r\n"), "{s}");
    }

    #[test]
    fn header_text_folds_control_characters() {
        assert_eq!(header_text("Eve\r\nBcc: x@evil.com"), "Eve Bcc: x@evil.com");
        assert_eq!(header_text("a\r\n\r\nbody\0\u{1b}[2J"), "a body [2J");
        assert_eq!(header_text("  \tZoë\u{2028}ü  "), "Zoë ü");
        assert_eq!(header_text(&"x".repeat(5000)).len(), MAX_SUBJECT_CHARS);
    }

    #[test]
    fn deliverable_addresses_are_ascii_on_the_wire() {
        assert_eq!(deliverable("zoe@bücher.de", false).unwrap(), "zoe@xn--bcher-kva.de");
        assert!(deliverable("zoë@example.com", false).unwrap_err().contains("SMTPUTF8"));
        assert_eq!(deliverable("zoë@example.com", true).unwrap(), "zoë@example.com");
        assert!(deliverable("a\r\nBcc: x@y.com", false).is_err());
        assert!(parse_mailbox("News\r\nBcc: x@y.com <n@example.com>").unwrap_err().contains("control"));
    }
}
