//! The control plane's Kubernetes manifests (`deploy/kubernetes/ringside.yaml`), built from
//! k8s-openapi's typed structs and the constants `ringctl inject` uses, so the node directory the
//! daemon puts its proxy socket in is the one injected sidecars mount. A test compares the file
//! with what this code builds (`RINGSIDE_BLESS=1` rewrites it).
//!
//! What it holds: the `ringside-system` namespace, a service account with no API access (the
//! daemon never calls the Kubernetes API, so there is no RBAC to grant), the `ringctl` ConfigMap
//! (etcd endpoints, trust domain) and `ringctl daemon` as a DaemonSet: one per node, root without
//! any capability, sockets in the node's `/run/ringside` (the operator socket, and the proxy socket
//! in `/run/ringside/proxy`, the only directory pods mount). Secrets (the CA secret, etcd's client
//! certificate) are made by the operator, never written in a file.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapKeySelector, Container, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HostPathVolumeSource, Namespace, PodSpec, PodTemplateSpec, ResourceRequirements,
    SecretVolumeSource, SecurityContext, ServiceAccount, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::inject::{NODE_PROXY_DIR, PROXY_SOCKET_NAME};

/// The control plane's namespace.
pub const NAMESPACE: &str = "ringside-system";
/// The DaemonSet, its ConfigMap and its service account.
pub const NAME: &str = "ringctl";
/// The Secret with the CA secret (key `secret`), made with `ringctl ca secret`.
pub const CA_SECRET: &str = "ringside-ca";
/// The Secret with etcd's CA and the daemon's client certificate (`ca.pem`, `cert.pem`, `key.pem`).
pub const ETCD_SECRET: &str = "ringside-etcd-client";
/// On every node: the daemon's sockets.
pub const NODE_RUN_DIR: &str = "/run/ringside";

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some(labels()),
        ..Default::default()
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), NAME.to_string()),
        (
            "app.kubernetes.io/part-of".to_string(),
            "ringside".to_string(),
        ),
    ])
}

fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: read_only.then_some(true),
        ..Default::default()
    }
}

fn config_env(name: &str, key: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            config_map_key_ref: Some(ConfigMapKeySelector {
                name: NAME.into(),
                key: key.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            // The daemon refuses a CA secret others can read.
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The `ringctl daemon` DaemonSet.
pub fn daemon_set(image: &str) -> DaemonSet {
    let args: Vec<String> = [
        "daemon",
        "--store",
        "$(RINGSIDE_STORE)",
        "--trust-domain",
        "$(RINGSIDE_TRUST_DOMAIN)",
        "--ca-secret",
        "/etc/ringside/ca/secret",
        "--etcd-ca",
        "/etc/ringside/etcd/ca.pem",
        "--etcd-cert",
        "/etc/ringside/etcd/cert.pem",
        "--etcd-key",
        "/etc/ringside/etcd/key.pem",
        "--data-dir",
        "/var/lib/ringctl",
        "--socket",
        &format!("{NODE_RUN_DIR}/ctl.sock"),
        "--proxy-socket",
        &format!("{NODE_PROXY_DIR}/{PROXY_SOCKET_NAME}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let container = Container {
        name: NAME.into(),
        image: Some(image.into()),
        command: Some(vec!["ringctl".into()]),
        args: Some(args),
        env: Some(vec![
            config_env("RINGSIDE_STORE", "store"),
            config_env("RINGSIDE_TRUST_DOMAIN", "trust-domain"),
        ]),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("50m".into())),
                ("memory".to_string(), Quantity("64Mi".into())),
            ])),
            ..Default::default()
        }),
        // Root, to own the sockets in the node's /run/ringside, but no capability at all.
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            mount("run", NODE_RUN_DIR, false),
            mount("data", "/var/lib/ringctl", false),
            mount("ca-secret", "/etc/ringside/ca", true),
            mount("etcd-client", "/etc/ringside/etcd", true),
        ]),
        ..Default::default()
    };
    let selector = BTreeMap::from([("app.kubernetes.io/name".to_string(), NAME.to_string())]);
    DaemonSet {
        metadata: meta(NAME, Some(NAMESPACE)),
        spec: DaemonSetSpec {
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    ..Default::default()
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels()),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(NAME.into()),
                    automount_service_account_token: Some(false),
                    priority_class_name: Some("system-node-critical".into()),
                    // Every node, tainted or not: a node without its daemon cannot start meshed pods.
                    tolerations: Some(vec![Toleration {
                        operator: Some("Exists".into()),
                        ..Default::default()
                    }]),
                    containers: vec![container],
                    volumes: Some(vec![
                        Volume {
                            name: "run".into(),
                            host_path: Some(HostPathVolumeSource {
                                path: NODE_RUN_DIR.into(),
                                type_: Some("DirectoryOrCreate".into()),
                            }),
                            ..Default::default()
                        },
                        Volume {
                            name: "data".into(),
                            // With etcd the state is the mesh's, in etcd: nothing to keep here.
                            empty_dir: Some(EmptyDirVolumeSource::default()),
                            ..Default::default()
                        },
                        secret_volume("ca-secret", CA_SECRET),
                        secret_volume("etcd-client", ETCD_SECRET),
                    ]),
                    ..Default::default()
                }),
            },
            ..Default::default()
        },
        ..Default::default()
    }
}

/// The whole file: namespace, service account, ConfigMap, DaemonSet.
pub fn control_plane(image: &str) -> Result<String, serde_yaml::Error> {
    let mut ns_meta = meta(NAMESPACE, None);
    // hostPath volumes (the daemon's, the sidecars') need the privileged Pod Security level.
    ns_meta.labels.get_or_insert_default().insert(
        "pod-security.kubernetes.io/enforce".into(),
        "privileged".into(),
    );
    let namespace = Namespace {
        metadata: ns_meta,
        ..Default::default()
    };
    let account = ServiceAccount {
        metadata: meta(NAME, Some(NAMESPACE)),
        automount_service_account_token: Some(false),
        ..Default::default()
    };
    let config = ConfigMap {
        metadata: meta(NAME, Some(NAMESPACE)),
        data: Some(BTreeMap::from([
            (
                "store".to_string(),
                "etcd://etcd-0.etcd.ringside-system.svc:2379,etcd-1.etcd.ringside-system.svc:2379,etcd-2.etcd.ringside-system.svc:2379".to_string(),
            ),
            ("trust-domain".to_string(), "dc1".to_string()),
        ])),
        ..Default::default()
    };
    let mut out = String::from(HEADER);
    for doc in [
        serde_yaml::to_value(&namespace)?,
        serde_yaml::to_value(&account)?,
        serde_yaml::to_value(&config)?,
        serde_yaml::to_value(daemon_set(image))?,
    ] {
        out.push_str("---\n");
        out.push_str(&crate::inject::yaml::to_yaml(&doc));
    }
    Ok(out)
}

const HEADER: &str = "\
# ringside's control plane: `ringctl daemon` on every node (a DaemonSet) on a shared etcd.
# Generated from ctl/src/deploy.rs (a test checks it; RINGSIDE_BLESS=1 cargo test -p ringside-ctl
# deploy rewrites it). Before applying: set `store` in the ConfigMap to your etcd, the image, and
# create the two Secrets (README.md, \"Deploy\"):
#   kubectl -n ringside-system create secret generic ringside-ca --from-file=secret=ca.secret
#   kubectl -n ringside-system create secret generic ringside-etcd-client \\
#     --from-file=ca.pem --from-file=cert.pem --from-file=key.pem
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_kubernetes_ringside_yaml_is_what_the_code_builds() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/kubernetes/ringside.yaml"
        );
        let want = control_plane(crate::inject::DEFAULT_IMAGE).unwrap();
        if std::env::var("RINGSIDE_BLESS").is_ok_and(|v| v == "1") {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "deploy/kubernetes/ringside.yaml differs from ctl/src/deploy.rs: run RINGSIDE_BLESS=1 cargo test -p ringside-ctl deploy"
        );
    }

    #[test]
    fn the_daemon_puts_its_proxy_socket_where_injected_sidecars_mount_it() {
        let ds = daemon_set("x");
        let spec = ds.spec.template.spec.unwrap();
        let args = spec.containers[0].args.clone().unwrap();
        let i = args.iter().position(|a| a == "--proxy-socket").unwrap();
        let socket = std::path::Path::new(&args[i + 1]);
        assert_eq!(
            socket.parent().unwrap(),
            std::path::Path::new(NODE_PROXY_DIR)
        );
        // And that directory is under the daemon's hostPath, so the node sees it.
        let run = spec.volumes.unwrap()[0].host_path.clone().unwrap().path;
        assert!(NODE_PROXY_DIR.starts_with(&format!("{run}/")));
    }
}
