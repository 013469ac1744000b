//! `baton suppress`: the operator's view of the suppression list (add, remove, list, import,
//! export), and `baton serve`'s wiring. Every address is checked before anything is written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::Subcommand;

use super::Common;
use super::wiring::{self, Use};
use crate::engine::Engine;
use crate::engine::suppression::{EVERY_JOB, Reason, check_scope};
use crate::text::printable;

#[derive(Subcommand, Debug)]
pub enum SuppressCommand {
    /// Suppress addresses: no newsletter run mails them again (for every job unless --job).
    Add {
        #[arg(required = true, value_name = "ADDRESS")]
        addresses: Vec<String>,
        /// Only for this job (the list a one-click unsubscribe names); default: every job.
        #[arg(long)]
        job: Option<String>,
        /// Why (shown by `list`, kept with the row).
        #[arg(long, default_value = "manual", value_parser = reasons())]
        reason: String,
        /// A note kept with the suppression (a ticket number, ...).
        #[arg(long)]
        note: Option<String>,
    },
    /// Lift suppressions: the every-job one (bounces, complaints, manual), or --job's (a
    /// one-click unsubscribe from that job), or with --all every one the address has. A lifted
    /// one comes back with a new unsubscribe, bounce or complaint; replays of old ones do not.
    Remove {
        #[arg(required = true, value_name = "ADDRESS")]
        addresses: Vec<String>,
        #[arg(long)]
        job: Option<String>,
        /// Every scope, unsubscribes from single jobs included.
        #[arg(long, conflicts_with = "job")]
        all: bool,
    },
    /// Show the suppression list: `ADDRESS<TAB>SCOPE<TAB>REASON<TAB>SOURCE<TAB>WHEN<TAB>DETAIL`
    /// per line (`--json`: one array).
    List,
    /// Suppress every address in FILE: one per line, or CSV whose first column is the address
    /// (a header line, blank lines and `#` comments are skipped). A file `export` wrote keeps
    /// each row's scope and reason. A bad line refuses the whole file, naming the line, and
    /// nothing changes.
    Import {
        file: PathBuf,
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value = "manual", value_parser = reasons())]
        reason: String,
    },
    /// Write the suppression list as CSV (address,scope,reason,source,created_at,detail).
    Export {
        /// Where to write it; default: stdout.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
    },
}

fn reasons() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(Reason::ALL.map(Reason::as_str))
}

pub async fn run(command: SuppressCommand, common: &Common) -> Result<ExitCode> {
    // Input is checked before the state is opened; only commands that add may create it.
    let use_ = match &command {
        SuppressCommand::Add { .. } | SuppressCommand::Import { .. } => Use::Record,
        SuppressCommand::Remove { .. } | SuppressCommand::List | SuppressCommand::Export { .. } => Use::Inspect,
    };
    match &command {
        SuppressCommand::Add { addresses, job, note, .. } => {
            check(addresses.iter().map(String::as_str), job.as_deref())?;
            if note.as_deref().is_some_and(|n| n.chars().any(|c| c.is_control() || crate::text::is_invisible(c))) {
                bail!("--note: one line of text, without control characters");
            }
        }
        SuppressCommand::Remove { addresses, job, .. } => check(addresses.iter().map(String::as_str), job.as_deref())?,
        _ => {}
    }
    let import = match &command {
        SuppressCommand::Import { file, job, reason } => Some(read_import(file, job.as_deref(), reason)?),
        _ => None,
    };
    let rt = wiring::open_runtime(common, use_).await?;
    let engine = rt.engine().as_ref();
    match command {
        SuppressCommand::Add { addresses, job, reason, note } => {
            let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
            let reason = Reason::parse(&reason).expect("clap checked it");
            let added = add(engine, &refs, job.as_deref().unwrap_or(EVERY_JOB), reason, "cli", note.as_deref()).await?;
            report(common, "added", added, addresses.len());
        }
        SuppressCommand::Remove { addresses, job, all } => {
            let scope = (!all).then(|| job.as_deref().unwrap_or(EVERY_JOB));
            let mut removed = 0;
            for a in &addresses {
                removed += engine.unsuppress(a, scope).await?;
            }
            report(common, "removed", removed, addresses.len());
        }
        SuppressCommand::List => list(engine, common.json).await?,
        SuppressCommand::Import { .. } => {
            let rows = import.expect("read above");
            let mut added = 0;
            for ((scope, reason), addresses) in &rows {
                let refs: Vec<&str> = addresses.iter().map(String::as_str).collect();
                added += add(engine, &refs, scope, *reason, "import", None).await?;
            }
            report(common, "added", added, rows.values().map(Vec::len).sum());
        }
        SuppressCommand::Export { out } => export(engine, out.as_deref()).await?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Every address, and the scope, are fit for the list (nothing is opened otherwise).
fn check<'a>(addresses: impl Iterator<Item = &'a str>, job: Option<&str>) -> Result<()> {
    for a in addresses {
        crate::engine::suppression::suppression_keys(a)?;
    }
    if let Some(job) = job {
        check_scope(job).map_err(|e| anyhow::anyhow!("--job {e}"))?;
    }
    Ok(())
}

async fn add(
    engine: &Engine,
    addresses: &[&str],
    scope: &str,
    reason: Reason,
    source: &str,
    note: Option<&str>,
) -> Result<u32> {
    if scope != EVERY_JOB && !engine.config().jobs.is_empty() && !engine.config().jobs.contains_key(scope) {
        eprintln!(
            "note: `{}` is not a job in the config file; the suppression applies if one is named so",
            printable(scope)
        );
    }
    Ok(engine.suppress_all(addresses, scope, reason, source, note).await?)
}

fn report(common: &Common, what: &str, rows: u32, given: usize) {
    if common.json {
        println!("{}", serde_json::json!({ what: rows, "addresses": given }));
    } else {
        println!("{what} {rows} suppression row(s) for {given} address(es) (an internationalised domain counts twice)");
    }
}

/// The header `export` writes; an import file that starts with it keeps each row's scope and reason.
const EXPORT_HEADER: &str = "address,scope,reason,source,created_at,detail";

/// An import file's addresses by (scope, reason), or every bad line (up to 10) with its number.
fn read_import(file: &Path, job: Option<&str>, reason: &str) -> Result<BTreeMap<(String, Reason), Vec<String>>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text); // a spreadsheet's byte-order mark
    let default = (job.unwrap_or(EVERY_JOB).to_owned(), Reason::parse(reason).expect("clap checked it"));
    check(std::iter::empty(), job)?;
    let exported = text.lines().next().is_some_and(|l| l.trim() == EXPORT_HEADER);
    let mut rows: BTreeMap<(String, Reason), Vec<String>> = BTreeMap::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || (i == 0 && !line.split(',').next().unwrap_or("").contains('@')) {
            continue; // blank, a comment, or a CSV header
        }
        let fields: Vec<&str> = line.split(',').map(|f| f.trim().trim_matches('"')).collect();
        let key = if exported {
            match (fields.get(1), fields.get(2).and_then(|r| Reason::parse(r))) {
                (Some(scope), Some(reason)) if check_scope(scope).is_ok() => ((*scope).to_owned(), reason),
                _ => {
                    bad.push(format!("line {}: not `address,scope,reason,...` as `export` writes it", i + 1));
                    continue;
                }
            }
        } else {
            default.clone()
        };
        match crate::mail::suppression_keys(fields[0]) {
            Ok(_) => rows.entry(key).or_default().push(fields[0].to_owned()),
            Err(why) => bad.push(format!("line {}: {}", i + 1, printable(&why))),
        }
    }
    if !bad.is_empty() {
        let more = if bad.len() > 10 { format!("\n  ... and {} more", bad.len() - 10) } else { String::new() };
        bail!(
            "{} has {} bad line(s); nothing was imported:\n  {}{more}",
            file.display(),
            bad.len(),
            bad.iter().take(10).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    Ok(rows)
}

async fn list(engine: &Engine, json: bool) -> Result<()> {
    let mut all = Vec::new();
    let mut out = std::io::stdout().lock();
    engine
        .each_suppression::<anyhow::Error>(false, |s| {
            if json {
                all.push(s.clone());
            } else {
                writeln!(
                    out,
                    "{}\t{}\t{}\t{}\t{}\t{}",
                    printable(&s.address),
                    printable(&s.scope),
                    printable(&s.reason),
                    printable(&s.source),
                    when(s.created_at_ms),
                    printable(s.detail.as_deref().unwrap_or(""))
                )?;
            }
            Ok(())
        })
        .await?;
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&all)?)?;
    }
    Ok(())
}

fn when(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

/// A CSV field, quoted when it must be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\r', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_owned() }
}

async fn export(engine: &Engine, out: Option<&Path>) -> Result<()> {
    let mut sink: Box<dyn Write> = match out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?,
        )),
        None => Box::new(std::io::stdout().lock()),
    };
    writeln!(sink, "{EXPORT_HEADER}")?;
    let mut rows = 0u64;
    engine
        .each_suppression::<anyhow::Error>(false, |s| {
            rows += 1;
            let fields =
                [&s.address, &s.scope, &s.reason, &s.source, &when(s.created_at_ms), s.detail.as_deref().unwrap_or("")]
                    .map(csv_field);
            writeln!(sink, "{}", fields.join(","))?;
            Ok(())
        })
        .await?;
    sink.flush()?;
    if let Some(path) = out {
        eprintln!("wrote {rows} suppression(s) to {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(csv_field("a@b.c"), "a@b.c");
        assert_eq!(csv_field("x, \"y\""), "\"x, \"\"y\"\"\"");
    }
}
