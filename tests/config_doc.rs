//! The option reference in docs/configuration.md and the README's option table stay what the
//! `options!` table in src/config.rs says; `S3CACHED_BLESS=1` rewrites the reference.

use std::path::{Path, PathBuf};

use s3cached::config::{options_reference, KEYS};

/// The line that opens the generated section (the rest of the line is a comment for readers).
const START: &str = "<!-- generated: options";
/// The line that closes it.
const END: &str = "<!-- end generated -->";
/// Setting this environment variable to 1 rewrites the generated section.
const BLESS: &str = "S3CACHED_BLESS";

fn path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(path(relative)).unwrap_or_else(|e| panic!("{relative}: {e}"))
}

/// The document split around its generated section: before (through the start line),
/// the section, after (from the end line).
fn split(text: &str) -> (&str, &str, &str) {
    let start = text
        .find(START)
        .unwrap_or_else(|| panic!("docs/configuration.md has no line starting {START:?}"));
    let body = start
        + text[start..]
            .find('\n')
            .expect("the start marker ends its line")
        + 1;
    let end = body
        + text[body..]
            .find(END)
            .unwrap_or_else(|| panic!("docs/configuration.md has no {END:?} after {START:?}"));
    (&text[..body], &text[body..end], &text[end..])
}

#[test]
fn the_option_reference_is_generated_from_the_option_table() {
    let text = read("docs/configuration.md");
    let (before, section, after) = split(&text);
    let expected = options_reference();
    if section == expected {
        return;
    }
    if std::env::var(BLESS).is_ok_and(|v| v == "1") {
        std::fs::write(
            path("docs/configuration.md"),
            format!("{before}{expected}{after}"),
        )
        .expect("docs/configuration.md is writable");
        return;
    }
    let (line, found, wanted) = first_difference(section, &expected);
    panic!(
        "docs/configuration.md's option reference is stale (it differs from the options! \
         table in src/config.rs); first difference at line {line} of the table:\n  \
         file:      {found}\n  generated: {wanted}\nRegenerate it with:\n\n    \
         {BLESS}=1 cargo test --test config_doc\n"
    );
}

/// The first line (counted from 1) where two texts differ, with each text's line there.
fn first_difference<'a>(found: &'a str, wanted: &'a str) -> (usize, &'a str, &'a str) {
    let (mut found_lines, mut wanted_lines) = (found.lines(), wanted.lines());
    for line in 1.. {
        match (found_lines.next(), wanted_lines.next()) {
            (None, None) => return (line, "(end)", "(end, but the files differ in whitespace)"),
            (f, w) if f != w => return (line, f.unwrap_or("(end)"), w.unwrap_or("(end)")),
            _ => {}
        }
    }
    unreachable!("the loop returns")
}

/// The README's table of the options people change: each row's key must exist and show the
/// default the reference shows.
#[test]
fn the_readme_options_exist_with_their_defaults() {
    let reference = options_reference();
    let default_of = |key: &str| {
        let row = format!("| `{key}` |");
        reference
            .lines()
            .find(|line| line.starts_with(&row))
            .and_then(|line| line.split(" | ").nth(3))
            .map(str::to_owned)
    };
    let readme = read("README.md");
    let rows: Vec<&str> = readme
        .lines()
        .skip_while(|line| !line.starts_with("| key |"))
        .take_while(|line| line.starts_with('|'))
        .filter(|line| line.starts_with("| `"))
        .collect();
    assert!(
        !rows.is_empty(),
        "README.md has no option table (a header `| key |`)"
    );
    for row in rows {
        let cells: Vec<&str> = row.split(" | ").collect();
        let key = cells[0].trim_start_matches("| ").trim_matches('`');
        assert!(
            KEYS.iter().any(|(k, _)| *k == key),
            "README.md names an option that does not exist: {key}"
        );
        let env = cells.get(1).map(|c| c.trim_matches('`'));
        let env_expected = KEYS.iter().find(|(k, _)| *k == key).map(|(_, e)| *e);
        assert_eq!(
            env, env_expected,
            "README.md: environment variable of {key}"
        );
        assert_eq!(
            cells.get(2).copied(),
            default_of(key).as_deref(),
            "README.md: default of {key} differs from docs/configuration.md"
        );
    }
}
