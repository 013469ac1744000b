//! The one-click unsubscribe endpoint (RFC 8058), in plain HTTP terms.
//!
//! The link ([`crate::mail::unsubscribe_url`]) carries everything in its query: `list` (the
//! job), `r` (the address, base64url) and `sig` (HMAC-SHA256 with the job's secret). Its path
//! is ignored, so the same link works behind a Function URL, a custom domain in front of it,
//! or `baton serve`.
//!
//! - `POST` with `List-Unsubscribe=One-Click` (form-urlencoded, or multipart as RFC 8058
//!   prefers): a genuine link suppresses the address for its job; `200`.
//! - `GET` (a person following the link, or a scanner prefetching it): a page whose button
//!   POSTs; nothing is recorded, so prefetching unsubscribes nobody.
//! - A forged, truncated or other-secret link: `400`, nothing recorded. Answers never depend on
//!   whether the address is (or was) a recipient: it is never looked up.

use crate::engine::Engine;
use crate::engine::suppression::Unsubscribe;
use crate::text::html_escape;

/// Largest request body read (a one-click body is 26 bytes).
pub const MAX_BODY: usize = 64 * 1024;

/// An HTTP request, as the Function URL payload or axum gives it.
#[derive(Debug, Clone, Default)]
pub struct HttpRequest {
    pub method: String,
    /// The query string without `?`, as received (still percent-encoded).
    pub raw_query: String,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl HttpResponse {
    fn page(status: u16, title: &str, body_html: &str) -> HttpResponse {
        let html = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <meta name=\"robots\" content=\"noindex\"><title>{title}</title>\
             <style>body{{font:16px/1.5 system-ui,sans-serif;max-width:32rem;margin:4rem auto;padding:0 1rem}}\
             button{{font:inherit;padding:.5rem 1.25rem}}</style></head>\n<body><h1>{title}</h1>{body_html}</body></html>\n"
        );
        HttpResponse {
            status,
            headers: vec![
                ("content-type", "text/html; charset=utf-8".into()),
                ("cache-control", "no-store".into()),
                ("referrer-policy", "no-referrer".into()),
                ("x-content-type-options", "nosniff".into()),
                (
                    "content-security-policy",
                    "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'".into(),
                ),
            ],
            body: html,
        }
    }

    fn invalid_link() -> HttpResponse {
        HttpResponse::page(
            400,
            "This unsubscribe link is not valid",
            "<p>It may be incomplete: open the whole link from the message, or reply to the message to \
             unsubscribe.</p>",
        )
    }
}

/// The link's `list`, `r` and `sig`, if it has each once.
fn token(raw_query: &str) -> Option<(String, String, String)> {
    let (mut list, mut r, mut sig) = (None, None, None);
    for (name, value) in form_urlencoded::parse(raw_query.as_bytes()) {
        let slot = match name.as_ref() {
            "list" => &mut list,
            "r" => &mut r,
            "sig" => &mut sig,
            _ => continue,
        };
        if slot.replace(value.into_owned()).is_some() {
            return None; // a parameter given twice is not a link baton wrote
        }
    }
    Some((list?, r?, sig?))
}

/// Whether the body is RFC 8058's `List-Unsubscribe=One-Click`: multipart (as RFC 8058
/// prefers) or form-urlencoded, which some clients label otherwise or not at all. (The POST
/// and the signature are what make it safe; the body only shows the intent.)
fn is_one_click(request: &HttpRequest) -> bool {
    let content_type = request.header("content-type").unwrap_or("application/x-www-form-urlencoded");
    let essence = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    if essence == "multipart/form-data" {
        return multipart_boundary(content_type)
            .is_some_and(|boundary| multipart_has_one_click(&request.body, &boundary));
    }
    form_urlencoded::parse(request.body.trim_ascii())
        .any(|(name, value)| name == "List-Unsubscribe" && value == "One-Click")
}

fn multipart_boundary(content_type: &str) -> Option<String> {
    content_type.split(';').skip(1).find_map(|param| {
        let (name, value) = param.split_once('=')?;
        name.trim().eq_ignore_ascii_case("boundary").then(|| value.trim().trim_matches('"').to_owned())
    })
}

/// A `multipart/form-data` body with a part named `List-Unsubscribe` whose value is `One-Click`.
fn multipart_has_one_click(body: &[u8], boundary: &str) -> bool {
    let Ok(body) = std::str::from_utf8(body) else { return false };
    body.split(&format!("--{boundary}")).any(|part| {
        let Some((head, value)) = part.split_once("\r\n\r\n") else { return false };
        let named = head.lines().any(|line| {
            let line = line.to_ascii_lowercase();
            line.starts_with("content-disposition:")
                && line.split(';').any(|p| matches!(p.trim(), "name=\"list-unsubscribe\"" | "name=list-unsubscribe"))
        });
        named && value.trim() == "One-Click"
    })
}

/// Answers one request to the unsubscribe endpoint.
pub async fn handle(engine: &Engine, request: &HttpRequest) -> HttpResponse {
    let method = request.method.to_ascii_uppercase();
    if !matches!(method.as_str(), "GET" | "HEAD" | "POST") {
        let mut response = HttpResponse::page(405, "Method not allowed", "<p>Use the link in the message.</p>");
        response.headers.push(("allow", "GET, POST".into()));
        return response;
    }
    if request.body.len() > MAX_BODY {
        return HttpResponse::page(413, "Request too large", "<p>Use the link in the message.</p>");
    }
    let Some((list, r, sig)) = token(&request.raw_query) else {
        return HttpResponse::invalid_link();
    };
    if method != "POST" {
        return match engine.verify_unsubscribe(&list, &r, &sig) {
            // The form posts back to this very URL (an empty action), query and all.
            Some(_) => HttpResponse::page(
                200,
                "Unsubscribe?",
                &format!(
                    "<p>Stop receiving <b>{}</b> messages at this address.</p>\
                     <form method=\"post\" action=\"\"><input type=\"hidden\" name=\"List-Unsubscribe\" \
                     value=\"One-Click\"><button type=\"submit\">Unsubscribe</button></form>",
                    html_escape(&list)
                ),
            ),
            None => HttpResponse::invalid_link(),
        };
    }
    if !is_one_click(request) {
        return HttpResponse::page(
            400,
            "Not a one-click unsubscribe",
            "<p>The request body must be <code>List-Unsubscribe=One-Click</code> (RFC 8058).</p>",
        );
    }
    match engine.unsubscribe(&list, &r, &sig).await {
        Ok(Unsubscribe::Recorded) => HttpResponse::page(
            200,
            "You are unsubscribed",
            &format!("<p>You will get no more <b>{}</b> messages at this address.</p>", html_escape(&list)),
        ),
        Ok(Unsubscribe::Refused) => HttpResponse::invalid_link(),
        Err(e) => {
            tracing::error!(error = %e, "could not record an unsubscribe");
            let mut response = HttpResponse::page(
                503,
                "Please try again",
                "<p>Your request could not be recorded just now. Please try again in a minute.</p>",
            );
            response.headers.push(("retry-after", "60".into()));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(content_type: &str, body: &str) -> HttpRequest {
        HttpRequest {
            method: "POST".into(),
            headers: vec![("content-type".into(), content_type.into())],
            body: body.as_bytes().to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn one_click_bodies_are_recognised_in_both_encodings() {
        assert!(is_one_click(&post("application/x-www-form-urlencoded", "List-Unsubscribe=One-Click")));
        let multipart =
            "--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\nOne-Click\r\n--XyZ--\r\n";
        assert!(is_one_click(&post("multipart/form-data; boundary=\"XyZ\"", multipart)));
        assert!(is_one_click(&post("application/x-www-form-urlencoded", "List-Unsubscribe=One-Click\r\n")));
        assert!(is_one_click(&post("text/plain", "List-Unsubscribe=One-Click")));
        let unquoted = "--XyZ\r\nContent-Disposition: form-data; name=List-Unsubscribe\r\n\r\nOne-Click\n--XyZ--";
        assert!(is_one_click(&post("multipart/form-data; boundary=XyZ", unquoted)));
        assert!(!is_one_click(&post("application/x-www-form-urlencoded", "List-Unsubscribe=Maybe")));
        assert!(!is_one_click(&post("text/plain", "unsubscribe me")));
        assert!(!is_one_click(&post("application/x-www-form-urlencoded", "")));
        assert!(!is_one_click(&post("multipart/form-data; boundary=other", multipart)));
    }

    #[test]
    fn a_query_with_a_repeated_or_missing_part_is_no_token() {
        assert_eq!(token("list=a&r=b&sig=c"), Some(("a".into(), "b".into(), "c".into())));
        assert_eq!(token("list=a&r=b"), None);
        assert_eq!(token("list=a&r=b&sig=c&sig=d"), None);
    }

    #[test]
    fn page_text_is_escaped() {
        assert_eq!(html_escape("<b a=\"x\">&'\u{1b}"), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;\u{fffd}");
    }
}
