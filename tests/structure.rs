//! The shape of the source tree, checked: the import graph of `src/` has no
//! circle (each module uses only modules below it), DESIGN's layout names
//! every source and test file, and the testing page names what the set-up
//! installs.
//!
//! The graph is read from the text: every `use crate::…`/`super::…`/
//! `self::…` path (braces expanded) and every inline `crate::…`/`super::…`
//! path, resolved to the longest module it names, plus a parent's uses of
//! its children (`dispatch::Dispatcher`). `#[cfg(test)]` code is left out:
//! a unit test may look anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The workspace's crates, by directory ("" is the daemon, at the top).
const CRATES: [&str; 3] = ["", "echo-load", "proxy-protocol"];

/// Module path ("" for the crate root, "master::dispatch") -> source text
/// without comments and test code, of the crate in directory `krate`.
fn modules(krate: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join(krate).join("src");
    for file in rust_files(&root) {
        let rel = file.strip_prefix(&root).expect("under src");
        if rel.starts_with("bin") || rel == Path::new("main.rs") {
            continue;
        }
        let mut parts: Vec<String> = rel.with_extension("").iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
            parts.pop();
        }
        let text = std::fs::read_to_string(&file).expect("read a source file");
        out.insert(parts.join("::"), code_only(&text));
    }
    out
}

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read a source directory").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The text without `//` comments and without the `#[cfg(test)]` part
/// (by this project's layout, always at the end of a file).
fn code_only(text: &str) -> String {
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines().map(|l| l.split("//").next().unwrap_or_default()).collect::<Vec<_>>().join("\n")
}

/// `a::{b, c::{d, e}}` -> `a::b`, `a::c::d`, `a::c::e`.
fn expand(path: &str) -> Vec<String> {
    let Some(open) = path.find('{') else { return vec![path.to_string()] };
    let (prefix, inner) = (&path[..open], &path[open + 1..path.len().saturating_sub(1)]);
    let (mut parts, mut depth, mut current) = (Vec::new(), 0, String::new());
    for ch in inner.chars() {
        match ch {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(ch);
    }
    parts.push(current);
    parts.iter().filter(|p| !p.is_empty()).flat_map(|p| expand(p)).map(|p| format!("{prefix}{p}")).collect()
}

/// The module a path used in module `from` names, if it is one of ours.
fn resolve(mods: &BTreeMap<String, String>, from: &str, path: &str) -> Option<String> {
    let mut segs: Vec<&str> = path.split("::").collect();
    let mut base: Vec<&str> = if from.is_empty() { vec![] } else { from.split("::").collect() };
    match segs.first().copied() {
        Some("crate") => base.clear(),
        Some("self") => {}
        Some("super") => {
            while segs.first() == Some(&"super") {
                base.pop();
                segs.remove(0);
            }
            segs.insert(0, "super");
        }
        _ => return None,
    }
    segs.remove(0);
    let full: Vec<&str> = base.into_iter().chain(segs).collect();
    (0..=full.len()).rev().map(|k| full[..k].join("::")).find(|m| mods.contains_key(m))
}

/// Identifier-ish words joined by `::`, starting at each `start`.
fn paths_after<'a>(text: &'a str, start: &'a str) -> impl Iterator<Item = String> + 'a {
    text.match_indices(start).filter_map(move |(i, _)| {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            return None;
        }
        let rest = &text[i..];
        let end = rest.find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':')).unwrap_or(rest.len());
        Some(rest[..end].trim_end_matches(':').to_string())
    })
}

fn graph(mods: &BTreeMap<String, String>) -> BTreeMap<String, BTreeSet<String>> {
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (m, text) in mods {
        let e = edges.entry(m.clone()).or_default();
        let mut add = |t: Option<String>| {
            if let Some(t) = t.filter(|t| t != m) {
                e.insert(t);
            }
        };
        for stmt in text.split(';') {
            let stmt = stmt.trim();
            let Some(path) = stmt.strip_prefix("use ").or_else(|| stmt.strip_prefix("pub use ")) else { continue };
            let path: String = path.chars().filter(|c| !c.is_whitespace()).collect();
            for p in expand(&path) {
                let p = p.split(" as ").next().unwrap_or_default();
                add(resolve(mods, m, p));
                // `use child::X` inside a parent.
                let first = p.split("::").next().unwrap_or_default();
                let child = if m.is_empty() { first.to_string() } else { format!("{m}::{first}") };
                if mods.contains_key(&child) && is_child(m, &child) {
                    add(resolve(
                        mods,
                        "",
                        &format!("crate::{}", if m.is_empty() { p.to_string() } else { format!("{m}::{p}") }),
                    ));
                }
            }
        }
        for start in ["crate::", "super::"] {
            for p in paths_after(text, start) {
                add(resolve(mods, m, &p));
            }
        }
        // A parent naming a child inline: `dispatch::Dispatcher`.
        for child in mods.keys().filter(|c| is_child(m, c)) {
            let name = child.rsplit("::").next().unwrap_or_default();
            if paths_after(text, &format!("{name}::")).next().is_some() {
                add(Some(child.clone()));
            }
        }
    }
    edges
}

fn is_child(parent: &str, c: &str) -> bool {
    match c.rsplit_once("::") {
        Some((p, _)) => p == parent,
        None => parent.is_empty() && !c.is_empty(),
    }
}

/// A circle in the graph, as a path `a -> b -> … -> a`, if there is one.
fn find_circle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        v: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(v.to_string(), Mark::Open);
        stack.push(v.to_string());
        for w in edges.get(v).into_iter().flatten() {
            match marks.get(w).copied().unwrap_or(Mark::New) {
                Mark::Open => {
                    let from = stack.iter().position(|s| s == w).unwrap_or(0);
                    let mut circle = stack[from..].to_vec();
                    circle.push(w.clone());
                    return Some(circle);
                }
                Mark::New => {
                    if let Some(c) = visit(w, edges, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks.insert(v.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for v in edges.keys() {
        if marks.get(v).copied().unwrap_or(Mark::New) == Mark::New {
            if let Some(c) = visit(v, edges, &mut marks, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

#[test]
fn the_import_graph_of_src_has_no_circle() {
    let mods = modules("");
    assert!(mods.len() > 20 && mods.contains_key("master::dispatch"), "read the tree: {:?}", mods.keys());
    let edges = graph(&mods);
    // The reader sees what it must: the known downward edges are there.
    for (from, to) in
        [("stats", "scoreboard"), ("master", "master::dispatch"), ("master::dispatch", "master::supervisor")]
    {
        assert!(edges[from].contains(to), "{from} -> {to} not seen: {:?}", edges[from]);
    }
    if let Some(circle) = find_circle(&edges) {
        let names: Vec<&str> = circle.iter().map(|m| if m.is_empty() { "(crate)" } else { m }).collect();
        panic!("an import circle: {}", names.join(" -> "));
    }
}

/// The same in the other crates of the workspace.
#[test]
fn the_harness_and_the_parser_have_no_import_circle() {
    for krate in &CRATES[1..] {
        let mods = modules(krate);
        assert!(mods.contains_key(""), "read {krate}/src: {:?}", mods.keys());
        if let Some(circle) = find_circle(&graph(&mods)) {
            panic!("an import circle in {krate}: {}", circle.join(" -> "));
        }
    }
    assert!(graph(&modules("echo-load"))["conn"].contains("plan"), "the reader sees echo-load's edges");
}

/// The daemon does not depend on the harness or on what only the harness
/// needs (it may use echo-load's command line for its man pages, as a
/// dev-dependency); each crate inherits the workspace's lints, so
/// `unsafe_code` is denied everywhere but in `sys`, which says why.
#[test]
fn the_daemon_leaves_the_harness_out_and_unsafe_code_is_denied_but_in_sys() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).expect("read Cargo.toml");
    let deps = manifest.split("\n[dependencies]\n").nth(1).expect("[dependencies]");
    let deps = deps.split("\n[").next().unwrap_or_default();
    for harness_only in ["echo-load", "hdrhistogram", "indicatif", "serde_json"] {
        assert!(!deps.contains(harness_only), "the daemon depends on {harness_only}:\n{deps}");
    }
    assert!(manifest.contains("[workspace.lints.rust]\nunsafe_code = \"deny\""), "the workspace denies unsafe_code");
    for krate in CRATES {
        let m = std::fs::read_to_string(root.join(krate).join("Cargo.toml")).expect("read a crate's Cargo.toml");
        assert!(m.contains("[lints]\nworkspace = true"), "{krate}/Cargo.toml does not inherit the workspace lints");
        for f in rust_files(&root.join(krate).join("src")) {
            let text = std::fs::read_to_string(&f).expect("read a source file");
            for (n, line) in text.lines().enumerate() {
                if line.contains("allow(unsafe_code)") {
                    let sys = f.ends_with("src/lib.rs")
                        && krate.is_empty()
                        && text.lines().nth(n + 1) == Some("pub mod sys;");
                    assert!(sys, "{}:{}: unsafe_code allowed outside sys", f.display(), n + 1);
                }
            }
        }
    }
}

/// The checker finds a circle when there is one (a test of the test).
#[test]
fn the_checker_sees_a_circle() {
    let mut mods = BTreeMap::new();
    mods.insert("a".to_string(), "use crate::b::X;".to_string());
    mods.insert("b".to_string(), "fn f() { super::a::g() }".to_string());
    mods.insert("c".to_string(), "use crate::{a, b::{Y, Z}};".to_string());
    let edges = graph(&mods);
    assert_eq!(edges["c"], BTreeSet::from(["a".to_string(), "b".to_string()]));
    assert!(find_circle(&edges).is_some());
    mods.insert("b".to_string(), "fn f() {}".to_string());
    assert!(find_circle(&graph(&mods)).is_none());
}

/// The text of the fenced block that follows `heading` in `doc`.
fn block_after(doc: &str, heading: &str) -> String {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(doc)).expect("read the doc");
    let at = text.find(heading).unwrap_or_else(|| panic!("{doc} has no `{heading}`"));
    let rest = &text[at..];
    let open = rest.find("```").expect("a fenced block") + 3;
    let close = rest[open..].find("```").expect("the block's end") + open;
    rest[open..close].to_string()
}

#[test]
fn design_names_every_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut names = Vec::new();
    let dirs = CRATES.iter().flat_map(|k| ["src", "tests"].map(|d| Path::new(k).join(d)));
    for dir in dirs {
        for f in rust_files(&root.join(dir)) {
            let rel = f.strip_prefix(root).expect("in the tree");
            if rel.starts_with("tests/common") || rel.starts_with("tests/bench") {
                continue; // helpers and peers: listed as folders
            }
            let stem = f.file_stem().expect("a file name").to_string_lossy().into_owned();
            names.push((rel.display().to_string(), if stem == "mod" { "mod.rs".to_string() } else { stem }));
        }
    }
    for (doc, heading) in [("docs/DESIGN.md", "## 8. Layout")] {
        let block = block_after(doc, heading);
        let words: BTreeSet<&str> =
            block.split(|c: char| !(c.is_alphanumeric() || c == '_' || c == '-' || c == '.')).collect();
        for (file, name) in &names {
            let named = words.contains(name.as_str()) || words.contains(format!("{name}.rs").as_str());
            assert!(named, "{doc} ({heading}) does not name {file}");
        }
    }
}

/// docs/TESTING.md says what the set-up installs: every Debian package
/// `test.sh` may apt-get is named where it describes `./test.sh`, and every
/// package and tool only `.ci/run` installs where it describes CI.
#[test]
fn the_testing_page_names_what_the_set_up_installs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let read = |f: &str| std::fs::read_to_string(root.join(f)).unwrap_or_else(|e| panic!("read {f}: {e}"));
    let page = read("docs/TESTING.md");
    let section = |heading: &str| {
        let at = page.find(heading).unwrap_or_else(|| panic!("docs/TESTING.md has no `{heading}`"));
        let end = page[at + heading.len()..].find("\n## ").map_or(page.len(), |e| at + heading.len() + e);
        page[at..end].to_string()
    };
    let mut named = 0;
    for (script, heading) in [("test.sh", "## Running the tests"), (".ci/run", "## What CI runs")] {
        let text = read(script);
        let described = section(heading);
        for part in text.split("need+=(").skip(1) {
            for pkg in part.split(')').next().unwrap_or_default().split_whitespace() {
                assert!(
                    described.contains(pkg),
                    "docs/TESTING.md ({heading}) does not name `{pkg}`, which {script} installs"
                );
                named += 1;
            }
        }
        for part in text.split("cargo install --locked ").skip(1) {
            let tool = part.split_whitespace().next().unwrap_or_default();
            assert!(
                described.contains(tool),
                "docs/TESTING.md ({heading}) does not name `{tool}`, which {script} installs"
            );
            named += 1;
        }
    }
    assert!(named >= 14, "read the packages from test.sh and .ci/run ({named})");
}
