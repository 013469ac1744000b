//! baton runs large batch jobs on AWS Lambda as self-invoking worker chains, and the same
//! engine on one machine with no AWS at all (the embedded default).
//!
//! Map of the crate, from the protocol outwards:
//!
//! - [`engine`]: the chain protocol (start and planning, fork-proof hops, leases, item claims,
//!   kill switch, hop budget, sweeper, control, status) and the event types. Generic over the
//!   ports; it names no adapter and no AWS crate (a test greps for it).
//! - [`ports`]: the next-hop, mail and clock ports; [`sql`]: the SQL port, every statement
//!   (each with a stable name), and the schema migrations.
//! - [`jobs`]: job kinds: `newsletter` (render + send mail) and `sql` (one statement per page).
//!   A kind owns its specifics: its secrets, its checks, its preview.
//! - [`mail`]: message building and signed one-click unsubscribe links.
//! - [`inbound`]: what comes from outside the chains, served by the same binary: the one-click
//!   unsubscribe endpoint (Function URL, `baton serve`) and SES events from EventBridge; the
//!   suppression list they feed is [`engine::suppression`].
//! - [`adapters`]: one folder per environment, as peers: `local` (SQLite, the `.eml` outbox,
//!   the in-process Lambda model), `postgres`, `aws` (RDS Data API, SES v2, Lambda `Invoke`).
//! - [`compose`]: the composition root: typed adapter settings, and the one place that builds
//!   adapters and assembles the engine (Lambda mode, the CLI, the demo and the tests use it).
//! - [`runtime`]: driving a run: the local runtime (the Lambda model's queue, the sweeper's
//!   timer, progress, Ctrl-C) or watching chains that run in Lambda.
//! - [`report`]: `baton report`, a run pictured as one self-contained HTML page.
//! - [`audit`]: the exactly-once check of a finished run, shared by the demo and the tests.
//! - [`lambda`]: Lambda mode, the binary as a Lambda bootstrap (and its per-hop EMF metrics).
//! - [`telemetry`]: where spans go (OTLP/HTTP, an OTLP JSON lines file, or nowhere); the engine
//!   makes them through the OpenTelemetry API ([`engine::trace`]).
//! - [`config`]: the typed, validated `baton.toml`.
//! - [`cli`]: the `baton` command line.
//! - [`text`]: data made safe to show on a terminal or in a message.

pub mod adapters;
pub mod audit;
pub mod bench;
pub mod cli;
pub mod compose;
pub mod config;
pub mod engine;
pub mod inbound;
pub mod jobs;
pub mod lambda;
pub mod mail;
pub mod ports;
pub mod report;
pub mod runtime;
pub mod sql;
pub mod telemetry;
pub mod text;
