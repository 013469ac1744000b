//! The configuration file (`baton.toml`): runtime settings and the jobs. Everything is
//! validated at load with an error that names the field and says what would be accepted.
//! See README.md, "Configuration", for every setting.
//!
//! A run stores a snapshot of its job's config (without secrets), so a hop always works from the
//! config its run started with, even if the file or the image changed since.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error("{OVERRIDES_VAR} is not valid: {message}")]
    Overrides { message: String },
    #[error("no job named `{name}` in the config; configured jobs: {known}")]
    UnknownJob { name: String, known: String },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), message: message.into() }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub settings: Settings,
    #[serde(default)]
    pub jobs: BTreeMap<String, JobConfig>,
}

/// How hops are timed and how long the engine waits before calling something stuck.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The function's timeout: each hop's hard deadline.
    #[serde(with = "humantime_serde")]
    pub hop_timeout: Duration,
    /// A hop stops claiming pages when less than this is left before its deadline.
    #[serde(with = "humantime_serde")]
    pub hop_margin: Duration,
    /// How often the local runtime runs the sweeper (in AWS, the `sweep` schedule's rate).
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// Concurrent invocations of the local Lambda model (Lambda's reserved concurrency).
    pub reserved_concurrency: u32,
    /// Hand over to the next hop after this many pages even with time left (none: hops run
    /// until their time budget is nearly spent). Bounds each invocation's work.
    pub max_pages_per_hop: Option<u32>,
    /// Transient SES bounces (since the last delivery) after which an address is suppressed for
    /// every job, like a permanent bounce.
    pub soft_bounce_limit: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            hop_timeout: Duration::from_secs(900),
            hop_margin: Duration::from_secs(30),
            sweep_interval: Duration::from_secs(120),
            reserved_concurrency: 100,
            max_pages_per_hop: None,
            soft_bounce_limit: 3,
        }
    }
}

impl Settings {
    /// A page lease outlives any hop that could hold it: a lease can only expire once its owner
    /// is certainly dead (its invocation deadline has passed).
    pub fn lease(&self) -> Duration {
        self.hop_timeout + self.hop_timeout / 2 + Duration::from_millis(250)
    }

    /// A chain whose heartbeat is older than this is stuck (its hop died or its event was lost).
    pub fn stale_after(&self) -> Duration {
        self.lease() + self.hop_timeout / 2
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.hop_timeout < Duration::from_millis(100) || self.hop_timeout > Duration::from_secs(900) {
            return Err(invalid(
                "settings.hop_timeout",
                "must be between 100ms and 15m (Lambda's maximum function timeout)",
            ));
        }
        if self.hop_margin >= self.hop_timeout {
            return Err(invalid("settings.hop_margin", "must be shorter than settings.hop_timeout"));
        }
        if self.reserved_concurrency == 0 {
            return Err(invalid("settings.reserved_concurrency", "must be at least 1"));
        }
        if self.soft_bounce_limit == 0 {
            return Err(invalid(
                "settings.soft_bounce_limit",
                "must be at least 1 (the transient bounces after which an address is suppressed)",
            ));
        }
        if self.max_pages_per_hop == Some(0) {
            return Err(invalid("settings.max_pages_per_hop", "must be at least 1 (or left out for no cap)"));
        }
        if self.sweep_interval < Duration::from_millis(50) || self.sweep_interval > Duration::from_secs(24 * 3600) {
            return Err(invalid("settings.sweep_interval", "must be between 50ms and 24h"));
        }
        if self.reserved_concurrency > 10_000 {
            return Err(invalid(
                "settings.reserved_concurrency",
                format!("must be at most 10000, got {}", self.reserved_concurrency),
            ));
        }
        Ok(())
    }
}

/// What happens to an item whose side effect may or may not have happened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ambiguity {
    /// Report it as `unknown`, never send again (the default: nobody gets it twice).
    #[default]
    AtMostOnce,
    /// Send again once the lease of the hop that claimed it expires (nobody is missed, some may
    /// get it twice).
    AtLeastOnce,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobConfig {
    /// `newsletter`, `sql`, or the name of a kind registered in Rust.
    pub kind: String,
    /// The query that lists the job's items; must select `key_column`.
    pub source: String,
    /// A unique, sortable column of `source` (integer, text or uuid) that pages range over.
    #[serde(default = "default_key_column")]
    pub key_column: String,
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Worker chains (the run's concurrency).
    #[serde(default = "default_chains")]
    pub chains: u32,
    /// Pause the run once more than this many items failed.
    #[serde(default)]
    pub max_failures: Option<u64>,
    /// Pause the run once more than this percentage of all items failed.
    #[serde(default)]
    pub max_failure_percent: Option<f64>,
    #[serde(default)]
    pub ambiguity: Ambiguity,
    /// A run not finished this long after it started fails.
    #[serde(default = "default_run_deadline", with = "humantime_serde")]
    pub run_deadline: Duration,
    /// Extra hops each chain may take beyond one per page.
    #[serde(default = "default_hop_slack")]
    pub hop_slack: u32,
    /// The IANA time zone the run key's period (`YYYY-MM`) is taken in, e.g. `Asia/Tokyo`: a
    /// schedule at 08:00 Tokyo time on the 1st fires at 23:00 UTC the day before.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub newsletter: Option<NewsletterConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sql: Option<SqlJobConfig>,
    /// Parameters of a kind registered in Rust.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub params: Option<serde_json::Value>,
}

/// Bounds that keep every derived figure (deadlines in ms, hop budgets) far from overflow.
pub const MAX_RUN_DEADLINE: Duration = Duration::from_secs(366 * 24 * 3600);
pub const MIN_SEND_RATE: f64 = 0.001;
pub const MAX_SEND_RATE: f64 = 1_000_000.0;
const MAX_COUNT: u64 = 1_000_000_000_000;

fn default_time_zone() -> String {
    "UTC".into()
}
fn default_key_column() -> String {
    "id".into()
}
fn default_page_size() -> u32 {
    1000
}
fn default_chains() -> u32 {
    4
}
fn default_run_deadline() -> Duration {
    Duration::from_secs(24 * 3600)
}
fn default_hop_slack() -> u32 {
    20
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewsletterConfig {
    #[serde(default = "default_email_column")]
    pub email_column: String,
    /// `Name <address>` or a bare address.
    pub from: String,
    /// minijinja templates. Variables: `recipient` (the source row), `vars`, `unsubscribe_url`,
    /// `run_key`, `job`. Undefined variables are errors.
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    /// Template files, relative to the config file; read at load into `text` / `html`.
    #[serde(default, skip_serializing)]
    pub text_file: Option<PathBuf>,
    #[serde(default, skip_serializing)]
    pub html_file: Option<PathBuf>,
    /// Messages per second over the whole run (all chains); 0 means no limit.
    #[serde(default)]
    pub send_rate: f64,
    /// Sends in flight per hop.
    #[serde(default = "default_in_flight")]
    pub in_flight: u32,
    /// Attempts per message on throttling or transient errors before it counts as failed.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    pub unsubscribe_url: String,
    /// The HMAC secret for unsubscribe tokens. Never stored with the run; prefer
    /// `unsubscribe_secret_env`.
    #[serde(default, skip_serializing)]
    pub unsubscribe_secret: Option<SecretString>,
    #[serde(default = "default_secret_env")]
    pub unsubscribe_secret_env: String,
    /// SES configuration set (AWS only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration_set: Option<String>,
    /// Template variables shared by every message.
    #[serde(default)]
    pub vars: BTreeMap<String, toml::Value>,
    /// Send to addresses whose local part is not ASCII (needs SMTPUTF8 at the provider and the
    /// receiver; SES does not offer it). Off: such recipients are `skipped` with the reason.
    #[serde(default)]
    pub smtputf8: bool,
}

fn default_email_column() -> String {
    "email".into()
}
pub fn default_in_flight() -> u32 {
    64
}
fn default_max_attempts() -> u32 {
    6
}
fn default_secret_env() -> String {
    "BATON_UNSUBSCRIBE_SECRET".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SqlJobConfig {
    /// Run once per page with `:lo` (exclusive; NULL on the first page) and `:hi` (inclusive).
    pub statement: String,
}

/// Whether `name` can name a job: letters, digits, `-` and `_` (it goes into unsubscribe links,
/// SES message tags and metric dimensions as it is).
pub fn is_job_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A plain SQL identifier: letters, digits and `_`, not starting with a digit. Key and email
/// columns are spliced into statements, so nothing else is accepted.
pub fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A TOML error as the parser says it (which quotes the offending line, and may quote the
/// value), unless the key-value it is in may hold a secret: then only where it is.
fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else { return e.to_string() };
    let at = span.start.min(text.len());
    let line_start = text.get(..at).and_then(|t| t.rfind('\n')).map_or(0, |i| i + 1);
    let line_end = text.get(at..).and_then(|t| t.find('\n')).map_or(text.len(), |i| at + i);
    // The key-value the error is in starts at the last line with `=` up to the error's line (a
    // multi-line string continues on lines without one).
    let lines: Vec<&str> = text.get(..line_end).unwrap_or(text).lines().collect();
    let key_line = lines.iter().rposition(|l| l.contains('=')).unwrap_or(lines.len().saturating_sub(1));
    let secret =
        lines[key_line.min(lines.len().saturating_sub(1))..].iter().any(|l| l.to_ascii_lowercase().contains("secret"));
    if !secret {
        return e.to_string();
    }
    let line = text.get(..line_start).map_or(0, |t| t.matches('\n').count()) + 1;
    format!(
        "line {line}: a secret setting does not parse (neither the line nor the value is shown); write it as a quoted \
         string, or better, name an environment variable with unsubscribe_secret_env"
    )
}

/// The environment variable whose TOML fragment is merged over the config file at load: how a
/// deployment sets per-stack values (the SAM template passes its parameters this way) without
/// another image. Tables merge key by key; any other value replaces the file's.
pub const OVERRIDES_VAR: &str = "BATON_CONFIG_OVERRIDES";

/// `overrides` merged into `base`: tables key by key, recursively; any other value replaces.
fn merge_tables(base: &mut toml::Table, overrides: toml::Table) {
    for (key, value) in overrides {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(into)), toml::Value::Table(from)) => merge_tables(into, from),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

impl Config {
    /// Reads, parses and validates the file, with [`OVERRIDES_VAR`] merged over it when set.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let overrides = std::env::var(OVERRIDES_VAR).ok().filter(|o| !o.trim().is_empty());
        Self::parse_with_overrides(&text, path, overrides.as_deref())
    }

    /// Gives every newsletter job this key (a deployment's, read from a secret store at startup;
    /// `source` names where it came from in errors). Checked like a key from the file; never
    /// serialised. A job that also has a key of its own (in the file or the overrides, which
    /// would sit in the image or the function's environment) is refused: two keys, one of them
    /// silently unused, is how unsubscribe links stop verifying.
    pub fn provide_unsubscribe_secret(&mut self, secret: &SecretString, source: &str) -> Result<(), ConfigError> {
        check_secret(secret.expose_secret()).map_err(|m| invalid(source, m))?;
        for (name, job) in &mut self.jobs {
            if let Some(n) = &mut job.newsletter {
                if n.unsubscribe_secret.is_some() {
                    return Err(invalid(
                        format!("jobs.{name}.newsletter.unsubscribe_secret"),
                        format!("{source} gives the key: remove this one (from the job file or {OVERRIDES_VAR})"),
                    ));
                }
                n.unsubscribe_secret = Some(secret.clone());
            }
        }
        Ok(())
    }

    /// Parses and validates; template files are resolved relative to `path`'s folder.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        Self::parse_with_overrides(text, path, None)
    }

    /// [`Self::parse`] with a TOML fragment merged over the file (see [`OVERRIDES_VAR`]). The
    /// file must be valid on its own (its mistakes are named as the file's); every merged value
    /// is then checked as if the file held it.
    pub fn parse_with_overrides(text: &str, path: &Path, overrides: Option<&str>) -> Result<Config, ConfigError> {
        let parse_failed =
            |e: toml::de::Error| ConfigError::Parse { path: path.to_owned(), message: parse_error(text, &e) };
        let mut config: Config = toml::from_str(text).map_err(parse_failed)?;
        if let Some(overrides) = overrides {
            let mut table: toml::Table = toml::from_str(text).map_err(parse_failed)?;
            let fragment: toml::Table = toml::from_str(overrides)
                .map_err(|e| ConfigError::Overrides { message: parse_error(overrides, &e) })?;
            merge_tables(&mut table, fragment);
            config = toml::Value::Table(table).try_into().map_err(|e: toml::de::Error| {
                // The error names the key; it may quote the value, which for a secret it must not.
                let said = e.to_string();
                let said = if said.to_ascii_lowercase().contains("secret") {
                    "a secret setting has the wrong type (neither it nor its value is shown): write it as a quoted \
                     string"
                        .to_owned()
                } else {
                    said.trim().replace('\n', " ")
                };
                ConfigError::Overrides { message: format!("merged over {}: {said}", path.display()) }
            })?;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for (name, job) in &mut config.jobs {
            if let Some(n) = &mut job.newsletter {
                for (file, slot, field) in
                    [(n.text_file.take(), &mut n.text, "text_file"), (n.html_file.take(), &mut n.html, "html_file")]
                {
                    if let Some(file) = file {
                        if slot.is_some() {
                            let inline = field.trim_end_matches("_file");
                            return Err(invalid(
                                format!("jobs.{name}.newsletter.{field}"),
                                format!("give `{inline}` or `{field}`, not both"),
                            ));
                        }
                        let full = base.join(&file);
                        *slot = Some(std::fs::read_to_string(&full).map_err(|e| {
                            invalid(
                                format!("jobs.{name}.newsletter.{field}"),
                                format!("cannot read {}: {e}", full.display()),
                            )
                        })?);
                    }
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.settings.validate()?;
        for (name, job) in &self.jobs {
            job.validate(name)?;
        }
        Ok(())
    }

    pub fn job(&self, name: &str) -> Result<&JobConfig, ConfigError> {
        self.jobs.get(name).ok_or_else(|| ConfigError::UnknownJob {
            name: name.to_owned(),
            known: if self.jobs.is_empty() {
                "(none)".to_owned()
            } else {
                self.jobs.keys().cloned().collect::<Vec<_>>().join(", ")
            },
        })
    }
}

impl JobConfig {
    pub fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let f = |field: &str| format!("jobs.{name}.{field}");
        if !is_job_name(name) {
            return Err(invalid(format!("jobs.{name}"), "job names use letters, digits, `-` and `_` only"));
        }
        if self.source.trim().is_empty() {
            return Err(invalid(f("source"), "must be a SELECT that lists the job's items"));
        }
        if self.source.trim_end().ends_with(';') {
            return Err(invalid(f("source"), "must be one query without a trailing `;` (it is used as a subquery)"));
        }
        if !is_identifier(&self.key_column) {
            return Err(invalid(f("key_column"), "must be a plain column name (letters, digits, `_`)"));
        }
        if !(1..=10_000).contains(&self.page_size) {
            return Err(invalid(f("page_size"), format!("must be between 1 and 10000, got {}", self.page_size)));
        }
        if !(1..=1000).contains(&self.chains) {
            return Err(invalid(f("chains"), format!("must be between 1 and 1000, got {}", self.chains)));
        }
        if let Some(p) = self.max_failure_percent
            && !(0.0..=100.0).contains(&p)
        {
            return Err(invalid(f("max_failure_percent"), format!("must be between 0 and 100, got {p}")));
        }
        if self.run_deadline < Duration::from_secs(1) || self.run_deadline > MAX_RUN_DEADLINE {
            return Err(invalid(
                f("run_deadline"),
                format!("must be between 1s and 366days, got {}", humantime::format_duration(self.run_deadline)),
            ));
        }
        if let Some(n) = self.max_failures
            && n > MAX_COUNT
        {
            return Err(invalid(f("max_failures"), format!("must be at most {MAX_COUNT}, got {n}")));
        }
        if self.hop_slack > 1_000_000 {
            return Err(invalid(f("hop_slack"), format!("must be at most 1000000, got {}", self.hop_slack)));
        }
        if let Err(e) = jiff::tz::TimeZone::get(&self.time_zone) {
            return Err(invalid(
                f("time_zone"),
                format!(
                    "`{}` is not an IANA time zone (e.g. `UTC`, `Europe/Berlin`, `Asia/Tokyo`): {e}",
                    self.time_zone
                ),
            ));
        }
        match self.kind.as_str() {
            "newsletter" => {
                let n = self.newsletter.as_ref().ok_or_else(|| {
                    invalid(f("newsletter"), "a `newsletter` job needs a [jobs.NAME.newsletter] section")
                })?;
                n.validate(&f("newsletter"))?;
            }
            "sql" => {
                let s = self
                    .sql
                    .as_ref()
                    .ok_or_else(|| invalid(f("sql"), "a `sql` job needs a [jobs.NAME.sql] section with `statement`"))?;
                let names = crate::sql::params::names(&s.statement);
                if let Some(other) = names.iter().find(|n| *n != "lo" && *n != "hi") {
                    return Err(invalid(f("sql.statement"), format!("only :lo and :hi are bound, not :{other}")));
                }
                if !names.iter().any(|n| n == "hi") {
                    return Err(invalid(f("sql.statement"), "must use :hi (and usually :lo) to stay within its page"));
                }
            }
            "" => {
                return Err(invalid(f("kind"), "must be `newsletter`, `sql` or a kind registered in Rust"));
            }
            _ => {}
        }
        Ok(())
    }
}

impl NewsletterConfig {
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let f = |field: &str| format!("{prefix}.{field}");
        if !is_identifier(&self.email_column) {
            return Err(invalid(f("email_column"), "must be a plain column name (letters, digits, `_`)"));
        }
        crate::mail::parse_mailbox(&self.from).map_err(|e| invalid(f("from"), e))?;
        if self.text.is_none() && self.html.is_none() {
            return Err(invalid(f("text"), "give `text` or `html` (or `text_file` / `html_file`)"));
        }
        if !(self.send_rate == 0.0 || (MIN_SEND_RATE..=MAX_SEND_RATE).contains(&self.send_rate)) {
            return Err(invalid(
                f("send_rate"),
                format!(
                    "must be 0 (no limit) or between {MIN_SEND_RATE} and {MAX_SEND_RATE} messages per second, got {}",
                    self.send_rate
                ),
            ));
        }
        if !(1..=512).contains(&self.in_flight) {
            return Err(invalid(f("in_flight"), format!("must be between 1 and 512, got {}", self.in_flight)));
        }
        if !(1..=50).contains(&self.max_attempts) {
            return Err(invalid(f("max_attempts"), format!("must be between 1 and 50, got {}", self.max_attempts)));
        }
        if !(self.unsubscribe_url.starts_with("https://") || self.unsubscribe_url.starts_with("http://")) {
            return Err(invalid(
                f("unsubscribe_url"),
                "must be an http(s) URL (RFC 8058 one-click needs https in production)",
            ));
        }
        if let Some(c) =
            self.unsubscribe_url.chars().find(|c| c.is_control() || c.is_whitespace() || matches!(c, '<' | '>' | '"'))
        {
            return Err(invalid(
                f("unsubscribe_url"),
                format!("contains {c:?}, which cannot go into the List-Unsubscribe header: percent-encode it"),
            ));
        }
        if self.unsubscribe_url.len() > 500 {
            return Err(invalid(f("unsubscribe_url"), "must be at most 500 characters (it goes into a header)"));
        }
        if let Some(s) = &self.unsubscribe_secret {
            check_secret(s.expose_secret()).map_err(|m| invalid(f("unsubscribe_secret"), m))?;
        }
        if !is_identifier(&self.unsubscribe_secret_env) {
            return Err(invalid(
                f("unsubscribe_secret_env"),
                format!(
                    "must name an environment variable (letters, digits, `_`), got `{}`",
                    self.unsubscribe_secret_env.escape_debug()
                ),
            ));
        }
        for (name, template) in
            [("subject", Some(&self.subject)), ("text", self.text.as_ref()), ("html", self.html.as_ref())]
        {
            if let Some(t) = template {
                let env = minijinja::Environment::new();
                env.template_from_str(t).map_err(|e| invalid(f(name), format!("template does not parse: {e}")))?;
            }
        }
        Ok(())
    }

    /// The unsubscribe secret: from the file, else from the environment variable it names.
    pub fn secret(&self) -> Option<SecretString> {
        self.unsubscribe_secret.clone().or_else(|| std::env::var(&self.unsubscribe_secret_env).ok().map(Into::into))
    }
}

/// Shortest unsubscribe secret accepted, from the file or the environment alike.
pub const MIN_SECRET_CHARS: usize = 16;

/// Why a secret cannot sign unsubscribe links, if it cannot.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.trim().chars().count() < MIN_SECRET_CHARS {
        return Err(format!(
            "must be at least {MIN_SECRET_CHARS} characters (got {}): a short key lets anyone forge unsubscribe \
             links; e.g. `openssl rand -hex 32`",
            secret.trim().chars().count()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unsubscribe_secret_never_prints_and_is_never_stored_with_a_run() {
        let text = "[jobs.news]\nkind = \"newsletter\"\nsource = \"SELECT id, email FROM users\"\nkey_column = \"id\"\n\
                    [jobs.news.newsletter]\nfrom = \"News <news@example.com>\"\nsubject = \"Hi\"\ntext = \"Hello\"\n\
                    unsubscribe_url = \"https://example.com/u\"\nunsubscribe_secret = \"correct-horse-battery-staple\"\n";
        let config = Config::parse(text, Path::new("baton.toml")).unwrap();
        let job = config.job("news").unwrap();
        assert!(!format!("{config:?}").contains("correct-horse"), "Debug shows the secret");
        assert!(!serde_json::to_string(job).unwrap().contains("correct-horse"), "the run snapshot holds the secret");
        let secret = job.newsletter.as_ref().unwrap().secret().unwrap();
        assert_eq!(secret.expose_secret(), "correct-horse-battery-staple");
    }

    const NEWS: &str = "[settings]\nhop_timeout = \"15m\"\n[jobs.news]\nkind = \"newsletter\"\n\
                        source = \"SELECT id, email FROM users\"\nchains = 2\n[jobs.news.newsletter]\n\
                        from = \"News <news@example.com>\"\nsubject = \"Hi\"\ntext = \"Hello\"\n\
                        unsubscribe_url = \"https://example.com/u\"\n";

    #[test]
    fn overrides_merge_over_the_file_key_by_key_and_are_checked_like_it() {
        let overrides = "[settings]\nhop_timeout = \"300s\"\n[jobs.news]\nchains = 8\ntime_zone = \"Asia/Tokyo\"\n\
                         [jobs.news.newsletter]\nsend_rate = 14\nunsubscribe_url = \"https://u.example.net/\"\n";
        let config = Config::parse_with_overrides(NEWS, Path::new("baton.toml"), Some(overrides)).unwrap();
        assert_eq!(config.settings.hop_timeout, Duration::from_secs(300));
        let job = config.job("news").unwrap();
        assert_eq!(job.chains, 8);
        assert_eq!(job.time_zone, "Asia/Tokyo");
        let n = job.newsletter.as_ref().unwrap();
        assert_eq!((n.send_rate, n.unsubscribe_url.as_str()), (14.0, "https://u.example.net/"));
        // What the overrides leave alone stays as the file says.
        assert_eq!((n.from.as_str(), n.text.as_deref()), ("News <news@example.com>", Some("Hello")));

        // Bad overrides are refused, naming the variable and the field, like a bad file.
        for (bad, says) in [
            ("[jobs.news\nchains = 2", "BATON_CONFIG_OVERRIDES"),
            ("[jobs.news]\nchainz = 2", "chainz"),
            ("[jobs.news]\nchains = 0", "chains"),
            ("[jobs.news.newsletter]\nunsubscribe_url = \"ftp://x\"", "unsubscribe_url"),
            ("[jobs.other]\nchains = 2", "kind"),
        ] {
            let err = Config::parse_with_overrides(NEWS, Path::new("baton.toml"), Some(bad)).unwrap_err().to_string();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
        // A mistake in the file is the file's, even with overrides.
        let err = Config::parse_with_overrides(
            &NEWS.replace("chains = 2", "chainz = 2"),
            Path::new("baton.toml"),
            Some("[settings]"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config file baton.toml is not valid") && err.contains("chainz"), "{err}");
        // A secret of the wrong type is not quoted: neither in the file nor in the overrides.
        for (file, overrides) in [
            (
                NEWS.replace("unsubscribe_url", "unsubscribe_secret = 1234567890123456789\nunsubscribe_url"),
                "[settings]",
            ),
            (NEWS.to_owned(), "[jobs.news.newsletter]\nunsubscribe_secret = 1234567890123456789"),
        ] {
            let err =
                Config::parse_with_overrides(&file, Path::new("baton.toml"), Some(overrides)).unwrap_err().to_string();
            assert!(!err.contains("1234567890123456789"), "{err}");
        }
        // An inline template beside a template file is refused, naming both (an override's `text`
        // would otherwise be silently replaced by the file's).
        let err = Config::parse_with_overrides(
            &NEWS.replace("text = \"Hello\"", "text_file = \"t.txt\""),
            Path::new("baton.toml"),
            Some("[jobs.news.newsletter]\ntext = \"Hi\""),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("give `text` or `text_file`, not both"), "{err}");
        // A secret in the overrides that does not parse is not quoted either.
        let err = Config::parse_with_overrides(
            NEWS,
            Path::new("baton.toml"),
            Some("[jobs.news.newsletter]\nunsubscribe_secret = hunter2"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("BATON_CONFIG_OVERRIDES") && !err.contains("hunter2"), "{err}");
    }

    #[test]
    fn a_provided_unsubscribe_secret_fills_jobs_without_one_and_is_checked() {
        let mut config = Config::parse(NEWS, Path::new("baton.toml")).unwrap();
        let short = config.provide_unsubscribe_secret(&SecretString::from("short"), "BATON_UNSUBSCRIBE_SECRET_ARN");
        assert!(short.unwrap_err().to_string().starts_with("BATON_UNSUBSCRIBE_SECRET_ARN: must be at least 16"));
        config.provide_unsubscribe_secret(&SecretString::from("k".repeat(64)), "BATON_UNSUBSCRIBE_SECRET_ARN").unwrap();
        let n = config.job("news").unwrap().newsletter.as_ref().unwrap();
        assert_eq!(n.secret().unwrap().expose_secret(), "k".repeat(64));
        assert!(!serde_json::to_string(config.job("news").unwrap()).unwrap().contains("kkkk"), "stored with the run");
        // A job with a key of its own as well is refused: one of the two would go unused.
        let with_key =
            NEWS.replace("unsubscribe_url", "unsubscribe_secret = \"another-key-of-16-chars\"\nunsubscribe_url");
        let mut config = Config::parse(&with_key, Path::new("baton.toml")).unwrap();
        let err =
            config.provide_unsubscribe_secret(&SecretString::from("k".repeat(64)), "BATON_UNSUBSCRIBE_SECRET_ARN");
        assert!(
            err.unwrap_err()
                .to_string()
                .starts_with("jobs.news.newsletter.unsubscribe_secret: BATON_UNSUBSCRIBE_SECRET_ARN gives")
        );
    }

    #[test]
    fn a_parse_error_on_a_secret_line_does_not_quote_it() {
        // Failed before: the TOML error quoted the line, secret and all.
        for line in [
            "unsubscribe_secret = \"hunter2-not-closed",
            "unsubscribe_secret = hunter2-bare-word",
            "unsubscribe_secret = 4815162342",
            "unsubscribe_secret = \"\"\"\nhunter2-line-two \\q\n\"\"\"",
        ] {
            let text = format!("[jobs.news.newsletter]\n{line}\n");
            let err = Config::parse(&text, Path::new("baton.toml")).unwrap_err().to_string();
            assert!(!err.contains("hunter2"), "{err}");
            assert!(err.contains("line 2") || err.contains("line 3"), "{err}");
        }
        // Other lines are still quoted, which helps.
        let err = Config::parse("[jobs.news]\nkind = newsletter\n", Path::new("baton.toml")).unwrap_err().to_string();
        assert!(err.contains("kind = newsletter"), "{err}");
    }
}
