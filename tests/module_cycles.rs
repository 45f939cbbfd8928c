//! The crate's rooms depend on each other one way only: no cycle among the modules of src/.
//!
//! Reads every file of src/, collects the `crate::`, `super::` and `self::` paths it names
//! outside its `#[cfg(test)]` module (in `use` lines and inline alike, braces expanded), and
//! resolves each to the module that defines it. A reference from one module to another is
//! lifted to the two siblings under their nearest common ancestor (`a::b::c` naming `a::d`
//! counts as `a::b -> a::d`); a child naming its ancestor is the child using its room's
//! interface and is not counted. Each set of siblings must form a graph without a cycle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module file of src/, as (module path, text without its test module).
fn modules() -> BTreeMap<Module, String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = BTreeMap::new();
    let mut stack = vec![root.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(&root).unwrap().with_extension("");
            let mut parts: Module = rel.iter().map(|p| p.to_string_lossy().into()).collect();
            if matches!(
                parts.last().map(String::as_str),
                Some("mod" | "lib" | "main")
            ) {
                parts.pop();
            }
            if parts.last().is_some_and(|p| p == "tests") {
                continue; // a file of unit tests
            }
            let text = std::fs::read_to_string(&path).unwrap();
            out.insert(parts, without_tests(&text));
        }
    }
    out
}

/// The text before the file's `#[cfg(test)]` module.
fn without_tests(text: &str) -> String {
    let mut lines = text.lines().peekable();
    let mut kept = String::new();
    while let Some(line) = lines.next() {
        if line.trim() == "#[cfg(test)]"
            && lines
                .peek()
                .is_some_and(|next| next.trim_start().starts_with("mod "))
        {
            break;
        }
        kept.push_str(line);
        kept.push('\n');
    }
    kept
}

/// Drops `//` comments (doc comments name modules in prose) and string literals' contents.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths named after `prefix::` in `text`, with `{a, b::c}` groups expanded.
fn paths_after(text: &str, prefix: &str) -> Vec<Module> {
    let needle = format!("{prefix}::");
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find(&needle) {
        let start = from + at;
        from = start + needle.len();
        let before = start.checked_sub(1).map(|i| bytes[i]);
        if before.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':') {
            continue;
        }
        parse_tree(&text[from..], Vec::new(), &mut out);
    }
    out
}

/// Parses `a::b::{c, d::e}` at the start of `text` into full paths (under `base`).
fn parse_tree(text: &str, base: Module, out: &mut Vec<Module>) -> usize {
    let mut path = base;
    let mut i = 0;
    let bytes = text.as_bytes();
    loop {
        while i < bytes.len() && bytes[i].is_ascii_whitespace() {
            i += 1;
        }
        if i < bytes.len() && bytes[i] == b'{' {
            i += 1;
            loop {
                i += parse_tree(&text[i..], path.clone(), out);
                while i < bytes.len() && (bytes[i].is_ascii_whitespace() || bytes[i] == b',') {
                    i += 1;
                }
                if i >= bytes.len() || bytes[i] == b'}' {
                    return i + 1;
                }
            }
        }
        let start = i;
        while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_') {
            i += 1;
        }
        if start == i {
            out.push(path);
            return i;
        }
        path.push(text[start..i].to_owned());
        if text[i..].starts_with("::") {
            i += 2;
        } else {
            out.push(path);
            return i;
        }
    }
}

/// The longest prefix of `path` that is a module.
fn resolve(path: &[String], known: &BTreeMap<Module, String>) -> Module {
    (0..=path.len())
        .rev()
        .map(|n| path[..n].to_vec())
        .find(|p| known.contains_key(p))
        .unwrap_or_default()
}

/// Edges between siblings: for each, the parent and the two children.
fn sibling_edges(known: &BTreeMap<Module, String>) -> BTreeMap<Module, BTreeSet<(String, String)>> {
    let mut edges: BTreeMap<Module, BTreeSet<(String, String)>> = BTreeMap::new();
    for (module, text) in known {
        let code = code_only(text);
        let mut named = paths_after(&code, "crate");
        let parent: Module = module[..module.len().saturating_sub(1)].to_vec();
        for p in paths_after(&code, "super") {
            named.push(parent.iter().cloned().chain(p).collect());
        }
        for p in paths_after(&code, "self") {
            named.push(module.iter().cloned().chain(p).collect());
        }
        for path in named {
            let target = resolve(&path, known);
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == target.len() || common == module.len() {
                continue; // itself, an ancestor, or its own descendant
            }
            edges
                .entry(module[..common].to_vec())
                .or_default()
                .insert((module[common].clone(), target[common].clone()));
        }
    }
    edges
}

/// The groups of modules that reach each other (strongly connected components of more
/// than one module): each holds at least one cycle.
fn cycles(edges: &BTreeSet<(String, String)>) -> Vec<BTreeSet<String>> {
    let nodes: BTreeSet<&str> = edges
        .iter()
        .flat_map(|(a, b)| [a.as_str(), b.as_str()])
        .collect();
    let reach = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_owned()];
        while let Some(n) = todo.pop() {
            for (a, b) in edges {
                if *a == n && seen.insert(b.clone()) {
                    todo.push(b.clone());
                }
            }
        }
        seen
    };
    let reached: BTreeMap<&str, BTreeSet<String>> = nodes.iter().map(|n| (*n, reach(n))).collect();
    let mut groups: BTreeSet<BTreeSet<String>> = BTreeSet::new();
    for n in &nodes {
        let group: BTreeSet<String> = nodes
            .iter()
            .filter(|m| reached[n].contains(**m) && reached[**m].contains(*n))
            .map(|m| m.to_string())
            .collect();
        if group.len() > 1 {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

#[test]
fn the_modules_of_src_form_no_cycle() {
    let known = modules();
    assert!(known.len() > 20, "read only {} modules", known.len());
    let mut cycles = Vec::new();
    for (parent, edges) in sibling_edges(&known) {
        for group in self::cycles(&edges) {
            let room = if parent.is_empty() {
                "crate".into()
            } else {
                parent.join("::")
            };
            let names: Vec<String> = group.into_iter().collect();
            let inside: Vec<String> = edges
                .iter()
                .filter(|(a, b)| names.contains(a) && names.contains(b))
                .map(|(a, b)| format!("{a} -> {b}"))
                .collect();
            cycles.push(format!(
                "in {room}: {{{}}}: {}",
                names.join(", "),
                inside.join(", ")
            ));
        }
    }
    assert!(cycles.is_empty(), "import cycles:\n{}", cycles.join("\n"));
}

#[test]
fn the_checker_sees_a_cycle_and_expands_groups() {
    let mut known = BTreeMap::new();
    let m = |s: &str| -> Module { s.split("::").map(String::from).collect() };
    known.insert(Vec::new(), String::new());
    known.insert(m("a"), "use crate::{b::{X, Y}, c};\n".to_owned());
    known.insert(m("b"), "fn f() { super::a::g() }\n".to_owned());
    known.insert(m("c"), "// crate::a in a comment\n".to_owned());
    let edges = sibling_edges(&known);
    let top = &edges[&Vec::new()];
    assert!(top.contains(&("a".into(), "b".into())) && top.contains(&("a".into(), "c".into())));
    assert!(!top.contains(&("c".into(), "a".into())));
    assert_eq!(cycles(top).len(), 1);
}
