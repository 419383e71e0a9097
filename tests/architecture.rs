//! The layering of `src/` (see `docs/architecture.md`): each top-level
//! module may use only the modules of the layers below it, so the module
//! graph has one direction and no cycle. A reference is any `crate::X`
//! path (or `use crate::{X, ..}` group) outside a file's unit tests,
//! comments included: a doc link upward is a dependency in the reader's
//! head too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Top-level modules, lowest layer first. Each may use the layers before
/// it, except those listed beside it.
const LAYERS: &[(&str, &[&str])] = &[
    ("base", &[]),
    ("pg", &[]),
    ("registry", &[]),
    // metrics are handed their samples: no pool, no registry
    ("telemetry", &["pg", "registry"]),
    ("tenants", &[]),
    // the request path never builds or migrates schemas
    ("serving", &["tenants"]),
    ("tenancy", &[]),
    // jobs run through the router; org changes are the core's
    ("jobs", &[]),
    ("api", &[]),
    ("server", &[]),
    ("cli", &[]),
];

/// What layer `name` may use.
fn may_use(name: &str, used: &str) -> bool {
    let position = |n: &str| LAYERS.iter().position(|(l, _)| *l == n);
    let (Some(at), Some(used_at)) = (position(name), position(used)) else {
        return false;
    };
    used_at < at && !LAYERS[at].1.contains(&used)
}

/// At most this many entries in `src/` besides `lib.rs` and `main.rs`.
const MAX_TOP_LEVEL: usize = 12;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        for entry in std::fs::read_dir(path).unwrap() {
            rust_files(&entry.unwrap().path(), out);
        }
    } else if path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_owned());
    }
}

/// Top-level module name -> its files.
fn top_level() -> BTreeMap<String, Vec<PathBuf>> {
    let mut tops = BTreeMap::new();
    for entry in std::fs::read_dir(src()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        if name == "lib" || name == "main" {
            continue;
        }
        let mut files = vec![];
        rust_files(&path, &mut files);
        if !files.is_empty() {
            tops.insert(name, files);
        }
    }
    tops
}

/// The top-level modules a piece of source names through `crate::`.
fn references(text: &str) -> BTreeSet<String> {
    // unit tests may reach anywhere
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("crate::") {
        let before = rest[..at].chars().next_back();
        rest = &rest[at + "crate::".len()..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // e.g. `foreign_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for item in group[..end].split(',') {
                names.insert(ident(item.trim()));
            }
        } else {
            names.insert(ident(rest));
        }
    }
    names
}

#[test]
fn top_level_modules_use_only_the_layers_below_them() {
    let tops = top_level();
    let unplaced: Vec<&String> = tops
        .keys()
        .filter(|t| !LAYERS.iter().any(|(l, _)| l == t))
        .collect();
    assert!(
        unplaced.is_empty(),
        "top-level modules {unplaced:?} have no layer: add them to LAYERS here and to docs/architecture.md"
    );
    assert!(
        tops.len() <= MAX_TOP_LEVEL,
        "{} top-level entries in src/ (at most {MAX_TOP_LEVEL}): group them into layers",
        tops.len()
    );
    let mut wrong = vec![];
    for (top, files) in &tops {
        for file in files {
            let text = std::fs::read_to_string(file).unwrap();
            for name in references(&text) {
                if name != *top && tops.contains_key(&name) && !may_use(top, &name) {
                    wrong.push(format!(
                        "{} uses crate::{name}, a layer {top} may not use",
                        file.strip_prefix(src()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "upward or sideways references:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn layers_use_only_layers_below_them() {
    assert!(may_use("api", "tenancy"));
    assert!(may_use("tenancy", "base"));
    assert!(!may_use("tenancy", "api"), "upward");
    assert!(!may_use("pg", "pg"), "itself is not a use");
    assert!(!may_use("telemetry", "registry"), "an exclusion");
    assert!(!may_use("serving", "tenants"), "an exclusion");
    assert!(!may_use("nowhere", "base"), "unplaced");
    for (name, excluded) in LAYERS {
        for e in *excluded {
            let below = LAYERS
                .iter()
                .take_while(|(l, _)| l != name)
                .any(|(l, _)| l == e);
            assert!(below, "{name} excludes {e}, which is not a layer below it");
        }
    }
}

#[test]
fn every_folder_says_what_it_owns() {
    for (top, files) in top_level() {
        for file in files {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            if name != "mod.rs" && !src().join(format!("{top}.rs")).eq(&file) {
                continue;
            }
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(
                text.starts_with("//!"),
                "{} does not start with a //! header saying what it owns",
                file.display()
            );
        }
    }
}

#[test]
fn the_reference_scan_sees_paths_groups_and_doc_links() {
    let text = "use crate::base::ident::Slug;\nuse crate::{api, tenancy::Orgs};\n/// see [`crate::serving::router`]\nlet x = other_crate::y;\n#[cfg(test)]\nmod tests { use crate::cli; }";
    let names: Vec<String> = references(text).into_iter().collect();
    assert_eq!(names, ["api", "base", "serving", "tenancy"]);
}
