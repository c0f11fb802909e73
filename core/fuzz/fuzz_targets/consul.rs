//! `ringctl apply`'s reading of Consul documents (YAML CRDs or JSON config entries): any text gives
//! documents or an error naming a field, never a panic; an accepted file, written back as CRDs
//! (YAML and JSON) and read again, is accepted again as the same documents with the same effect
//! (the intentions, L7 rules and per-service settings the daemon sends proxies).
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_ctl::consul::{self, Document};
use serde_json::{json, Value};

/// Everything the daemon derives from stored documents, as JSON (for a comparison).
fn effect(docs: &[Document]) -> Value {
    let services: Vec<Value> = docs
        .iter()
        .map(|d| {
            let s = d.destination().unwrap_or(d.name());
            json!({
                "protocol": consul::protocol_of(docs, s).map(|p| p.as_str()),
                "inbound": consul::inbound_settings(docs, s),
                "upstreams": consul::upstream_settings(docs, s),
            })
        })
        .collect();
    json!({
        "intentions": consul::intentions(docs),
        "l7": consul::l7_config(docs),
        "services": services,
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = match consul::parse_checked(text) {
        Ok(p) => p,
        Err(e) => {
            let _ = e.to_string();
            return;
        }
    };
    let docs = parsed.docs;
    let before = effect(&docs);
    let crds: Vec<Value> = docs.iter().map(Document::to_crd).collect();
    let yaml: String = crds
        .iter()
        .map(|v| serde_yaml::to_string(v).expect("YAML"))
        .collect::<Vec<_>>()
        .join("---\n");
    let json = serde_json::to_string_pretty(&crds).expect("JSON");
    for (form, written) in [("yaml", &yaml), ("json", &json)] {
        if docs.is_empty() {
            break;
        }
        let again = match consul::parse_checked(written) {
            Ok(p) => p.docs,
            Err(e) => panic!("accepted, then refused written back as {form}: {e}\n{written}"),
        };
        assert_eq!(again, docs, "written back as {form}:\n{written}");
        assert_eq!(effect(&again), before, "written back as {form}:\n{written}");
    }
});
