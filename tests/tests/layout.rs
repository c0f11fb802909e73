//! The data plane's layout holds: folders of `core/src` use each other without cycles, and the
//! decision core (`decide/`, `policy/`) does no I/O: no sockets, no runtime, no clock reads.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn core_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .join("core/src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The code of a file without its `#[cfg(test)] mod tests` (tests may use anything).
fn non_test_code(p: &Path) -> String {
    let s = std::fs::read_to_string(p).unwrap();
    match s.find("#[cfg(test)]\nmod tests") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// folder -> the other folders its code names as `crate::<folder>`.
fn folder_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = core_src();
    let folders: BTreeSet<String> = std::fs::read_dir(&src)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir() && e.file_name() != "bin")
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut g = BTreeMap::new();
    for f in &folders {
        let mut files = Vec::new();
        rust_files(&src.join(f), &mut files);
        let mut uses = BTreeSet::new();
        for file in files {
            let code = non_test_code(&file);
            for other in &folders {
                if other != f && code.contains(&format!("crate::{other}::")) {
                    uses.insert(other.clone());
                }
            }
        }
        g.insert(f.clone(), uses);
    }
    g
}

#[test]
fn folders_have_no_import_cycles() {
    let g = folder_graph();
    assert!(g.len() >= 8, "expected the stage folders: {g:?}");
    // Depth-first search for a back edge.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!(
                "import cycle between folders: {} -> {n}",
                path[i..].join(" -> ")
            );
        }
        if done.contains(n) {
            return;
        }
        path.push(n.to_string());
        for m in &g[n] {
            visit(m, g, path, done);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        visit(n, &g, &mut Vec::new(), &mut done);
    }
    eprintln!("folder graph: {g:#?}");
}

#[test]
fn the_decision_core_does_no_io() {
    let src = core_src();
    for folder in ["decide", "policy"] {
        let mut files = Vec::new();
        rust_files(&src.join(folder), &mut files);
        assert!(!files.is_empty());
        for file in files {
            let code = non_test_code(&file);
            for banned in [
                "monoio::",
                "tokio::",
                "std::net::TcpStream",
                "std::fs::",
                "Instant::now()",
                "SystemTime::now()",
                "crate::io::",
                "crate::conn::",
                "crate::l7::",
                "crate::server::",
                "libc::",
                "unsafe",
            ] {
                assert!(
                    !code.contains(banned),
                    "{} uses {banned}: the decision core must stay sans-IO",
                    file.display()
                );
            }
        }
    }
}
