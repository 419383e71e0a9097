//! A lexer for PostgreSQL SQL text, just deep enough to split a script into
//! statements and to find keywords outside literals: single-quoted strings
//! (`''` doubled), escape strings (`E'..'`, backslash escapes), quoted
//! identifiers (`".."`), dollar quotes (`$$..$$`, `$tag$..$tag$`), line
//! comments and nested block comments.
//!
//! Why not a parser crate: `sqlparser` rejects valid PostgreSQL DDL and does
//! not give back the original text, `pg_query` builds PostgreSQL's C parser;
//! splitting needs neither (psql splits the same way).

/// What the lexer is inside of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Code,
    /// A string (`'`, with backslash escapes for `E'..'`) or a quoted
    /// identifier (`"`); the quote doubled stands for itself.
    Quoted {
        quote: u8,
        escapes: bool,
    },
    Dollar {
        tag_start: usize,
        tag_end: usize,
    },
    LineComment,
    Block {
        depth: usize,
    },
}

fn ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80
}

/// The byte ranges of `sql`'s top-level code, i.e. outside literals and
/// comments, in order.
fn code_spans(sql: &str) -> Vec<(usize, usize)> {
    let b = sql.as_bytes();
    let mut spans = vec![];
    let mut state = State::Code;
    let mut start = 0;
    let mut i = 0;
    while i < b.len() {
        match state {
            State::Code => {
                let next = b.get(i + 1).copied();
                let enter = match b[i] {
                    b'\'' => {
                        // E'..' (or e'..'), unless the E ends an identifier
                        let escapes = i > 0
                            && (b[i - 1] == b'E' || b[i - 1] == b'e')
                            && (i < 2 || !ident_char(b[i - 2]));
                        Some((
                            State::Quoted {
                                quote: b'\'',
                                escapes,
                            },
                            1,
                        ))
                    }
                    b'"' => Some((
                        State::Quoted {
                            quote: b'"',
                            escapes: false,
                        },
                        1,
                    )),
                    b'-' if next == Some(b'-') => Some((State::LineComment, 2)),
                    b'/' if next == Some(b'*') => Some((State::Block { depth: 1 }, 2)),
                    b'$' if i == 0 || !ident_char(b[i - 1]) => {
                        // $tag$ where tag is empty or an identifier not
                        // starting with a digit ($1 is a parameter)
                        let mut j = i + 1;
                        while j < b.len() && ident_char(b[j]) && b[j] != b'$' {
                            j += 1;
                        }
                        let tag_ok = j == i + 1 || !b[i + 1].is_ascii_digit();
                        if j < b.len() && b[j] == b'$' && tag_ok {
                            Some((
                                State::Dollar {
                                    tag_start: i,
                                    tag_end: j + 1,
                                },
                                j + 1 - i,
                            ))
                        } else {
                            None
                        }
                    }
                    _ => None,
                };
                if let Some((s, len)) = enter {
                    if start < i {
                        spans.push((start, i));
                    }
                    state = s;
                    i += len;
                } else {
                    i += 1;
                }
            }
            State::Quoted { quote, escapes } => {
                if escapes && b[i] == b'\\' {
                    i += 2;
                } else if b[i] == quote {
                    if b.get(i + 1) == Some(&quote) {
                        i += 2;
                    } else {
                        i += 1;
                        state = State::Code;
                        start = i;
                    }
                } else {
                    i += 1;
                }
            }
            State::Dollar { tag_start, tag_end } => {
                let tag = &b[tag_start..tag_end];
                if b[i..].starts_with(tag) {
                    i += tag.len();
                    state = State::Code;
                    start = i;
                } else {
                    i += 1;
                }
            }
            State::LineComment => {
                i += 1;
                if b[i - 1] == b'\n' {
                    state = State::Code;
                    start = i;
                }
            }
            State::Block { depth } => {
                if b[i..].starts_with(b"/*") {
                    state = State::Block { depth: depth + 1 };
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    i += 2;
                    if depth == 1 {
                        state = State::Code;
                        start = i;
                    } else {
                        state = State::Block { depth: depth - 1 };
                    }
                } else {
                    i += 1;
                }
            }
        }
    }
    if state == State::Code && start < b.len() {
        spans.push((start, b.len()));
    }
    spans
}

/// Splits `sql` after each top-level `;`: the pieces, concatenated, give
/// back `sql` exactly; each but the last ends with its `;`.
pub fn split(sql: &str) -> Vec<&str> {
    let mut pieces = vec![];
    let mut from = 0;
    for (start, end) in code_spans(sql) {
        for (offset, _) in sql[start..end].match_indices(';') {
            let at = start + offset + 1;
            pieces.push(&sql[from..at]);
            from = at;
        }
    }
    if from < sql.len() || pieces.is_empty() {
        pieces.push(&sql[from..]);
    }
    pieces
}

/// True when `piece` holds something to run: code other than whitespace,
/// comments and `;`.
pub fn has_code(piece: &str) -> bool {
    code_spans(piece)
        .iter()
        .any(|&(s, e)| piece[s..e].chars().any(|c| !c.is_whitespace() && c != ';'))
}

/// The statements of `sql` to run, one per element (comments-only pieces
/// left out).
pub fn statements(sql: &str) -> Vec<&str> {
    split(sql).into_iter().filter(|p| has_code(p)).collect()
}

/// `sql` with every top-level keyword `word` (case-insensitive, a whole
/// word outside literals and comments) removed.
pub fn remove_keyword(sql: &str, word: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut copied = 0;
    for (start, end) in code_spans(sql) {
        let code = &sql[start..end];
        let lower = code.to_ascii_lowercase();
        let mut search = 0;
        while let Some(found) = lower[search..].find(&word.to_ascii_lowercase()) {
            let at = start + search + found;
            let after = at + word.len();
            let bytes = sql.as_bytes();
            let bounded = (at == 0 || !ident_char(bytes[at - 1]))
                && (after >= bytes.len() || !ident_char(bytes[after]));
            if bounded && after <= end {
                out.push_str(&sql[copied..at]);
                copied = after;
            }
            search += found + word.len();
        }
    }
    out.push_str(&sql[copied..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_on_top_level_semicolons_only() {
        let sql = "CREATE TABLE a (x text DEFAULT ';');\n\
                   -- a comment; with a semicolon\n\
                   INSERT INTO a VALUES (E'it\\'s; fine'), ('o''k;');\n\
                   CREATE FUNCTION f() RETURNS int AS $$ SELECT 1; $$ LANGUAGE sql;\n\
                   CREATE FUNCTION g() RETURNS int AS $body$ SELECT ';'; $body$ LANGUAGE sql;\n\
                   /* outer /* inner; */ still comment; */ SELECT \"semi;colon\" FROM a;\n\
                   SELECT $1::int";
        let parts = statements(sql);
        assert_eq!(parts.len(), 6, "{parts:#?}");
        assert!(parts[4].contains("still comment") && parts[4].ends_with("FROM a;"));
        assert_eq!(split(sql).concat(), sql);
        assert_eq!(statements("-- nothing\n;  /* x */ ").len(), 0);
        assert_eq!(statements("SELECT 1").len(), 1);
    }

    #[test]
    fn removes_keywords_outside_literals() {
        assert_eq!(
            remove_keyword(
                "CREATE INDEX CONCURRENTLY concurrently_idx ON t (x) -- concurrently\n WHERE y = 'CONCURRENTLY'",
                "concurrently"
            ),
            "CREATE INDEX  concurrently_idx ON t (x) -- concurrently\n WHERE y = 'CONCURRENTLY'"
        );
    }

    /// A statement whose literals and comments are full of semicolons,
    /// quotes and dollar signs, ending with `;`.
    fn statement() -> impl Strategy<Value = String> {
        let text = "[a-z ;'\"$\\\\*/\n-]{0,12}";
        prop_oneof![
            text.prop_map(|t| format!("SELECT '{}'", t.replace('\'', "''"))),
            text.prop_map(|t| format!(
                "SELECT E'{}'",
                t.replace('\\', "\\\\").replace('\'', "\\'")
            )),
            text.prop_map(|t| format!("SELECT 1 AS \"{}\"", t.replace('"', "\"\""))),
            text.prop_map(|t| format!("SELECT $$ {} $$", t.replace('$', "x"))),
            text.prop_map(|t| format!("SELECT $q$ {} $q$", t.replace("$q$", "q"))),
            text.prop_map(|t| format!("SELECT 1 -- {}\n", t.replace('\n', " "))),
            text.prop_map(|t| format!(
                "SELECT /* {} /* {} */ */ 1",
                t.replace("*/", "* /").replace("/*", "/ *"),
                "x;"
            )),
            Just("SELECT $1".to_string()),
        ]
        .prop_map(|s| format!("{s};"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn splitting_then_joining_gives_the_input(sql in any::<String>()) {
            prop_assert_eq!(split(&sql).concat(), sql);
        }

        #[test]
        fn no_split_inside_a_literal_or_comment(parts in proptest::collection::vec(statement(), 1..6), ws in "[ \n]{0,3}") {
            let sql = parts.join(&ws);
            let got = statements(&sql);
            prop_assert_eq!(got.len(), parts.len(), "{:#?}", got);
            for (g, p) in got.iter().zip(&parts) {
                prop_assert_eq!(g.trim(), p.as_str());
            }
        }
    }
}
