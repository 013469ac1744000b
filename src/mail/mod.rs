//! Building newsletter messages: addresses, RFC 5322 bytes (`mail-builder`), and the signed
//! one-click unsubscribe link (RFC 8058: `List-Unsubscribe` + `List-Unsubscribe-Post`).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;
use sha2::Sha256;

/// Splits `Name <address>` or `address` and checks the address.
pub fn parse_mailbox(s: &str) -> Result<(Option<String>, String), String> {
    let s = s.trim();
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
    if addr.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{addr}` contains white space"));
    }
    match addr.parse::<email_address::EmailAddress>() {
        Ok(parsed) if parsed.domain().contains('.') => Ok(()),
        Ok(_) => Err(format!("`{addr}` has no dot in its domain")),
        Err(e) => Err(format!("`{addr}` is not a valid address: {e}")),
    }
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
    pub to_name: Option<&'a str>,
    pub subject: &'a str,
    pub text: Option<&'a str>,
    pub html: Option<&'a str>,
    pub unsubscribe_url: &'a str,
    pub message_id: &'a str,
    pub date: i64,
}

/// The complete RFC 5322 message.
pub fn build(m: &Message<'_>) -> std::io::Result<Vec<u8>> {
    let mut b = MessageBuilder::new()
        .from(match m.from.0 {
            Some(name) => (name, m.from.1).into(),
            None => mail_builder::headers::address::Address::from(m.from.1),
        })
        .to(match m.to_name {
            Some(name) if !name.is_empty() => (name, m.to).into(),
            _ => mail_builder::headers::address::Address::from(m.to),
        })
        .subject(m.subject)
        .message_id(m.message_id)
        .date(m.date)
        .header("List-Unsubscribe", Raw::new(format!("<{}>", m.unsubscribe_url)))
        .header("List-Unsubscribe-Post", Raw::new("List-Unsubscribe=One-Click"));
    if let Some(t) = m.text {
        b = b.text_body(t);
    }
    if let Some(h) = m.html {
        b = b.html_body(h);
    }
    b.write_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mailboxes_and_addresses() {
        assert_eq!(parse_mailbox("News <news@example.com>").unwrap(), (Some("News".into()), "news@example.com".into()));
        assert_eq!(parse_mailbox("a@b.co").unwrap(), (None, "a@b.co".into()));
        for bad in ["", "  ", "nobody", "a@b", "a b@c.com", "@example.com", "x@"] {
            assert!(check_address(bad).is_err(), "{bad:?} should be rejected");
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

    #[test]
    fn message_carries_one_click_unsubscribe_headers() {
        let raw = build(&Message {
            from: (Some("News"), "news@example.com"),
            to: "a@example.com",
            to_name: Some("Zoë"),
            subject: "Hello Zoë",
            text: Some("hi"),
            html: Some("<p>hi</p>"),
            unsubscribe_url: "https://x.test/u?r=1",
            message_id: "m1@baton",
            date: 0,
        })
        .unwrap();
        let s = String::from_utf8(raw).unwrap();
        assert!(s.contains("List-Unsubscribe: <https://x.test/u?r=1>\r\n"), "{s}");
        assert!(s.contains("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"));
        assert!(s.contains("Message-ID: <m1@baton>"));
    }
}
