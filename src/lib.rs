//! baton runs large batch jobs on AWS Lambda as self-invoking worker chains, and the same
//! engine on one machine with no AWS at all (the embedded default).
//!
//! Map of the crate:
//!
//! - [`engine`]: the chain protocol (planning, fork-proof hops, leases, item claims, kill
//!   switch, hop budget, sweeper, completion) and the event types. Generic over the ports.
//! - [`ports`]: the next-hop, mail and clock ports; [`sql`]: the SQL port, every statement,
//!   and the schema migrations.
//! - [`jobs`]: job kinds: `newsletter` (render + send mail) and `sql` (one statement per page).
//! - [`mail`]: message building and signed one-click unsubscribe links.
//! - [`local`]: the embedded adapters (SQLite, in-process Lambda model, outbox) and the driver
//!   that runs a local run to its end.
//! - [`adapters`]: adapters for other environments: direct PostgreSQL, and the AWS adapters
//!   (RDS Data API, SES v2, Lambda Invoke).
//! - [`lambda`]: Lambda mode, the binary as a Lambda bootstrap.
//! - [`config`]: the typed, validated `baton.toml`.
//! - [`cli`]: the `baton` command line.
//! - [`text`]: data made safe to show on a terminal or in a message.

pub mod adapters;
pub mod cli;
pub mod config;
pub mod engine;
pub mod jobs;
pub mod lambda;
pub mod local;
pub mod mail;
pub mod ports;
pub mod sql;
pub mod text;
