//! The `newsletter` kind: render a personalised message per recipient (minijinja, strict
//! undefined variables), sign a one-click unsubscribe link, and send through the mail port
//! under one token bucket per chain (the run's rate split over its chains).
//!
//! Mail errors are handled by kind ([`MailError`]): throttling and transient errors retry with
//! jittered backoff; permanent errors fail the item; ambiguous ones (timeouts after the request
//! left) are `unknown` under at-most-once and retried under at-least-once; an account-level stop
//! pauses the run.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use minijinja::{Environment, UndefinedBehavior};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use secrecy::{ExposeSecret, SecretString};

use super::{Item, ItemContext, ItemJob, ItemOutcome, JobDeps, JobError, Preview, backoff};
use crate::config::{Ambiguity, JobConfig, NewsletterConfig};
use crate::mail;
use crate::ports::{Clock, MailError, Mailer, OutgoingMail};
use crate::sql::Value;

const TEMPLATES: [(&str, &str); 3] = [("subject", "subject.txt"), ("text", "text.txt"), ("html", "body.html")];
/// Names a template may use at top level.
const CONTEXT_NAMES: [&str; 5] = ["recipient", "vars", "unsubscribe_url", "run_key", "job"];

pub struct Newsletter {
    job: String,
    config: NewsletterConfig,
    ambiguity: Ambiguity,
    from: (Option<String>, String),
    env: Environment<'static>,
    vars: minijinja::Value,
    secret: SecretString,
    mailer: Arc<dyn Mailer>,
    clock: Arc<dyn Clock>,
    pacer: Mutex<Option<Arc<Pacer>>>,
    /// `recipient.COLUMN` names each template uses, checked against the source's columns.
    recipient_columns: Vec<(&'static str, String)>,
}

fn name_of_job(prefix: &str) -> &str {
    prefix.strip_prefix("jobs.").and_then(|p| p.strip_suffix(".newsletter")).unwrap_or(prefix)
}

fn invalid(field: String, message: impl Into<String>) -> JobError {
    JobError::Invalid { field, message: message.into() }
}

impl Newsletter {
    pub fn new(name: &str, config: &JobConfig, deps: &JobDeps) -> Result<Self, JobError> {
        let prefix = format!("jobs.{name}.newsletter");
        let n = config
            .newsletter
            .clone()
            .ok_or_else(|| invalid(prefix.clone(), "a `newsletter` job needs a [jobs.NAME.newsletter] section"))?;
        // The secret is never stored with a run: this environment's config file, then the run's
        // own (whose environment variable this process reads).
        let configured = deps.configured.as_ref().and_then(|c| c.newsletter.as_ref());
        let secret = configured.or(Some(&n)).and_then(|c| c.secret()).ok_or_else(|| {
            invalid(
                format!("{prefix}.unsubscribe_secret"),
                format!(
                    "not set: export {}=\"$(openssl rand -hex 32)\" (or set `unsubscribe_secret_env` to the variable \
                     that holds it); it signs the one-click unsubscribe links",
                    n.unsubscribe_secret_env
                ),
            )
        })?;
        if let Err(message) = crate::config::check_secret(secret.expose_secret()) {
            let field = match n.unsubscribe_secret {
                Some(_) => format!("{prefix}.unsubscribe_secret"),
                None => format!("{prefix}.unsubscribe_secret_env ({})", n.unsubscribe_secret_env),
            };
            return Err(invalid(field, message));
        }
        let from = mail::parse_mailbox(&n.from).map_err(|e| invalid(format!("{prefix}.from"), e))?;
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut recipient_columns = Vec::new();
        for (field, file) in TEMPLATES {
            let source = match field {
                "subject" => Some(n.subject.clone()),
                "text" => n.text.clone(),
                _ => n.html.clone(),
            };
            if let Some(source) = source {
                env.add_template_owned(file, source)
                    .map_err(|e| invalid(format!("{prefix}.{field}"), format!("template does not parse: {e}")))?;
                let tmpl = env.get_template(file).expect("just added");
                let builtins: Vec<&str> = env.globals().map(|(name, _)| name).collect();
                let unknown: Vec<String> = tmpl
                    .undeclared_variables(false)
                    .into_iter()
                    .filter(|v| !CONTEXT_NAMES.contains(&v.as_str()) && !builtins.contains(&v.as_str()))
                    .collect();
                if !unknown.is_empty() {
                    return Err(invalid(
                        format!("{prefix}.{field}"),
                        format!(
                            "template uses undefined variable(s) {}; available: {} (row columns are under `recipient.`)",
                            unknown.join(", "),
                            CONTEXT_NAMES.join(", ")
                        ),
                    ));
                }
                for name in tmpl.undeclared_variables(true) {
                    match name.split_once('.') {
                        Some(("vars", var)) if !n.vars.contains_key(var) => {
                            return Err(invalid(
                                format!("{prefix}.{field}"),
                                format!(
                                    "template uses `vars.{var}`, which [jobs.{name_}.newsletter.vars] does not define; \
                                     defined: {}",
                                    if n.vars.is_empty() {
                                        "(none)".to_owned()
                                    } else {
                                        n.vars.keys().cloned().collect::<Vec<_>>().join(", ")
                                    },
                                    name_ = name_of_job(&prefix)
                                ),
                            ));
                        }
                        Some(("recipient", column)) => recipient_columns.push((field, column.to_owned())),
                        _ => {}
                    }
                }
            }
        }
        let vars = minijinja::Value::from_serialize(&n.vars);
        Ok(Self {
            job: name.to_owned(),
            ambiguity: config.ambiguity,
            from,
            env,
            vars,
            secret,
            mailer: deps.mailer.clone(),
            clock: deps.clock.clone(),
            pacer: Mutex::new(None),
            recipient_columns,
            config: n,
        })
    }

    fn field(&self, f: &str) -> String {
        format!("jobs.{}.newsletter.{f}", self.job)
    }

    /// Renders subject, text and HTML for one recipient; the error names the template.
    pub fn render(&self, item: &Item, run_key: &str, address: &str) -> Result<Rendered, (String, String)> {
        let recipient: BTreeMap<String, minijinja::Value> =
            item.columns.iter().zip(&item.values).map(|(c, v)| (c.clone(), to_template_value(v))).collect();
        let unsubscribe_url =
            mail::unsubscribe_url(&self.config.unsubscribe_url, self.secret.expose_secret(), &self.job, address);
        let ctx = minijinja::context! {
            recipient => recipient,
            vars => self.vars.clone(),
            unsubscribe_url => unsubscribe_url.clone(),
            run_key => run_key,
            job => self.job.clone(),
        };
        let mut out: [Option<String>; 3] = [None, None, None];
        for (i, (field, file)) in TEMPLATES.iter().enumerate() {
            if let Ok(t) = self.env.get_template(file) {
                out[i] = Some(t.render(&ctx).map_err(|e| (self.field(field), describe(&e)))?);
            }
        }
        let [subject, text, html] = out;
        // The subject is a header: data in it cannot start headers of its own.
        Ok(Rendered {
            to: address.to_owned(),
            subject: mail::header_text(&subject.unwrap_or_default()),
            text,
            html,
            unsubscribe_url,
        })
    }

    fn pacer(&self) -> Option<Arc<Pacer>> {
        self.pacer.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn message(&self, item: &Item, cx: &ItemContext, address: &str, r: &Rendered) -> std::io::Result<OutgoingMail> {
        let digest = Sha256::digest(item.key.as_bytes());
        let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let domain = self.from.1.rsplit('@').next().unwrap_or("baton.invalid");
        let message_id = format!("{}.{hex}@{domain}", cx.run_id);
        let raw = mail::build(&mail::Message {
            from: (self.from.0.as_deref(), &self.from.1),
            to: address,
            subject: &r.subject,
            text: r.text.as_deref(),
            html: r.html.as_deref(),
            unsubscribe_url: &r.unsubscribe_url,
            message_id: &message_id,
            date: self.clock.now_ms() / 1000,
        })?;
        Ok(OutgoingMail {
            from: self.from.1.clone(),
            to: address.to_owned(),
            message_id,
            raw,
            // SES events carry these back: `baton_mail_events` counts them per run.
            tags: vec![
                ("job".into(), self.job.clone()),
                ("chain".into(), cx.chain.to_string()),
                ("run_id".into(), cx.run_id.clone()),
                ("run_key".into(), cx.run_key.clone()),
            ],
        })
    }
}

/// One chain's pacing at its share of the run's send rate: each send takes the next slot, one
/// period after the last (a GCRA with a burst of one). Unlike a token bucket rebuilt per hop,
/// it starts where the chain's previous hop left it ([`ItemJob::send_after_ms`], kept in the
/// chain's row), so hops of a few seconds cannot each spend a fresh burst and the rate holds
/// over any window. (`governor` cannot be started from a stored state, hence these few lines.)
pub struct Pacer {
    /// The time between two sends, in nanoseconds (changed when the run's live chains change).
    period_ns: std::sync::atomic::AtomicU64,
    next: Mutex<Instant>,
    /// Wake-ups are rounded up to ticks of [`Pacer::TICK`] from here.
    origin: Instant,
}

impl Pacer {
    /// Sends due within one tick wake together: one timer wake-up per tick, not per send (each
    /// costs a thread wake-up), while the rate over any second stays the same.
    pub const TICK: Duration = Duration::from_millis(10);

    pub fn new(per_second: f64, first: Instant) -> Pacer {
        let period_ns = std::sync::atomic::AtomicU64::new(Self::period_ns(per_second));
        Pacer { period_ns, next: Mutex::new(first), origin: Instant::now() }
    }

    fn period_ns(per_second: f64) -> u64 {
        (1e9 / per_second).round().max(1.0) as u64
    }

    /// Changes the rate from the next slot on.
    pub fn set_rate(&self, per_second: f64) {
        if per_second > 0.0 {
            self.period_ns.store(Self::period_ns(per_second), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Takes the next send slot if it comes no later than `by`; returns when the caller may
    /// send (the slot, rounded up to the next tick).
    pub fn reserve(&self, by: Instant) -> Option<Instant> {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (*next).max(Instant::now());
        if slot > by {
            return None;
        }
        *next = slot + Duration::from_nanos(self.period_ns.load(std::sync::atomic::Ordering::Relaxed));
        let tick = Self::TICK.as_nanos();
        let since = slot.saturating_duration_since(self.origin).as_nanos();
        let wake = self.origin + Duration::from_nanos((since.div_ceil(tick) * tick) as u64);
        Some(wake.min(by.max(slot)))
    }

    /// The free slot after `queued` more sends have taken theirs, as epoch milliseconds, given
    /// the clock's `now_ms`.
    pub fn next_ms(&self, now_ms: i64, queued: usize) -> i64 {
        let next = *self.next.lock().unwrap_or_else(|e| e.into_inner());
        let period = Duration::from_nanos(self.period_ns.load(std::sync::atomic::Ordering::Relaxed));
        let queued = period.saturating_mul(u32::try_from(queued).unwrap_or(u32::MAX));
        let wait = next.saturating_duration_since(Instant::now()).saturating_add(queued);
        now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX))
    }
}

pub struct Rendered {
    /// The address it goes to, as on the wire.
    pub to: String,
    pub subject: String,
    pub text: Option<String>,
    pub html: Option<String>,
    pub unsubscribe_url: String,
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        s.push_str(&format!(": {inner}"));
        source = inner.source();
    }
    s
}

fn to_template_value(v: &Value) -> minijinja::Value {
    match v {
        Value::Null | Value::NullOf(_) => minijinja::Value::from(()),
        Value::Int(i) => minijinja::Value::from(*i),
        Value::Real(f) => minijinja::Value::from(*f),
        Value::Bool(b) => minijinja::Value::from(*b),
        Value::Text(s) | Value::Uuid(s) | Value::Timestamp(s) => minijinja::Value::from(s.clone()),
    }
}

#[async_trait]
impl ItemJob for Newsletter {
    fn preview(&self, item: &Item) -> Result<Option<Preview>, JobError> {
        let email_column = &self.config.email_column;
        let address = mail::deliverable(&item.get(email_column).to_string(), self.config.smtputf8)
            .map_err(|why| invalid(self.field(email_column), format!("this recipient is skipped: {why}")))?;
        let r = self.render(item, "preview", &address).map_err(|(field, message)| invalid(field, message))?;
        let json = serde_json::json!({
            "to": r.to, "subject": r.subject, "text": r.text, "html": r.html, "unsubscribe_url": r.unsubscribe_url
        });
        Ok(Some(Preview {
            headers: vec![
                ("To".into(), r.to),
                ("Subject".into(), r.subject),
                ("List-Unsubscribe".into(), format!("<{}>", r.unsubscribe_url)),
            ],
            bodies: [("text", r.text), ("html", r.html)]
                .into_iter()
                .filter_map(|(name, body)| Some((name.to_owned(), body?)))
                .collect(),
            json,
        }))
    }

    fn check(&self, columns: &[String], sample: Option<&Item>) -> Result<(), JobError> {
        self.check_columns(columns)?;
        if let Some(item) = sample {
            let address = item.get(&self.config.email_column).as_str().unwrap_or("sample@example.com").to_owned();
            self.render(item, "check", &address).map_err(|(field, message)| invalid(field, message))?;
        }
        Ok(())
    }

    fn check_columns(&self, columns: &[String]) -> Result<(), JobError> {
        let email = &self.config.email_column;
        if !columns.iter().any(|c| c.eq_ignore_ascii_case(email)) {
            return Err(invalid(
                self.field("email_column"),
                format!("the source query has no column `{email}`; its columns are: {}", columns.join(", ")),
            ));
        }
        if let Some((field, column)) = self.recipient_columns.iter().find(|(_, c)| !columns.contains(c)) {
            return Err(invalid(
                self.field(field),
                format!(
                    "template uses `recipient.{column}`, but the source query has no column `{column}`; its columns are: {}",
                    columns.join(", ")
                ),
            ));
        }
        Ok(())
    }

    fn suppression_column(&self) -> Option<&str> {
        Some(&self.config.email_column)
    }

    fn in_flight(&self) -> usize {
        self.config.in_flight as usize
    }

    fn seconds_per_item(&self) -> Option<f64> {
        (self.config.send_rate > 0.0).then(|| 1.0 / self.config.send_rate)
    }

    fn begin_hop(&self, chains: u32, send_after_ms: Option<i64>) {
        let per_chain = self.config.send_rate / chains.max(1) as f64;
        let pacer = (per_chain > 0.0).then(|| {
            // Never more than one period: a later slot can only be stale (the rate was raised
            // since) or another sandbox's clock running ahead.
            let period = Duration::from_secs_f64(1.0 / per_chain);
            let wait = send_after_ms.map_or(0, |at| (at - self.clock.now_ms()).max(0)) as u64;
            Arc::new(Pacer::new(per_chain, Instant::now() + Duration::from_millis(wait).min(period)))
        });
        *self.pacer.lock().unwrap_or_else(|e| e.into_inner()) = pacer;
    }

    fn share_rate(&self, live_chains: u32) {
        if let Some(p) = self.pacer() {
            p.set_rate(self.config.send_rate / live_chains.max(1) as f64);
        }
    }

    fn send_after_ms(&self, queued: usize) -> Option<i64> {
        self.pacer().map(|p| p.next_ms(self.clock.now_ms(), queued))
    }

    async fn process(&self, item: &Item, cx: &ItemContext) -> ItemOutcome {
        let address = match item.get(&self.config.email_column) {
            v if v.is_null() => return ItemOutcome::Skipped("no address".into()),
            v => v.to_string().trim().to_owned(),
        };
        let address = match mail::deliverable(&address, self.config.smtputf8) {
            Ok(a) => a,
            Err(reason) => return ItemOutcome::Skipped(format!("invalid address: {reason}")),
        };
        let rendered = match self.render(item, &cx.run_key, &address) {
            Ok(r) => r,
            Err((field, message)) => return ItemOutcome::Failed(format!("{field}: {message}")),
        };
        let mail = match self.message(item, cx, &address, &rendered) {
            Ok(m) => m,
            Err(e) => return ItemOutcome::Failed(format!("cannot build the message: {e}")),
        };
        let pacer = self.pacer();
        let mut last_error = String::new();
        let mut maybe_sent = false;
        for attempt in 1..=self.config.max_attempts {
            if Instant::now() >= cx.soft_deadline {
                return ItemOutcome::Released;
            }
            // No await between the engine's window slot and this reservation: the engine
            // counts the sends yet to take a slot as those yet to take a window slot.
            if let Some(p) = &pacer {
                match p.reserve(cx.soft_deadline) {
                    Some(slot) => tokio::time::sleep_until(slot).await,
                    None => return ItemOutcome::Released,
                }
            }
            let sent_at = Instant::now();
            let result = self.mailer.send(&mail).await;
            if sent_at.elapsed() > Duration::from_millis(50) {
                tracing::debug!(ms = sent_at.elapsed().as_millis() as u64, ?result, "slow send");
            }
            let pause = match result {
                Ok(()) => return ItemOutcome::Done,
                Err(MailError::Permanent(r)) => {
                    return ItemOutcome::Failed(format!("rejected: {r}"));
                }
                Err(MailError::AccountStopped(r)) => return ItemOutcome::PauseRun(r),
                Err(MailError::Ambiguous(r)) if self.ambiguity == Ambiguity::AtMostOnce => {
                    return ItemOutcome::Unknown(format!("send outcome unknown: {r}"));
                }
                Err(MailError::Ambiguous(r)) => {
                    // At-least-once: send again; if every later attempt fails, it may still
                    // have arrived, so it ends `unknown`, not `failed`.
                    maybe_sent = true;
                    last_error = format!("send outcome unknown: {r}");
                    backoff(attempt, Duration::from_millis(20), Duration::from_secs(2))
                }
                Err(MailError::Throttled(r)) => {
                    crate::engine::metrics::throttled();
                    last_error = format!("throttled: {r}");
                    backoff(attempt, Duration::from_millis(100), Duration::from_secs(5))
                }
                Err(e) => {
                    last_error = e.to_string();
                    backoff(attempt, Duration::from_millis(20), Duration::from_secs(2))
                }
            };
            if attempt < self.config.max_attempts {
                if Instant::now() + pause >= cx.soft_deadline {
                    return ItemOutcome::Released;
                }
                tokio::time::sleep(pause).await;
            }
        }
        let reason = format!("gave up after {} attempts: {last_error}", self.config.max_attempts);
        if maybe_sent { ItemOutcome::Unknown(reason) } else { ItemOutcome::Failed(reason) }
    }
}
