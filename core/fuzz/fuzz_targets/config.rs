//! The configuration file: any text gives a config or an error naming a field, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringside_core::config::{Config, Format};

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    for f in [Format::Yaml, Format::Toml] {
        match Config::parse(s, f) {
            Ok(c) => {
                let _ = serde_json::to_string(&c);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
});
