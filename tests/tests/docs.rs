//! docs/reference.md names every reason code and every metric the proxy exports.

#[test]
fn every_reason_code_is_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference.md"))
        .expect("docs/reference.md");
    for r in ringside_core::Reason::ALL {
        assert!(
            doc.contains(&format!("`{}`", r.as_str())),
            "docs/reference.md lacks the reason code {r}"
        );
    }
}

#[test]
fn every_exported_metric_is_documented() {
    use std::net::SocketAddr;
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference.md"))
        .expect("docs/reference.md");
    let listen: SocketAddr = format!("127.0.0.1:{}", ringside_tests::free_port())
        .parse()
        .unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", ringside_tests::free_port())
        .parse()
        .unwrap();
    let _p = ringside_tests::spawn_forward(
        listen,
        &[ringside_tests::refusing_addr()],
        &["--protocol", "http", "--admin", &admin.to_string()],
    );
    let c = ringside_tests::http::Client::new();
    let _ = c.get(&format!("http://{listen}/x"));
    let stats = c.get(&format!("http://{admin}/stats")).unwrap().text();
    for line in stats.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut it = line.split_whitespace().skip(2);
        let (name, kind) = (it.next().unwrap(), it.next().unwrap());
        let exported = if kind == "counter" {
            format!("{name}_total")
        } else {
            name.to_string()
        };
        assert!(
            doc.contains(&format!("`{exported}`")),
            "docs/reference.md lacks the metric {exported}"
        );
    }
}

/// docs/troubleshooting.md maps what operators search for to reason codes: every code it names
/// exists (a renamed code cannot leave it pointing at nothing), and it covers Envoy's
/// "delayed connect error: 111" and the response flags operators meet most.
#[test]
fn troubleshooting_names_real_codes() {
    let doc = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../docs/troubleshooting.md"
    ))
    .expect("docs/troubleshooting.md");
    // Words in backticks that look like codes but are not reason codes.
    let other = ["proxy_not_running", "close_notify", "access_denied"];
    let mut named = 0;
    for word in doc.split('`').skip(1).step_by(2) {
        let code_like = word.contains('_')
            && word.chars().all(|c| c.is_ascii_lowercase() || c == '_')
            && !word.starts_with('_');
        if !code_like || other.contains(&word) {
            continue;
        }
        assert!(
            ringside_core::Reason::ALL
                .iter()
                .any(|r| r.as_str() == word),
            "docs/troubleshooting.md names `{word}`, which is no reason code"
        );
        named += 1;
    }
    assert!(named >= 20, "only {named} reason codes named");
    for needle in [
        "delayed connect error: 111",
        "`UF`",
        "`URX`",
        "`UH`",
        "`NR`",
        "`UAEX`",
        "`DC`",
        "`UC`",
    ] {
        assert!(
            doc.contains(needle),
            "docs/troubleshooting.md lacks {needle}"
        );
    }
}

/// Every global option of `ringctl` and its environment variable is in docs/reference.md.
#[test]
fn ringctl_global_options_are_documented() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/reference.md"))
        .expect("docs/reference.md");
    let out = std::process::Command::new(ringside_tests::workspace_bin("ringctl"))
        .arg("--help")
        .env_remove("RINGCTL_TOKEN")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let mut seen = 0;
    for line in help.lines() {
        // An option's line starts with it: `  -o, --output <X>  what...` or `      --socket <P>`.
        let flag = line
            .trim_start()
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|w| !w.is_empty())
            .take(2)
            .find(|w| w.starts_with("--"));
        if let Some(word) = flag {
            if word != "--help" && word != "--version" {
                assert!(
                    doc.contains(&format!("`{word} ")) || doc.contains(&format!("`{word}`")),
                    "docs/reference.md lacks the global option {word}"
                );
                seen += 1;
            }
        }
        if let Some(rest) = line.split("[env: ").nth(1) {
            let var = rest.split(['=', ']']).next().unwrap();
            assert!(
                doc.contains(&format!("`{var}`")),
                "docs/reference.md lacks the variable {var}"
            );
        }
    }
    assert!(seen >= 5, "no global options in:\n{help}");
}

/// The docs written beside the code (crate and item docs, which are also `ringctl`'s help texts)
/// describe what exists: none says "for now" of something that has since changed.
#[test]
fn no_doc_comment_says_for_now() {
    fn scan(dir: &std::path::Path, found: &mut Vec<String>, files: &mut usize) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                scan(&p, found, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                *files += 1;
                let text = std::fs::read_to_string(&p).unwrap();
                for (i, line) in text.lines().enumerate() {
                    let t = line.trim_start();
                    let doc = t.starts_with("///") || t.starts_with("//!");
                    if doc && t.to_ascii_lowercase().contains("for now") {
                        found.push(format!("{}:{}: {t}", p.display(), i + 1));
                    }
                }
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let (mut found, mut files) = (Vec::new(), 0);
    for dir in ["ctl/src", "core/src"] {
        scan(&root.join(dir), &mut found, &mut files);
    }
    assert!(files > 50, "only {files} source files scanned");
    assert!(
        found.is_empty(),
        "docs that say \"for now\":\n{}",
        found.join("\n")
    );
}
