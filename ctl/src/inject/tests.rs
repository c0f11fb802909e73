use super::*;

fn opts() -> Options {
    Options {
        image: "registry.example/ringside:1".into(),
    }
}

fn run(text: &str) -> Injected {
    inject(text, &opts()).unwrap_or_else(|e| panic!("inject failed: {e}"))
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn pod_spec<'a>(doc: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(doc, |v, k| &v[*k])
}

fn names(list: &Value) -> Vec<String> {
    list.as_sequence()
        .map(|s| {
            s.iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn argv(c: &Value) -> Vec<String> {
    c["command"]
        .as_sequence()
        .into_iter()
        .flatten()
        .chain(c["args"].as_sequence().into_iter().flatten())
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

const DEPLOYMENT: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
      annotations:
        ringside.io/exclude-outbound-ports: \"5432, 6379\"
        ringside.io/exclude-inbound-ports: \"9090\"
    spec:
      initContainers:
        - name: migrate
          image: web:1
          command: [./migrate]
      containers:
        - name: web
          image: web:1
          ports:
            - {name: http, containerPort: 8080}
            - {name: health, containerPort: 9090}
          readinessProbe:
            httpGet: {path: /ready, port: health}
          resources:
            requests: {cpu: 1, memory: 128Mi}
";

#[test]
fn split_keeps_every_byte_and_finds_the_documents() {
    let text = "# leading comment\n---\na: 1\n--- # second\nb: 2\n---x: not a marker\n---\n";
    let chunks = split(text);
    assert_eq!(
        chunks.iter().map(|c| c.whole).collect::<String>(),
        text,
        "the chunks are the whole text"
    );
    assert_eq!(chunks.len(), 4);
    assert_eq!(chunks[0].body, "# leading comment\n");
    assert!(!chunks[0].separated);
    assert_eq!(chunks[1].body, "\na: 1\n");
    assert_eq!(chunks[1].line, 2);
    assert_eq!(chunks[2].body, " # second\nb: 2\n---x: not a marker\n");
    assert_eq!(chunks[2].line, 4);
    assert_eq!(chunks[3].whole, "---\n");
    assert_eq!(split("").len(), 1);
}

#[test]
fn documents_that_are_not_workloads_are_written_back_byte_for_byte() {
    let text = "# a service, with comments\n---\napiVersion: v1\nkind: Service  # trailing\nmetadata: {name: web}\nspec:\n  ports: [{port: 80, targetPort: http}]\n---\n# just a comment\n---\napiVersion: example.com/v1\nkind: Widget\nspec: {anything: [1, 2]}\n...\n";
    let r = run(text);
    assert_eq!(r.text, text);
    assert!(r.notes.is_empty());
}

#[test]
fn a_deployment_gets_the_init_container_and_the_native_sidecar_first() {
    let r = run(DEPLOYMENT);
    let d = &docs(&r.text)[0];
    let spec = pod_spec(d, &["spec", "template", "spec"]);
    assert_eq!(
        names(&spec["initContainers"]),
        ["ringside-init", "ringside", "migrate"],
        "the app's init containers come after the sidecar, so they have the mesh"
    );
    let init = &spec["initContainers"][0];
    assert_eq!(
        argv(init),
        [
            "ringside-init",
            "install",
            "--proxy-uid",
            "1337",
            "--exclude-outbound-ports",
            "5432,6379",
            "--exclude-inbound-ports",
            "9090"
        ]
    );
    let sc = &init["securityContext"];
    assert_eq!(
        sc["capabilities"]["add"],
        serde_yaml::from_str::<Value>("[NET_ADMIN, NET_RAW]").unwrap()
    );
    assert_eq!(
        sc["capabilities"]["drop"],
        serde_yaml::from_str::<Value>("[ALL]").unwrap()
    );
    assert_eq!(sc["allowPrivilegeEscalation"], Value::Bool(false));
    assert_eq!(init["image"].as_str(), Some("registry.example/ringside:1"));
    assert!(init.get("restartPolicy").is_none());

    let side = &spec["initContainers"][1];
    assert_eq!(side["restartPolicy"].as_str(), Some("Always"));
    assert_eq!(side["securityContext"]["runAsUser"].as_i64(), Some(1337));
    assert_eq!(side["securityContext"]["runAsNonRoot"], Value::Bool(true));
    assert!(side["securityContext"]["capabilities"].get("add").is_none());
    assert_eq!(
        side["startupProbe"]["httpGet"]["port"].as_i64(),
        Some(15021)
    );
    assert_eq!(
        side["startupProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz/ready")
    );
    let a = argv(side);
    assert_eq!(&a[..2], ["ringside", "run"]);
    assert!(a
        .windows(2)
        .any(|w| w == ["--ctl", "/var/run/ringside/proxy.sock"]));
    assert!(a.windows(2).any(|w| w == ["--address", "$(POD_IP)"]));
    let token = &side["env"][3];
    assert_eq!(token["name"].as_str(), Some("RINGSIDE_TOKEN"));
    assert_eq!(
        token["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("ringside-token-web")
    );
    assert!(
        !a.iter().any(|x| x.contains("token")),
        "no token on the command line"
    );
    assert_eq!(names(&spec["volumes"]), ["ringside-ctl", "ringside-state"]);
    assert_eq!(
        spec["volumes"][0]["hostPath"]["path"].as_str(),
        Some("/run/ringside/proxy")
    );
    // The app is as it was.
    assert_eq!(names(&spec["containers"]), ["web"]);
    let app = &spec["containers"][0];
    assert_eq!(app["resources"]["requests"]["cpu"].as_str(), Some("1"));
    assert_eq!(d["spec"]["replicas"].as_i64(), Some(2));
    assert!(r.notes[0].what.starts_with("injected (service web"));
    assert!(
        r.notes.iter().all(|n| !n.what.contains("port 9090")),
        "a probe on an excluded port is fine: {:?}",
        r.notes
    );
}

#[test]
fn injecting_twice_is_injecting_once() {
    let once = run(DEPLOYMENT).text;
    let twice = run(&once).text;
    assert_eq!(once, twice);
    // Changed annotations replace the earlier injection rather than adding a second one.
    let changed = once.replace("9090\"", "9091\"").replace("'9090'", "'9091'");
    let again = run(&changed).text;
    let d = &docs(&again)[0];
    let init = &d["spec"]["template"]["spec"]["initContainers"];
    assert_eq!(names(init), ["ringside-init", "ringside", "migrate"]);
    assert!(argv(&init[0]).contains(&"9091".to_string()), "{again}");
}

#[test]
fn a_field_the_typed_structs_do_not_know_is_an_error_not_a_loss() {
    let text = DEPLOYMENT.replace(
        "          image: web:1\n          ports:",
        "          image: web:1\n          imagePullPolicyy: Always\n          ports:",
    );
    let e = inject(&text, &opts()).unwrap_err();
    match e {
        InjectError::Field {
            field, id, line, ..
        } => {
            assert_eq!(field, "spec.template.spec.containers[0].imagePullPolicyy");
            assert_eq!(id, "Deployment/web");
            assert_eq!(line, 1);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn wrong_types_name_the_field() {
    let text = DEPLOYMENT.replace("replicas: 2", "replicas: two");
    let e = inject(&text, &opts()).unwrap_err().to_string();
    assert!(e.contains("field `spec.replicas`"), "{e}");
}

#[test]
fn bad_annotations_name_the_annotation() {
    for (from, to, field) in [
        (
            "\"5432, 6379\"",
            "\"5432,x\"",
            "ringside.io/exclude-outbound-ports",
        ),
        ("\"9090\"", "\"70000\"", "ringside.io/exclude-inbound-ports"),
        (
            "ringside.io/exclude-inbound-ports: \"9090\"",
            "ringside.io/exclude-outbound-cidrs: \"10.0.0.0/33\"",
            "ringside.io/exclude-outbound-cidrs",
        ),
        (
            "ringside.io/exclude-inbound-ports: \"9090\"",
            "ringside.io/inject: maybe",
            "ringside.io/inject",
        ),
        (
            "ringside.io/exclude-inbound-ports: \"9090\"",
            "ringside.io/service: Web_App",
            "ringside.io/service",
        ),
        (
            "ringside.io/exclude-inbound-ports: \"9090\"",
            "ringside.io/proxy-workers: \"0\"",
            "ringside.io/proxy-workers",
        ),
    ] {
        let text = DEPLOYMENT.replace(from, to);
        assert_ne!(text, DEPLOYMENT);
        let e = inject(&text, &opts()).unwrap_err().to_string();
        assert!(
            e.contains(&format!("spec.template.metadata.annotations.{field}")),
            "{field}: {e}"
        );
    }
}

#[test]
fn disabled_and_host_network_workloads_are_left_byte_for_byte() {
    let disabled = DEPLOYMENT.replace(
        "ringside.io/exclude-inbound-ports: \"9090\"",
        "ringside.io/inject: disabled",
    );
    let r = run(&disabled);
    assert_eq!(r.text, disabled);
    assert!(r.notes[0].what.contains("disabled"), "{:?}", r.notes);
    let host = DEPLOYMENT.replace(
        "      initContainers:",
        "      hostNetwork: true\n      initContainers:",
    );
    let r = run(&host);
    assert_eq!(r.text, host);
    assert!(r.notes[0].what.contains("hostNetwork"), "{:?}", r.notes);
}

#[test]
fn an_old_api_version_is_left_alone_and_said_so() {
    let old = DEPLOYMENT.replace("apiVersion: apps/v1", "apiVersion: extensions/v1beta1");
    let r = run(&old);
    assert_eq!(r.text, old);
    assert!(
        r.notes[0].what.contains("extensions/v1beta1"),
        "{:?}",
        r.notes
    );
}

#[test]
fn an_app_port_among_the_sidecars_is_refused() {
    let text = DEPLOYMENT.replace("containerPort: 8080", "containerPort: 15006");
    let e = inject(&text, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("spec.template.spec.containers[0].ports[0].containerPort"),
        "{e}"
    );
}

#[test]
fn probes_through_the_sidecar_are_reported_and_unknown_port_names_refused() {
    let text = DEPLOYMENT.replace(
        "ringside.io/exclude-inbound-ports: \"9090\"",
        "ringside.io/service: shop",
    );
    let r = run(&text);
    assert!(
        r.notes
            .iter()
            .any(|n| n.what.contains("readinessProbe on port 9090")),
        "{:?}",
        r.notes
    );
    assert!(r.notes[0].what.contains("service shop"));
    assert!(r.notes[0].what.contains("ringside-token-shop"));
    // No port is opened behind the user's back.
    let d = &docs(&r.text)[0];
    let init = argv(&d["spec"]["template"]["spec"]["initContainers"][0]);
    assert!(!init.iter().any(|a| a.contains("inbound")), "{init:?}");
    let text = DEPLOYMENT.replace("port: health}", "port: healthz}");
    let e = inject(&text, &opts()).unwrap_err().to_string();
    assert!(
        e.contains("containers[0].readinessProbe.httpGet.port") && e.contains("healthz"),
        "{e}"
    );
}

#[test]
fn jobs_cronjobs_pods_and_lists() {
    let text = "\
apiVersion: batch/v1
kind: Job
metadata: {name: backup}
spec:
  template:
    spec:
      restartPolicy: Never
      containers: [{name: backup, image: b:1}]
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: report}
spec:
  schedule: '0 * * * *'
  jobTemplate:
    spec:
      template:
        metadata: {annotations: {ringside.io/token-secret: reports}}
        spec:
          restartPolicy: OnFailure
          containers: [{name: report, image: r:1}]
---
apiVersion: v1
kind: Pod
metadata: {name: debug, labels: {app.kubernetes.io/name: tools}}
spec:
  containers: [{name: sh, image: busybox}]
---
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: ConfigMap
    metadata: {name: c}
    data: {a: b}
  - apiVersion: apps/v1
    kind: StatefulSet
    metadata: {name: db}
    spec:
      serviceName: db
      selector: {matchLabels: {app: db}}
      template:
        metadata: {labels: {app: db}}
        spec:
          containers: [{name: db, image: db:1}]
";
    let r = run(text);
    let d = docs(&r.text);
    assert_eq!(d.len(), 4);
    let job = &d[0]["spec"]["template"]["spec"];
    assert_eq!(names(&job["initContainers"]), ["ringside-init", "ringside"]);
    assert_eq!(job["restartPolicy"].as_str(), Some("Never"));
    let cron = &d[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"];
    assert_eq!(
        cron["initContainers"][1]["env"][3]["valueFrom"]["secretKeyRef"]["name"].as_str(),
        Some("reports")
    );
    assert_eq!(
        names(&d[2]["spec"]["initContainers"]),
        ["ringside-init", "ringside"]
    );
    assert!(r
        .notes
        .iter()
        .any(|n| n.id == "Pod/debug" && n.what.contains("service tools")));
    let items = &d[3]["items"];
    assert_eq!(items[0]["data"]["a"].as_str(), Some("b"));
    assert_eq!(
        names(&items[1]["spec"]["template"]["spec"]["initContainers"]),
        ["ringside-init", "ringside"]
    );
    assert_eq!(run(&r.text).text, r.text, "idempotent for every kind");
}

#[test]
fn yaml_errors_give_the_line_in_the_input() {
    let text = "apiVersion: v1\nkind: Service\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {name: [\n";
    match inject(text, &opts()).unwrap_err() {
        InjectError::Yaml { line, .. } => assert!((6..=7).contains(&line), "line {line}"),
        other => panic!("{other}"),
    }
}

#[test]
fn lost_finds_dropped_and_changed_fields_only() {
    let v = |s: &str| serde_yaml::from_str::<Value>(s).unwrap();
    let mut p = String::new();
    assert_eq!(
        lost(&v("{a: {b: 1, c: null}}"), &v("{a: {b: '1'}}"), &mut p),
        None
    );
    assert_eq!(
        lost(&v("{a: [{b: 1}, {x: 2}]}"), &v("{a: [{b: 1}, {}]}"), &mut p).as_deref(),
        Some("a[1].x")
    );
    assert_eq!(
        lost(&v("{a: {b: true}}"), &v("{a: {b: false}}"), &mut p).as_deref(),
        Some("a.b")
    );
    assert_eq!(lost(&v("{a: {}}"), &v("{a: {}}"), &mut p), None);
    // An unknown field is reported even when it is empty: it may be a misspelt one.
    assert_eq!(lost(&v("{a: {}}"), &v("{}"), &mut p).as_deref(), Some("a"));
}
