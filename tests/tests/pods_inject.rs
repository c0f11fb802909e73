//! A Kubernetes node, without the kubelet: the commands of the manifests, run here as the kubelet
//! would run them. `ringctl daemon` from deploy/kubernetes/ringside.yaml's DaemonSet (its args,
//! its env from the ConfigMap, its mounts, root without capabilities) on a real etcd with TLS;
//! then a Deployment through `ringctl inject`, whose pod spec is read back from the output: the
//! init container's command installs the redirect rules with NET_ADMIN and NET_RAW only (and
//! cannot without them), the sidecar's command runs as its uid with the token from its Secret and
//! passes its startup probe on 15021, registered with the daemon.
//!
//! Volumes are directories here: a mount path in a command is replaced by the directory that
//! stands for its volume (the hostPath `/run/ringside` is one directory shared by the daemon and
//! the pod, as on a node).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringside_tests::etcd::Etcd;
use ringside_tests::pod::{pods_available, sh, Net, Pod};
use ringside_tests::{wait_for, workspace_bin, ChildGuard};
use serde_yaml::Value;

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .into_iter()
        .flatten()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_sequence()
        .and_then(|l| l.iter().find(|c| c["name"].as_str() == Some(name)))
        .unwrap_or_else(|| panic!("no '{name}' in {list:?}"))
}

/// A container's command line as the kubelet makes it: command + args, `$(VAR)` replaced from
/// its environment, then mount paths replaced by the directories standing for their volumes.
fn command_line(
    c: &Value,
    env: &HashMap<String, String>,
    mounts: &[(String, PathBuf)],
) -> Vec<String> {
    let mut argv = strs(&c["command"]);
    argv.extend(strs(&c["args"]));
    argv.into_iter()
        .map(|a| {
            let mut a = a;
            for (k, v) in env {
                a = a.replace(&format!("$({k})"), v);
            }
            assert!(!a.contains("$("), "unresolved variable in {a}");
            for (path, dir) in mounts {
                match a.strip_prefix(path.as_str()) {
                    Some(rest) if rest.is_empty() || rest.starts_with('/') => {
                        return format!("{}{rest}", dir.display())
                    }
                    _ => {}
                }
            }
            a
        })
        .collect()
}

/// The container's environment, resolved like the kubelet does.
fn environment(c: &Value, resolve: impl Fn(&Value) -> String) -> HashMap<String, String> {
    c["env"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let value = match e.get("value") {
                Some(v) => v.as_str().unwrap().to_string(),
                None => resolve(&e["valueFrom"]),
            };
            (name, value)
        })
        .collect()
}

/// Directories standing for a container's volume mounts; `volume` says which for each volume.
fn mounts(
    c: &Value,
    volumes: &Value,
    volume: impl Fn(&Value) -> PathBuf,
) -> Vec<(String, PathBuf)> {
    c["volumeMounts"]
        .as_sequence()
        .into_iter()
        .flatten()
        .map(|m| {
            let v = named(volumes, m["name"].as_str().unwrap());
            (m["mountPath"].as_str().unwrap().to_string(), volume(v))
        })
        .collect()
}

/// The read-only mounts of a container: each of its `readOnly` mount paths gets a mount point of
/// its own, where the container's process sees its volume's directory bound read-only (in a
/// mount namespace of its own, see [`container_cmd`]). Returns the mounts to use and the binds.
fn read_only(
    tag: &str,
    c: &Value,
    mounts: Vec<(String, PathBuf)>,
) -> (Vec<(String, PathBuf)>, Vec<Bind>) {
    let mut binds = Vec::new();
    let mounts = mounts
        .into_iter()
        .map(|(path, dir)| {
            let m = c["volumeMounts"]
                .as_sequence()
                .unwrap()
                .iter()
                .find(|m| m["mountPath"].as_str() == Some(path.as_str()))
                .unwrap();
            if m["readOnly"] != Value::Bool(true) {
                return (path, dir);
            }
            let point = dir_for(&format!("{tag}-ro{}", binds.len()), 0, 0o755);
            binds.push(Bind {
                from: dir,
                to: point.clone(),
            });
            (path, point)
        })
        .collect();
    (mounts, binds)
}

/// A directory bound read-only at a mount point.
#[derive(Debug, Clone)]
struct Bind {
    from: PathBuf,
    to: PathBuf,
}

/// `setpriv` arguments for a container's securityContext: its uid and gid, its capabilities
/// (the bounding set: a root process gets exactly those), no new privileges.
fn setpriv(sc: &Value) -> Vec<String> {
    let uid = sc["runAsUser"].as_i64().expect("runAsUser");
    let gid = sc["runAsGroup"].as_i64().unwrap_or(uid);
    let add: Vec<String> = strs(&sc["capabilities"]["add"])
        .iter()
        .map(|c| format!("+{}", c.to_lowercase()))
        .collect();
    assert_eq!(strs(&sc["capabilities"]["drop"]), ["ALL"]);
    assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
    let mut bounding = vec!["-all".to_string()];
    bounding.extend(add);
    vec![
        "setpriv".into(),
        format!("--reuid={uid}"),
        format!("--regid={gid}"),
        "--clear-groups".into(),
        "--no-new-privs".into(),
        "--inh-caps=-all".into(),
        format!("--bounding-set={}", bounding.join(",")),
        "--".into(),
    ]
}

/// Run a container's command line in `pod` (or on the node, `pod` None) under its
/// securityContext; the binary is this workspace's.
fn container_cmd(pod: Option<&Pod>, sc: &Value, argv: &[String], binds: &[Bind]) -> Command {
    let mut cmd = match pod {
        Some(p) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &p.name]);
            c
        }
        None => Command::new("env"),
    };
    if !binds.is_empty() {
        let mut script = String::new();
        for b in binds {
            let (from, to) = (b.from.display(), b.to.display());
            script.push_str(&format!(
                "mount --bind {from} {to} && mount -o remount,bind,ro {to} && "
            ));
        }
        script.push_str("exec \"$@\"");
        cmd.args([
            "unshare",
            "-m",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
            "sh",
        ]);
    }
    cmd.args(setpriv(sc))
        .arg(workspace_bin(&argv[0]))
        .args(&argv[1..]);
    cmd
}

fn dir_for(tag: &str, uid: u32, mode: u32) -> PathBuf {
    let d = std::env::temp_dir().join(format!("inject-node-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::chown(&d, Some(uid), Some(uid)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

fn http_status(addr: std::net::SocketAddr, path: &str) -> Option<u16> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    r.split_whitespace().nth(1)?.parse().ok()
}

const APP: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations:
        ringside.io/exclude-outbound-ports: \"5432\"
        ringside.io/exclude-inbound-ports: \"8081\"
    spec:
      containers:
        - name: web
          image: web:1
          ports: [{name: http, containerPort: 8080}, {name: health, containerPort: 8081}]
          readinessProbe: {httpGet: {path: /ready, port: health}}
";

#[test]
fn a_node_runs_the_daemonset_and_an_injected_pod() {
    if !pods_available("a_node_runs_the_daemonset_and_an_injected_pod") {
        return;
    }
    // The control plane's manifests, as checked in.
    let manifests = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/ringside.yaml"),
    )
    .unwrap();
    let all = docs(&manifests);
    let find = |kind: &str| {
        all.iter()
            .find(|d| d["kind"].as_str() == Some(kind))
            .unwrap()
    };
    let (config, ds) = (find("ConfigMap"), find("DaemonSet"));
    let pod_spec = &ds["spec"]["template"]["spec"];
    let daemon = named(&pod_spec["containers"], "ringctl");

    let etcd = Etcd::start_tls();
    let tls = etcd.tls.clone().unwrap();
    // The node's /run/ringside, shared by the daemon and the pods.
    let node_run = dir_for("run", 0, 0o755);
    let secret_dir = |tag: &str, files: &[(&str, &Path)]| {
        let d = dir_for(tag, 0, 0o755);
        for (key, from) in files {
            std::fs::copy(from, d.join(key)).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join(key), std::fs::Permissions::from_mode(0o400)).unwrap();
        }
        d
    };
    let ca_dir = secret_dir("ca", &[("secret", &etcd.ca_secret())]);
    let etcd_dir = secret_dir(
        "etcd",
        &[
            ("ca.pem", &tls.ca),
            ("cert.pem", &tls.client_cert),
            ("key.pem", &tls.client_key),
        ],
    );
    let data_dir = dir_for("data", 0, 0o755);
    let d_mounts = mounts(daemon, &pod_spec["volumes"], |v| {
        if let Some(p) = v["hostPath"]["path"].as_str() {
            assert_eq!(p, "/run/ringside");
            return node_run.clone();
        }
        match v["secret"]["secretName"].as_str() {
            Some("ringside-ca") => ca_dir.clone(),
            Some("ringside-etcd-client") => etcd_dir.clone(),
            Some(other) => panic!("unexpected secret {other}"),
            None => {
                assert!(v.get("emptyDir").is_some(), "{v:?}");
                data_dir.clone()
            }
        }
    });
    let d_env = environment(daemon, |from| {
        let r = &from["configMapKeyRef"];
        assert_eq!(r["name"], config["metadata"]["name"]);
        let key = r["key"].as_str().unwrap();
        // The ConfigMap's etcd is the operator's to set; here it is the test's member.
        if key == "store" {
            etcd.url()
        } else {
            config["data"][key].as_str().unwrap().to_string()
        }
    });
    let (d_mounts, d_binds) = read_only("daemon", daemon, d_mounts);
    let argv = command_line(daemon, &d_env, &d_mounts);
    let log = std::fs::File::create(data_dir.join("daemon.log")).unwrap();
    let _daemon = ChildGuard::spawn(
        container_cmd(None, &daemon["securityContext"], &argv, &d_binds)
            .stdout(Stdio::null())
            .stderr(log),
    );
    let (ctl_sock, proxy_sock) = (node_run.join("ctl.sock"), node_run.join("proxy/proxy.sock"));
    let daemon_log = || std::fs::read_to_string(data_dir.join("daemon.log")).unwrap_or_default();
    let start = Instant::now();
    while !(std::os::unix::net::UnixStream::connect(&ctl_sock).is_ok()
        && std::os::unix::net::UnixStream::connect(&proxy_sock).is_ok())
    {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the DaemonSet's daemon did not come up: {argv:?}\n{}",
            daemon_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ringctl = |args: &[&str]| -> String {
        let out = Command::new(workspace_bin("ringctl"))
            .args(args)
            .arg("--socket")
            .arg(&ctl_sock)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ringctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            daemon_log()
        );
        String::from_utf8(out.stdout).unwrap()
    };
    ringctl(&["register", "service", "web", "--port", "80:8080"]);
    let token = ringctl(&["token", "create", "--service", "web"])
        .split_whitespace()
        .find(|w| w.len() == 64)
        .unwrap()
        .to_string();

    // The app, injected.
    let mut child = Command::new(workspace_bin("ringctl"))
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(APP.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = docs(&String::from_utf8(out.stdout).unwrap()).remove(0);
    let spec = &injected["spec"]["template"]["spec"];
    let (init, sidecar) = (
        named(&spec["initContainers"], "ringside-init"),
        named(&spec["initContainers"], "ringside"),
    );

    let mut net = Net::new();
    let pod = net.pod("web");
    // The kubelet probes from the node, outside the pod (from inside, the pod's own traffic would
    // be redirected to the proxy): another namespace on the same network.
    let node = net.pod("node");

    // The init container: root, NET_ADMIN and NET_RAW only.
    let init_argv = command_line(init, &HashMap::new(), &[]);
    let show = || {
        sh(&[
            workspace_bin("ringside-init").to_str().unwrap(),
            "show",
            "--netns",
            &pod.name,
        ])
    };
    // Without the capabilities the same command cannot install anything: the bounding set bites.
    let mut bare = init["securityContext"].clone();
    bare["capabilities"]["add"] = Value::Sequence(vec![]);
    let denied = container_cmd(Some(&pod), &bare, &init_argv, &[])
        .output()
        .unwrap();
    assert!(
        !denied.status.success(),
        "ringside-init worked without NET_ADMIN"
    );
    assert_eq!(show().trim(), "", "rules installed without NET_ADMIN");
    let done = container_cmd(Some(&pod), &init["securityContext"], &init_argv, &[])
        .output()
        .unwrap();
    assert!(
        done.status.success(),
        "{init_argv:?}: {}{}",
        String::from_utf8_lossy(&done.stdout),
        String::from_utf8_lossy(&done.stderr)
    );
    let rules = show();
    for needle in ["15001", "15006", "5432", "8081", "1337"] {
        assert!(rules.contains(needle), "no {needle} in the rules:\n{rules}");
    }

    // The sidecar: its uid, the token from its Secret, the node's proxy socket.
    let uid = sidecar["securityContext"]["runAsUser"].as_i64().unwrap() as u32;
    assert_eq!(uid, 1337);
    let state = dir_for("state", uid, 0o700);
    let s_mounts = mounts(sidecar, &spec["volumes"], |v| {
        if let Some(p) = v["hostPath"]["path"].as_str() {
            // A directory inside the node's /run/ringside: the one the daemon put its socket in.
            let rel = p
                .strip_prefix("/run/ringside/")
                .expect("under /run/ringside");
            return node_run.join(rel);
        }
        assert_eq!(v["emptyDir"]["medium"].as_str(), Some("Memory"));
        state.clone()
    });
    let pod_name = "web-5d8c7b9f4-x2x7q";
    let s_env = environment(sidecar, |from| {
        if let Some(f) = from["fieldRef"]["fieldPath"].as_str() {
            return match f {
                "status.podIP" => pod.ip4.to_string(),
                "metadata.name" => pod_name.into(),
                "metadata.namespace" => "shop".into(),
                other => panic!("unexpected fieldRef {other}"),
            };
        }
        let s = &from["secretKeyRef"];
        assert_eq!(s["name"].as_str(), Some("ringside-token-web"));
        assert_eq!(s["key"].as_str(), Some("token"));
        token.clone()
    });
    // The node's proxy directory is mounted read-only: connecting to a socket needs no write.
    let (s_mounts, s_binds) = read_only("sidecar", sidecar, s_mounts);
    assert_eq!(s_binds.len(), 1, "{s_binds:?}");
    let argv = command_line(sidecar, &s_env, &s_mounts);
    let log_path = state.join("sidecar.log");
    let mut cmd = container_cmd(Some(&pod), &sidecar["securityContext"], &argv, &s_binds);
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .envs(&s_env)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut side = ChildGuard::spawn(&mut cmd);
    let sidecar_log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // The startup probe, as the kubelet sends it: to the pod's address.
    let probe = &sidecar["startupProbe"];
    let port = probe["httpGet"]["port"].as_u64().unwrap() as u16;
    let path = probe["httpGet"]["path"].as_str().unwrap().to_string();
    let budget =
        probe["periodSeconds"].as_u64().unwrap() * probe["failureThreshold"].as_u64().unwrap();
    let addr = pod.addr4(port);
    let start = Instant::now();
    loop {
        let p = path.clone();
        let status = node.enter(move || http_status(addr, &p)).join().unwrap();
        if status == Some(200) {
            break;
        }
        if let Ok(Some(st)) = side.0.try_wait() {
            panic!("the sidecar exited ({st}): {argv:?}\n{}", sidecar_log());
        }
        assert!(
            start.elapsed() < Duration::from_secs(budget),
            "startup probe not passed within {budget}s (last: {status:?}): {}",
            sidecar_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ready_after = start.elapsed();
    // The daemon knows it under its pod's name, with its address.
    let id = format!("{pod_name}.shop");
    wait_for("the proxy's report", Duration::from_secs(15), || {
        ringctl(&["get", "proxies", "-o", "json"]).contains(&id)
    });
    let endpoints = ringctl(&["get", "endpoints", "-o", "json"]);
    assert!(endpoints.contains(&pod.ip4.to_string()), "{endpoints}");
    eprintln!("injected sidecar ready on :{port}{path} {ready_after:?} after start");

    side.signal(libc::SIGTERM);
    let st = side.wait_timeout(Duration::from_secs(20));
    assert!(st.success(), "sidecar exit {st}: {}", sidecar_log());
    drop(side);
    drop(_daemon);
    let points = d_binds.iter().chain(&s_binds).map(|b| &b.to);
    for d in [&node_run, &ca_dir, &etcd_dir, &data_dir, &state]
        .into_iter()
        .chain(points)
    {
        let _ = std::fs::remove_dir_all(d);
    }
}
