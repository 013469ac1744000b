//! The layout the crate map in `src/lib.rs` promises, checked on the source itself: the
//! engine names no adapter, no AWS crate and no outer layer; SQL lives in `src/sql/`; and no
//! function in `src/engine/` or `src/cli/` outgrows 60 lines (the hop protocol reads top to
//! bottom in `src/engine/hop.rs` because its steps are named functions).

use std::path::{Path, PathBuf};

fn rust_files(dir: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join(dir)];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out.sort();
    assert!(!out.is_empty(), "no Rust files under {dir}");
    out
}

/// Names the engine must never use: adapters, the crates they wrap, and the layers around it.
const NOT_IN_THE_ENGINE: [&str; 14] = [
    "adapters",
    "aws_sdk",
    "aws_config",
    "aws_smithy",
    "lambda_runtime",
    "rusqlite",
    "tokio_postgres",
    "deadpool",
    "crate::compose",
    "crate::runtime",
    "crate::cli",
    "crate::lambda",
    "jobs::newsletter",
    "Newsletter::",
];

fn forbidden_names(text: &str) -> Vec<(usize, &'static str)> {
    let mut found = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        found.extend(NOT_IN_THE_ENGINE.iter().filter(|name| code.contains(*name)).map(|name| (n + 1, *name)));
    }
    found
}

/// `(name, lines)` of every function longer than `max` lines: from its `fn` line to the
/// closing brace at the same indentation. Declarations without a body are skipped.
fn long_functions(text: &str, max: usize) -> Vec<(String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut long = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let indent = &line[..line.len() - trimmed.len()];
        let signature = ["pub(crate) ", "pub(super) ", "pub ", "async ", "unsafe ", "const "]
            .iter()
            .fold(trimmed, |rest, prefix| rest.strip_prefix(prefix).unwrap_or(rest));
        let signature = signature.strip_prefix("async ").unwrap_or(signature);
        let Some(rest) = signature.strip_prefix("fn ") else { continue };
        let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let close = format!("{indent}}}");
        if let Some(end) = lines[i + 1..].iter().position(|l| *l == close) {
            let body = &lines[i..=i + 1 + end];
            // A declaration (`fn f(..);` in a trait) ends before any brace of its own.
            if body.iter().take_while(|l| !l.contains('{')).any(|l| l.trim_end().ends_with(';')) {
                continue;
            }
            if body.len() > max {
                long.push((name, body.len()));
            }
        }
    }
    long
}

#[test]
fn the_engine_names_no_adapter_no_aws_crate_and_no_outer_layer() {
    // The check itself: it finds a forbidden name in code, not in a comment.
    assert_eq!(forbidden_names("use crate::adapters::aws::ses::SesMailer;\n// adapters are peers"), [(1, "adapters")]);
    for file in rust_files("src/engine") {
        let found = forbidden_names(&std::fs::read_to_string(&file).unwrap());
        assert!(found.is_empty(), "{} names what the engine must not: {found:?}", file.display());
    }
}

#[test]
fn statements_are_built_and_named_only_in_the_sql_module() {
    for file in rust_files("src") {
        let whole = std::fs::read_to_string(&file).unwrap();
        // Unit tests at the end of a file may build ad-hoc statements.
        let text = whole.split("#[cfg(test)]").next().unwrap_or_default();
        let in_sql = file.components().any(|c| c.as_os_str() == "sql");
        // `Stmt::new` (unnamed) is for tests and tools; the crate names every statement.
        assert!(
            in_sql && file.ends_with("sql/mod.rs") || !text.contains("Stmt::new("),
            "{} builds an unnamed statement",
            file.display()
        );
        // The one exception: the `sql` kind runs the user's own statement from the config.
        let allowed = in_sql || file.ends_with("jobs/sql.rs");
        assert!(allowed || !text.contains("Stmt::named("), "{} builds SQL outside src/sql", file.display());
    }
}

#[test]
fn no_function_in_the_engine_or_the_cli_is_over_60_lines() {
    // The check itself: a 61-line function is found, a 60-line one and a declaration are not.
    let body = |n: usize| format!("    fn f() {{\n{}    }}\n", "        x();\n".repeat(n - 2));
    assert_eq!(long_functions(&body(61), 60), [("f".to_owned(), 61)]);
    assert!(long_functions(&body(60), 60).is_empty());
    assert!(long_functions("    fn g(&self) -> u8;\n    fn h() {\n    }\n", 60).is_empty());
    let mut long = Vec::new();
    for file in rust_files("src/engine").into_iter().chain(rust_files("src/cli")) {
        for (name, lines) in long_functions(&std::fs::read_to_string(&file).unwrap(), 60) {
            long.push(format!("{}: {name} ({lines} lines)", file.display()));
        }
    }
    assert!(long.is_empty(), "split these into named steps: {long:#?}");
}
