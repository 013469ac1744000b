//! Lambda Function URL requests and responses (payload format version 2.0, the format Function
//! URLs use: AWS Lambda Developer Guide, "Invoking Lambda function URLs", request and response
//! payloads).

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::unsubscribe::{HttpRequest, HttpResponse, MAX_BODY};

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Payload {
    #[serde(default)]
    raw_query_string: String,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    is_base64_encoded: bool,
    request_context: RequestContext,
}

#[derive(Deserialize)]
struct RequestContext {
    http: Http,
}

#[derive(Deserialize)]
struct Http {
    method: String,
}

/// Whether the payload is a Function URL request: `"version": "2.0"` with a
/// `requestContext.http` (baton's own events have neither).
fn looks_like_one(payload: &serde_json::Value) -> bool {
    payload.get("version").and_then(|v| v.as_str()) == Some("2.0")
        && payload.pointer("/requestContext/http").is_some_and(|h| h.is_object())
}

/// The request, if the payload is a Function URL request: `Err` says why its parts cannot be read.
pub fn request(payload: &serde_json::Value) -> Option<Result<HttpRequest, String>> {
    if !looks_like_one(payload) {
        return None;
    }
    Some(read(payload))
}

fn read(payload: &serde_json::Value) -> Result<HttpRequest, String> {
    let p = Payload::deserialize(payload).map_err(|e| format!("not a Function URL request: {e}"))?;
    let body = match (p.body, p.is_base64_encoded) {
        (None, _) => Vec::new(),
        (Some(b), false) => b.into_bytes(),
        (Some(b), true) if b.len() > MAX_BODY * 4 / 3 + 4 => return Err("the request body is too large".into()),
        (Some(b), true) => STANDARD.decode(b).map_err(|e| format!("the request body is not valid base64: {e}"))?,
    };
    Ok(HttpRequest {
        method: p.request_context.http.method,
        raw_query: p.raw_query_string,
        headers: p.headers.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect(),
        body,
    })
}

/// The Function URL response payload for `response`.
pub fn response(response: &HttpResponse) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> =
        response.headers.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(v.as_str()))).collect();
    serde_json::json!({
        "statusCode": response.status,
        "headers": headers,
        "body": response.body,
        "isBase64Encoded": false,
    })
}

/// A Function URL answer for a request whose parts could not be read.
pub fn bad_request(why: &str) -> serde_json::Value {
    tracing::warn!(why, "unreadable Function URL request");
    response(&HttpResponse {
        status: 400,
        headers: vec![("content-type", "text/plain; charset=utf-8".into())],
        body: "Bad request\n".into(),
    })
}
