//! `:name` parameter parsing. SQLite and the Data API take `:name` natively; PostgreSQL's wire
//! protocol wants `$1, $2, ...`. [`to_positional`] rewrites a statement, skipping string
//! literals, quoted identifiers, comments and PostgreSQL's `::type` casts.

/// Rewrites `:name` parameters as `$n`, returning the new SQL and the parameter names in
/// position order (a name used twice gets one position).
pub fn to_positional(sql: &str) -> (String, Vec<String>) {
    // Positions by name in a map: a page's statements carry thousands of parameters, and a
    // scan of the list per parameter made rewriting them O(n²).
    let mut names: Vec<String> = Vec::new();
    let mut positions: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let out = rewrite(sql, |name| {
        let pos = *positions.entry(name.to_owned()).or_insert_with(|| {
            names.push(name.to_owned());
            names.len() - 1
        });
        format!("${}", pos + 1)
    });
    (out, names)
}

/// Replaces every `:name` parameter by what `emit` returns for its name, leaving string
/// literals, quoted identifiers, comments and `::type` casts alone.
fn rewrite(sql: &str, mut emit: impl FnMut(&str) -> String) -> String {
    let mut out = String::with_capacity(sql.len());
    let bytes = sql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'\'' | b'"' => {
                let end = skip_quoted(bytes, i, c);
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                let end = sql[i..].find('\n').map(|n| i + n).unwrap_or(bytes.len());
                out.push_str(&sql[i..end]);
                i = end;
            }
            b'/' if bytes.get(i + 1) == Some(&b'*') => {
                let end = sql[i + 2..].find("*/").map(|n| i + 2 + n + 2).unwrap_or(bytes.len());
                out.push_str(&sql[i..end]);
                i = end;
            }
            b':' if bytes.get(i + 1) == Some(&b':') => {
                out.push_str("::");
                i += 2;
            }
            b':' if bytes.get(i + 1).is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_') => {
                let start = i + 1;
                let mut end = start;
                while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
                    end += 1;
                }
                out.push_str(&emit(&sql[start..end]));
                i = end;
            }
            _ => {
                let ch = sql[i..].chars().next().expect("in bounds");
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The names of the `:name` parameters a statement uses, in first-use order.
pub fn names(sql: &str) -> Vec<String> {
    to_positional(sql).1
}

fn skip_quoted(bytes: &[u8], start: usize, quote: u8) -> usize {
    let mut i = start + 1;
    while i < bytes.len() {
        if bytes[i] == quote {
            if bytes.get(i + 1) == Some(&quote) {
                i += 2;
                continue;
            }
            return i + 1;
        }
        i += 1;
    }
    bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_names_and_reuses_positions() {
        let (sql, names) = to_positional("SELECT * FROM t WHERE a = :a AND b > :b_2 OR a < :a");
        assert_eq!(sql, "SELECT * FROM t WHERE a = $1 AND b > $2 OR a < $1");
        assert_eq!(names, vec!["a", "b_2"]);
    }

    #[test]
    fn leaves_literals_casts_and_comments_alone() {
        let (sql, names) =
            to_positional("SELECT ':no', \"x:y\", c::text -- :comment\n FROM t /* :also */ WHERE d = :yes");
        assert_eq!(sql, "SELECT ':no', \"x:y\", c::text -- :comment\n FROM t /* :also */ WHERE d = $1");
        assert_eq!(names, vec!["yes"]);
    }

    #[test]
    fn keeps_unicode_intact() {
        let (sql, _) = to_positional("SELECT 'Zoë' || :n");
        assert_eq!(sql, "SELECT 'Zoë' || $1");
    }
}

/// Wraps each use of the named parameters in `CAST(:name AS type)`, for engines that cannot
/// infer the type of a NULL parameter and have no other way to declare it (the Data API's
/// `typeHint` has no bigint or text).
pub fn cast_params(sql: &str, casts: &[(&str, &str)]) -> String {
    if casts.is_empty() {
        return sql.to_owned();
    }
    rewrite(sql, |name| match casts.iter().find(|(c, _)| *c == name) {
        Some((_, ty)) => format!("CAST(:{name} AS {ty})"),
        None => format!(":{name}"),
    })
}

#[cfg(test)]
mod cast_tests {
    #[test]
    fn casts_only_the_named_parameters() {
        let sql = super::cast_params("WHERE (:lo IS NULL OR id > :lo) AND id <= :hi AND s = '$1'", &[("lo", "BIGINT")]);
        assert_eq!(sql, "WHERE (CAST(:lo AS BIGINT) IS NULL OR id > CAST(:lo AS BIGINT)) AND id <= :hi AND s = '$1'");
    }
}
