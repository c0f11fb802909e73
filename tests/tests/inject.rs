//! `ringctl inject` on a corpus of real-looking manifests (tests/inject-corpus): every document
//! comes back, the ones not injected byte for byte, the injected ones with nothing of theirs lost
//! or changed; injecting twice is injecting once; errors print nothing on stdout.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use ringside_tests::workspace_bin;
use serde_yaml::Value;

fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("inject-corpus");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 6, "corpus missing in {}", dir.display());
    files
}

/// `ringctl inject ARGS` with `stdin`; (success, stdout, stderr).
fn inject(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(workspace_bin("ringctl"))
        .arg("inject")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

/// Nulls dropped, numbers as their text (Kubernetes reads `cpu: 1` and `cpu: "1"` alike).
fn normalize(v: &Value) -> Value {
    match v {
        Value::Mapping(m) => Value::Mapping(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), normalize(v)))
                .collect(),
        ),
        Value::Sequence(s) => Value::Sequence(s.iter().map(normalize).collect()),
        Value::Number(n) => Value::String(n.to_string()),
        other => other.clone(),
    }
}

const ADDED_CONTAINERS: [&str; 2] = ["ringside-init", "ringside"];
const ADDED_VOLUMES: [&str; 2] = ["ringside-ctl", "ringside-state"];

/// Pod specs of a workload document (a List's items included), as paths into the document.
fn pod_spec_mut(doc: &mut Value) -> Vec<&mut Value> {
    let kind = doc["kind"].as_str().unwrap_or("").to_string();
    match kind.as_str() {
        "List" => doc["items"]
            .as_sequence_mut()
            .unwrap()
            .iter_mut()
            .flat_map(pod_spec_mut)
            .collect(),
        "Pod" => vec![&mut doc["spec"]],
        "CronJob" => vec![&mut doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => {
            vec![&mut doc["spec"]["template"]["spec"]]
        }
        _ => vec![],
    }
}

/// Take ringside's additions out of an injected document; returns how many pod specs had them.
fn strip(doc: &mut Value, original: &Value) -> usize {
    let mut n = 0;
    let had: Vec<(bool, bool)> = {
        let mut o = original.clone();
        pod_spec_mut(&mut o)
            .into_iter()
            .map(|s| {
                (
                    s.get("initContainers").is_some(),
                    s.get("volumes").is_some(),
                )
            })
            .collect()
    };
    for (spec, (had_init, had_volumes)) in pod_spec_mut(doc).into_iter().zip(had) {
        let Some(m) = spec.as_mapping_mut() else {
            continue;
        };
        let mut found = false;
        for (key, names, had) in [
            ("initContainers", &ADDED_CONTAINERS, had_init),
            ("volumes", &ADDED_VOLUMES, had_volumes),
        ] {
            if let Some(Value::Sequence(list)) = m.get_mut(key) {
                let before = list.len();
                list.retain(|c| !names.contains(&c["name"].as_str().unwrap_or("")));
                found |= list.len() + 2 == before;
                if list.is_empty() && !had {
                    m.remove(key);
                }
            }
        }
        n += usize::from(found);
    }
    n
}

#[test]
fn the_corpus_round_trips() {
    for file in corpus() {
        let name = file.file_name().unwrap().to_string_lossy().to_string();
        let input = std::fs::read_to_string(&file).unwrap();
        let (ok, out, err) = inject(
            &[
                "-f",
                file.to_str().unwrap(),
                "--image",
                "registry.example/ringside:9",
            ],
            "",
        );
        assert!(ok, "{name}: {err}");
        let (before, after) = (docs(&input), docs(&out));
        assert_eq!(
            before.len(),
            after.len(),
            "{name}: documents lost or added:\n{out}"
        );
        let mut injected = 0;
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            let mut a = a.clone();
            let n = strip(&mut a, b);
            // The one thing the typed structs add: a StatefulSet's volumeClaimTemplates are
            // PersistentVolumeClaims and carry their apiVersion and kind (as kubectl prints them).
            if b["kind"].as_str() == Some("StatefulSet") {
                for (t, tb) in a["spec"]["volumeClaimTemplates"]
                    .as_sequence_mut()
                    .into_iter()
                    .flatten()
                    .zip(
                        b["spec"]["volumeClaimTemplates"]
                            .as_sequence()
                            .into_iter()
                            .flatten(),
                    )
                {
                    for key in ["apiVersion", "kind"] {
                        if tb.get(key).is_none() {
                            t.as_mapping_mut().unwrap().remove(key);
                        }
                    }
                }
            }
            injected += n;
            assert_eq!(
                normalize(b),
                normalize(&a),
                "{name}: document {i} changed beyond ringside's additions:\n{}",
                serde_yaml::to_string(&a).unwrap()
            );
        }
        // Every document not injected is there byte for byte: here, each one of the files
        // whose documents are all left alone, and the documents between `---` lines otherwise.
        for chunk in input.split("\n---\n") {
            let v: Value = serde_yaml::from_str(chunk).unwrap();
            let mut probe = v.clone();
            let specs = pod_spec_mut(&mut probe).len();
            let left_alone = specs == 0
                || chunk.contains("ringside.io/inject: disabled")
                || chunk.contains("hostNetwork: true");
            if left_alone {
                assert!(
                    out.contains(chunk.trim_start_matches("---\n")),
                    "{name}: not verbatim:\n{chunk}"
                );
            }
        }
        if name == "untouched.yaml" {
            assert_eq!(out, input, "untouched.yaml must come back as it was");
            assert_eq!(injected, 0);
        } else {
            assert!(injected > 0, "{name}: nothing injected:\n{out}");
        }
        // Each injected pod spec: ringside's two containers first, then the app's, in order.
        for mut d in after.clone() {
            for spec in pod_spec_mut(&mut d) {
                let Some(init) = spec["initContainers"].as_sequence() else {
                    continue;
                };
                let names: Vec<&str> = init.iter().map(|c| c["name"].as_str().unwrap()).collect();
                if names.first() == Some(&"ringside-init") {
                    assert_eq!(names[1], "ringside", "{name}: {names:?}");
                    assert!(!names[2..].iter().any(|n| ADDED_CONTAINERS.contains(n)));
                    assert_eq!(
                        init[0]["image"].as_str(),
                        Some("registry.example/ringside:9")
                    );
                    assert_eq!(init[1]["restartPolicy"].as_str(), Some("Always"));
                }
            }
        }
        let (ok, twice, err) = inject(&["-f", "-"], &out);
        assert!(ok, "{name} (second pass): {err}");
        let (ok, once_default, _) = inject(&["-f", file.to_str().unwrap()], "");
        assert!(ok);
        assert_eq!(
            twice, once_default,
            "{name}: injecting an injected file is injecting the original"
        );
        assert_eq!(
            inject(&["-f", "-", "--image", "registry.example/ringside:9"], &out).1,
            out,
            "{name}: injecting twice is injecting once"
        );
    }
}

#[test]
fn annotations_reach_the_init_container_and_the_report() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("inject-corpus/batch.yaml");
    let (ok, out, err) = inject(&["-f", file.to_str().unwrap()], "");
    assert!(ok, "{err}");
    let d = docs(&out);
    let cron = &d[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    let args: Vec<&str> = cron["initContainers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "install",
            "--proxy-uid",
            "1337",
            "--exclude-outbound-cidrs",
            "169.254.169.254/32,fd00:ec2::254/128"
        ]
    );
    assert_eq!(
        cron["initContainers"][1]["env"][3]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("reports-mesh-token")
    );
    assert!(
        err.contains("CronJob/nightly-report: injected (service reports"),
        "{err}"
    );
    assert!(
        err.contains("Job/reindex: injected (service search"),
        "{err}"
    );
    // A probe the sidecar would refuse is reported, with the fix.
    let pods = Path::new(env!("CARGO_MANIFEST_DIR")).join("inject-corpus/pods.yaml");
    let (ok, _, err) = inject(&["-f", pods.to_str().unwrap()], "");
    assert!(ok);
    assert!(
        err.contains("readinessProbe on port 50051")
            && err.contains("ringside.io/exclude-inbound-ports"),
        "{err}"
    );
    assert!(
        err.contains("Pod/node-agent: left as it is (hostNetwork"),
        "{err}"
    );
}

#[test]
fn stdin_and_several_files() {
    let files = corpus();
    let (ok, from_stdin, _) = inject(&[], &std::fs::read_to_string(&files[0]).unwrap());
    assert!(ok);
    let (ok, from_file, _) = inject(&["-f", files[0].to_str().unwrap()], "");
    assert!(ok);
    assert_eq!(from_stdin, from_file);
    let (ok, both, _) = inject(
        &[
            "-f",
            files[0].to_str().unwrap(),
            "-f",
            files[1].to_str().unwrap(),
        ],
        "",
    );
    assert!(ok);
    assert_eq!(
        docs(&both).len(),
        docs(&from_file).len() + docs(&std::fs::read_to_string(&files[1]).unwrap()).len()
    );
}

#[test]
fn an_error_anywhere_prints_nothing() {
    let good = std::fs::read_to_string(corpus()[0].clone()).unwrap();
    let bad = format!(
        "{good}\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: typo}}\nspec:\n  selector: {{matchLabels: {{app: t}}}}\n  template:\n    metadata:\n      annotations: {{ringside.io/exclude-outbound-ports: \"5432;6379\"}}\n    spec:\n      containers: [{{name: t, image: t, imagePullPolicy: Always, portz: []}}]\n"
    );
    let (ok, out, err) = inject(&[], &bad);
    assert!(!ok);
    assert_eq!(out, "", "nothing on stdout when a document fails");
    assert!(err.contains("Deployment/typo"), "{err}");
    assert!(
        err.contains("spec.template.spec.containers[0].portz"),
        "the unknown field is named: {err}"
    );
    assert!(err.contains("nothing was written"), "{err}");
    let (ok, out, err) = inject(&["-f", "/nonexistent/x.yaml"], "");
    assert!(!ok && out.is_empty());
    assert!(err.contains("/nonexistent/x.yaml"), "{err}");
}
