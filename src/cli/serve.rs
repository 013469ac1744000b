//! `baton serve`: the one-click unsubscribe endpoint over HTTP on this machine, the same handler
//! a Lambda Function URL runs ([`crate::inbound::unsubscribe`]), on axum.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use crate::engine::Engine;
use crate::inbound::{HttpRequest, unsubscribe};

/// Where `baton serve` listens unless told otherwise (the demo's links point here).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8025";

/// Serves until Ctrl-C. The first line on stdout names the address (`--listen 127.0.0.1:0`
/// picks a free port).
pub async fn serve(engine: Arc<Engine>, listen: SocketAddr) -> Result<()> {
    if engine.config().jobs.values().all(|j| j.newsletter.is_none()) {
        eprintln!("warning: the config has no newsletter job, so no link can be verified: every request gets 400");
    }
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    println!("serving one-click unsubscribes on http://{address}/ (any path; Ctrl-C stops)");
    let app = axum::Router::new().fallback(answer).with_state(engine);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("the server stopped")
}

async fn answer(
    State(engine): State<Arc<Engine>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = HttpRequest {
        method: method.as_str().to_owned(),
        raw_query: uri.query().unwrap_or_default().to_owned(),
        headers: headers
            .iter()
            .filter_map(|(name, value)| Some((name.as_str().to_owned(), value.to_str().ok()?.to_owned())))
            .collect(),
        body: body.to_vec(),
    };
    let response = unsubscribe::handle(&engine, &request).await;
    let status = StatusCode::from_u16(response.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut reply = (status, response.body).into_response();
    for (name, value) in response.headers {
        if let Ok(value) = value.parse() {
            reply.headers_mut().insert(name, value);
        }
    }
    reply
}
