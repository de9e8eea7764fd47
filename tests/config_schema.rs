//! `spec/cpi.schema.json` and the code's config agree: every key the schema
//! names is accepted, every key it does not name is refused, the required
//! keys are the same, and the enums and defaults match.

use libvirt_cpi::config::Config;
use serde_json::{json, Map, Value};

fn schema() -> Value {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/spec/cpi.schema.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// A value valid under `schema` for each property (defaults, or a sample).
fn sample_for(schema: &Value, path: &str) -> Value {
    if let Some(d) = schema.get("default") {
        return d.clone();
    }
    if let Some(e) = schema.get("enum") {
        return e[0].clone();
    }
    match schema["type"].as_str() {
        Some("object") => {
            let mut obj = Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, s) in props {
                    obj.insert(k.clone(), sample_for(s, &format!("{path}.{k}")));
                }
            }
            Value::Object(obj)
        }
        Some("string") => match path {
            ".libvirt.uri" => json!("qemu+tls://kvm.example/system"),
            ".pool.path" => json!("/var/lib/bosh"),
            ".network.subnet" => json!("10.0.0.0/24"),
            _ => json!(format!("sample{}", path.replace('.', "-"))),
        },
        Some("boolean") => json!(false),
        Some("array") => json!(["x"]),
        other => panic!("schema at {path}: no sample for type {other:?}"),
    }
}

fn load(v: Value) -> Result<Config, String> {
    Config::from_value(v, &Map::new()).map_err(|e| e.message)
}

#[test]
fn every_schema_property_is_accepted_and_round_trips() {
    let full = sample_for(&schema(), "");
    let config = load(full.clone()).unwrap();
    let back = serde_json::to_value(&config).unwrap();
    // Every key the code serializes is in the schema, and vice versa.
    fn keys(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(m) = v {
            for (k, v) in m {
                let p = format!("{prefix}.{k}");
                out.push(p.clone());
                if k != "blobstore" {
                    keys(v, &p, out);
                }
            }
        }
    }
    let (mut a, mut b) = (vec![], vec![]);
    keys(&full, "", &mut a);
    keys(&back, "", &mut b);
    a.sort();
    b.sort();
    assert_eq!(a, b, "schema keys vs code keys");
}

#[test]
fn required_keys_agree() {
    let schema = schema();
    let full = sample_for(&schema, "");
    fn walk(schema: &Value, full: &Value, path: Vec<String>) {
        let required: Vec<&str> = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, s) in props {
                let mut v = full.clone();
                let mut target = &mut v;
                for p in &path {
                    target = &mut target[p.as_str()];
                }
                target.as_object_mut().unwrap().remove(k);
                let r = load(v);
                if required.contains(&k.as_str()) {
                    let e = r.expect_err(&format!("{path:?}.{k} is required by the schema"));
                    assert!(e.contains(&format!("missing field `{k}`")), "{e}");
                } else if k != "path" {
                    // pool.path is conditionally required (with create): checked in unit tests.
                    r.unwrap_or_else(|e| panic!("{path:?}.{k} is optional in the schema: {e}"));
                }
                if s["type"] == "object" && s.get("properties").is_some() {
                    let mut p = path.clone();
                    p.push(k.clone());
                    walk(s, full, p);
                }
            }
        }
    }
    walk(&schema, &full, vec![]);
}

#[test]
fn unknown_keys_are_refused_at_every_level() {
    let schema = schema();
    assert_eq!(schema["additionalProperties"], json!(false));
    let full = sample_for(&schema, "");
    for section in ["", "libvirt", "pool", "network", "agent"] {
        let mut v = full.clone();
        let target = if section.is_empty() {
            &mut v
        } else {
            &mut v[section]
        };
        target["surprise"] = json!(1);
        let e = load(v).unwrap_err();
        assert!(e.contains("unknown field `surprise`"), "{section}: {e}");
        if !section.is_empty() {
            assert_eq!(
                schema["properties"][section]["additionalProperties"],
                json!(false)
            );
        }
    }
}

#[test]
fn enums_match() {
    let schema = schema();
    let full = sample_for(&schema, "");
    for (path, values) in [
        (
            vec!["libvirt", "domain_type"],
            &schema["properties"]["libvirt"]["properties"]["domain_type"]["enum"],
        ),
        (
            vec!["log_level"],
            &schema["properties"]["log_level"]["enum"],
        ),
    ] {
        for value in values.as_array().unwrap() {
            let mut v = full.clone();
            let mut t = &mut v;
            for p in &path {
                t = &mut t[*p];
            }
            *t = value.clone();
            load(v).unwrap_or_else(|e| panic!("{path:?}={value}: {e}"));
        }
        let mut v = full.clone();
        let mut t = &mut v;
        for p in &path {
            t = &mut t[*p];
        }
        *t = json!("not-a-value");
        assert!(
            load(v).is_err(),
            "{path:?} accepts a value outside the schema enum"
        );
    }
}
