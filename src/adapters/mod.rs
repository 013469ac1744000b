//! The adapters behind the engine's ports, one folder per environment, as peers:
//!
//! - [`local`]: the embedded default (SQLite, the `.eml` outbox, the in-process Lambda model).
//! - [`postgres`]: a direct PostgreSQL connection (the test adapter, and a product feature for
//!   long-lived containers).
//! - [`aws`]: Aurora through the RDS Data API, SES v2, Lambda `Invoke`.
//!
//! The engine never names one of them; [`crate::compose`] chooses and builds them.

pub mod aws;
pub mod local;
pub mod postgres;
