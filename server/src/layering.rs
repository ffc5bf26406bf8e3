//! A check that the modules of both crates import each other without cycles: each file's
//! `crate::`/`super::` paths (outside comments) are edges between modules (the top level, and
//! one level down inside `engine/` and `transport/`); a use of an enclosing module is not an
//! edge (children use their parent's shared pieces). Run as a unit test on the source tree.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A module: its path segments, at most two deep.
type Node = Vec<String>;

fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable source folder") {
        let path = entry.expect("readable entry").path();
        if path.is_dir() {
            files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module a file belongs to, or `None` for binaries.
fn node_of(relative: &Path) -> Option<Node> {
    let mut parts: Vec<String> = relative
        .with_extension("")
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    if parts[0] == "bin" {
        return None;
    }
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts.truncate(2);
    Some(parts)
}

/// Module → the modules it uses.
pub fn imports(src: &Path) -> BTreeMap<Node, BTreeSet<Node>> {
    let mut paths = vec![];
    files(src, &mut paths);
    let mut known = BTreeSet::new();
    for p in &paths {
        if let Some(n) = node_of(p.strip_prefix(src).unwrap()) {
            known.insert(n);
        }
    }
    let mut edges: BTreeMap<Node, BTreeSet<Node>> = BTreeMap::new();
    for p in &paths {
        let relative = p.strip_prefix(src).unwrap();
        let Some(from) = node_of(relative) else {
            continue;
        };
        let text = std::fs::read_to_string(p).expect("readable source");
        let code: String = text
            .lines()
            .map(|l| l.split("//").next().unwrap_or(""))
            .collect::<Vec<_>>()
            .join("\n");
        for (start, word) in ["crate::", "super::"]
            .iter()
            .flat_map(|w| code.match_indices(w).map(move |(i, _)| (i, *w)))
        {
            let before = code[..start].chars().next_back();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut segments: Vec<String> = code[start + word.len()..]
                .split("::")
                .map(|s| {
                    s.chars()
                        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
                        .collect::<String>()
                })
                .take_while(|s| !s.is_empty())
                .take(2)
                .collect();
            if word == "super::" {
                let mut base: Vec<String> = relative
                    .with_extension("")
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                base.pop();
                if relative.file_stem().is_some_and(|s| s == "mod") {
                    base.pop();
                }
                base.extend(segments);
                segments = base;
            }
            let two: Node = segments.iter().take(2).cloned().collect();
            let one: Node = segments.iter().take(1).cloned().collect();
            let to = if known.contains(&two) { two } else { one };
            let enclosing = from.starts_with(&to) || to.starts_with(&from);
            if known.contains(&to) && !enclosing {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    edges
}

/// Every cycle found by a depth-first walk, as module paths.
pub fn cycles(edges: &BTreeMap<Node, BTreeSet<Node>>) -> Vec<String> {
    fn walk(
        n: &Node,
        edges: &BTreeMap<Node, BTreeSet<Node>>,
        state: &mut BTreeMap<Node, bool>,
        stack: &mut Vec<Node>,
        out: &mut Vec<String>,
    ) {
        state.insert(n.clone(), true);
        stack.push(n.clone());
        for t in edges.get(n).into_iter().flatten() {
            match state.get(t) {
                Some(true) => {
                    let at = stack.iter().position(|s| s == t).unwrap();
                    let path: Vec<String> = stack[at..]
                        .iter()
                        .chain([t])
                        .map(|s| s.join("::"))
                        .collect();
                    out.push(path.join(" → "));
                }
                Some(false) => {}
                None => walk(t, edges, state, stack, out),
            }
        }
        stack.pop();
        state.insert(n.clone(), false);
    }
    let mut state = BTreeMap::new();
    let mut out = vec![];
    for n in edges.keys() {
        if !state.contains_key(n) {
            walk(n, edges, &mut state, &mut vec![], &mut out);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neither_crate_has_an_import_cycle() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for src in [root.join("src"), root.join("../model/src")] {
            let edges = imports(&src);
            assert!(edges.len() > 3, "{}: no modules read", src.display());
            let found = cycles(&edges);
            assert!(
                found.is_empty(),
                "{}: import cycles {found:?}",
                src.display()
            );
        }
    }

    #[test]
    fn a_cycle_is_found() {
        let n = |s: &str| vec![s.to_string()];
        let edges = BTreeMap::from([
            (n("a"), BTreeSet::from([n("b")])),
            (n("b"), BTreeSet::from([n("c")])),
            (n("c"), BTreeSet::from([n("a")])),
        ]);
        assert_eq!(cycles(&edges), vec!["a → b → c → a".to_string()]);
    }
}
