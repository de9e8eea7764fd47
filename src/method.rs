//! CPI methods as one typed enum, parsed from the request's name and positional
//! arguments (cpi-contract.md sections 1.5 and 1.6).
//!
//! Wrong argument counts or types are `CpiError`s naming the argument; surplus
//! trailing arguments are accepted and ignored (a v3 director appends one to
//! `create_stemcell`).

use serde_json::{Map, Value};

use crate::envelope::json_type;
use crate::error::{CpiError, Result};

pub type Object = Map<String, Value>;

#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    Info,
    CreateStemcell {
        image_path: String,
        cloud_properties: Object,
    },
    DeleteStemcell {
        stemcell_cid: String,
    },
    CreateVm {
        agent_id: String,
        stemcell_cid: String,
        cloud_properties: Object,
        networks: Object,
        disk_cids: Vec<String>,
        /// Passed to the agent verbatim: never round-tripped through a struct.
        env: Value,
    },
    DeleteVm {
        vm_cid: String,
    },
    HasVm {
        vm_cid: String,
    },
    RebootVm {
        vm_cid: String,
    },
    SetVmMetadata {
        vm_cid: String,
        metadata: Object,
    },
    CalculateVmCloudProperties {
        cpu: u64,
        ram_mib: u64,
        ephemeral_disk_mib: u64,
    },
    CreateDisk {
        size_mib: u64,
        cloud_properties: Object,
        vm_locality: Option<String>,
    },
    DeleteDisk {
        disk_cid: String,
    },
    HasDisk {
        disk_cid: String,
    },
    AttachDisk {
        vm_cid: String,
        disk_cid: String,
    },
    DetachDisk {
        vm_cid: String,
        disk_cid: String,
    },
    GetDisks {
        vm_cid: String,
    },
    ResizeDisk {
        disk_cid: String,
        new_size_mib: u64,
    },
    UpdateDisk {
        disk_cid: String,
        new_size_mib: u64,
        cloud_properties: Object,
    },
    SetDiskMetadata {
        disk_cid: String,
        metadata: Object,
    },
    SnapshotDisk {
        disk_cid: String,
        metadata: Object,
    },
    DeleteSnapshot {
        snapshot_cid: String,
    },
    CurrentVmId,
}

impl Method {
    pub fn parse(name: &str, arguments: &[Value]) -> Result<Method> {
        let a = Args {
            method: name,
            values: arguments,
        };
        let method = match name {
            "info" => Method::Info,
            "create_stemcell" => {
                a.expect(&["image_path", "cloud_properties"])?;
                Method::CreateStemcell {
                    image_path: a.string(0, "image_path")?,
                    cloud_properties: a.object(1, "cloud_properties")?,
                }
            }
            "delete_stemcell" => {
                a.expect(&["stemcell_cid"])?;
                Method::DeleteStemcell {
                    stemcell_cid: a.string(0, "stemcell_cid")?,
                }
            }
            "create_vm" => {
                a.expect(&[
                    "agent_id",
                    "stemcell_cid",
                    "cloud_properties",
                    "networks",
                    "disk_cids",
                    "env",
                ])?;
                Method::CreateVm {
                    agent_id: a.string(0, "agent_id")?,
                    stemcell_cid: a.string(1, "stemcell_cid")?,
                    cloud_properties: a.object(2, "cloud_properties")?,
                    networks: a.object(3, "networks")?,
                    disk_cids: a.strings_or_null(4, "disk_cids")?,
                    env: a.object_or_null(5, "env")?,
                }
            }
            "delete_vm" => {
                a.expect(&["vm_cid"])?;
                Method::DeleteVm {
                    vm_cid: a.string(0, "vm_cid")?,
                }
            }
            "has_vm" => {
                a.expect(&["vm_cid"])?;
                Method::HasVm {
                    vm_cid: a.string(0, "vm_cid")?,
                }
            }
            "reboot_vm" => {
                a.expect(&["vm_cid"])?;
                Method::RebootVm {
                    vm_cid: a.string(0, "vm_cid")?,
                }
            }
            "set_vm_metadata" => {
                a.expect(&["vm_cid", "metadata"])?;
                Method::SetVmMetadata {
                    vm_cid: a.string(0, "vm_cid")?,
                    metadata: a.metadata(1)?,
                }
            }
            "calculate_vm_cloud_properties" => {
                a.expect(&["desired_instance_size"])?;
                let size = a.object(0, "desired_instance_size")?;
                let field = |key: &str| -> Result<u64> {
                    match size.get(key) {
                        Some(v) => v.as_u64().ok_or_else(|| {
                            a.error(format!("desired_instance_size.{key} must be a non-negative integer, got {}", json_type(v)))
                        }),
                        None => Err(a.error(format!("desired_instance_size.{key} is missing"))),
                    }
                };
                Method::CalculateVmCloudProperties {
                    cpu: field("cpu")?,
                    ram_mib: field("ram")?,
                    ephemeral_disk_mib: field("ephemeral_disk_size")?,
                }
            }
            "create_disk" => {
                a.expect(&["size", "cloud_properties"])?;
                Method::CreateDisk {
                    size_mib: a.size(0, "size")?,
                    cloud_properties: a.object(1, "cloud_properties")?,
                    vm_locality: a.optional_string(2, "vm_locality")?,
                }
            }
            "delete_disk" => {
                a.expect(&["disk_cid"])?;
                Method::DeleteDisk {
                    disk_cid: a.string(0, "disk_cid")?,
                }
            }
            "has_disk" => {
                a.expect(&["disk_cid"])?;
                Method::HasDisk {
                    disk_cid: a.string(0, "disk_cid")?,
                }
            }
            "attach_disk" => {
                a.expect(&["vm_cid", "disk_cid"])?;
                Method::AttachDisk {
                    vm_cid: a.string(0, "vm_cid")?,
                    disk_cid: a.string(1, "disk_cid")?,
                }
            }
            "detach_disk" => {
                a.expect(&["vm_cid", "disk_cid"])?;
                Method::DetachDisk {
                    vm_cid: a.string(0, "vm_cid")?,
                    disk_cid: a.string(1, "disk_cid")?,
                }
            }
            "get_disks" => {
                a.expect(&["vm_cid"])?;
                Method::GetDisks {
                    vm_cid: a.string(0, "vm_cid")?,
                }
            }
            "resize_disk" => {
                a.expect(&["disk_cid", "new_size"])?;
                Method::ResizeDisk {
                    disk_cid: a.string(0, "disk_cid")?,
                    new_size_mib: a.size(1, "new_size")?,
                }
            }
            "update_disk" => {
                a.expect(&["disk_cid", "new_size", "cloud_properties"])?;
                Method::UpdateDisk {
                    disk_cid: a.string(0, "disk_cid")?,
                    new_size_mib: a.size(1, "new_size")?,
                    cloud_properties: a.object(2, "cloud_properties")?,
                }
            }
            "set_disk_metadata" => {
                a.expect(&["disk_cid", "metadata"])?;
                Method::SetDiskMetadata {
                    disk_cid: a.string(0, "disk_cid")?,
                    metadata: a.metadata(1)?,
                }
            }
            "snapshot_disk" => {
                a.expect(&["disk_cid", "metadata"])?;
                Method::SnapshotDisk {
                    disk_cid: a.string(0, "disk_cid")?,
                    metadata: a.metadata_or_empty(1)?,
                }
            }
            "delete_snapshot" => {
                a.expect(&["snapshot_cid"])?;
                Method::DeleteSnapshot {
                    snapshot_cid: a.string(0, "snapshot_cid")?,
                }
            }
            "current_vm_id" => Method::CurrentVmId,
            other => {
                return Err(CpiError::not_implemented(format!(
                    "Must call implemented method: Unknown method '{other}'"
                )))
            }
        };
        Ok(method)
    }
}

/// Positional-argument access with errors that name the method and argument.
struct Args<'a> {
    method: &'a str,
    values: &'a [Value],
}

impl Args<'_> {
    fn error(&self, message: String) -> CpiError {
        CpiError::bad_request(format!("{}: {message}", self.method))
    }

    fn expect(&self, names: &[&str]) -> Result<()> {
        if self.values.len() < names.len() {
            return Err(self.error(format!(
                "expected {} arguments ({}), got {}",
                names.len(),
                names.join(", "),
                self.values.len()
            )));
        }
        Ok(())
    }

    fn get(&self, i: usize) -> &Value {
        self.values.get(i).unwrap_or(&Value::Null)
    }

    fn type_error(&self, i: usize, name: &str, wanted: &str) -> CpiError {
        self.error(format!(
            "argument {} ({name}) must be {wanted}, got {}",
            i + 1,
            json_type(self.get(i))
        ))
    }

    fn string(&self, i: usize, name: &str) -> Result<String> {
        match self.get(i) {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            _ => Err(self.type_error(i, name, "a non-empty string")),
        }
    }

    fn optional_string(&self, i: usize, name: &str) -> Result<Option<String>> {
        match self.get(i) {
            Value::Null => Ok(None),
            Value::String(s) if s.is_empty() => Ok(None),
            Value::String(s) => Ok(Some(s.clone())),
            _ => Err(self.type_error(i, name, "a string or null")),
        }
    }

    fn object(&self, i: usize, name: &str) -> Result<Object> {
        match self.get(i) {
            Value::Object(o) => Ok(o.clone()),
            _ => Err(self.type_error(i, name, "an object")),
        }
    }

    /// Metadata ends up in libvirt's XML (a VM's `<metadata>`), which cannot
    /// hold every character: XML 1.0 allows no control characters but tab,
    /// newline and carriage return, no surrogates and not U+FFFE/U+FFFF (and
    /// a NUL cannot even reach libvirt's C API). Refused here with the key it
    /// is in, for every metadata argument alike.
    fn metadata(&self, i: usize) -> Result<Object> {
        let metadata = self.object(i, "metadata")?;
        for (key, value) in &metadata {
            let bad = std::iter::once(key.as_str())
                .chain(strings_in(value))
                .find_map(|s| s.chars().find(|&c| !is_xml_char(c)));
            if let Some(c) = bad {
                return Err(self.error(format!(
                    "argument {} (metadata) key '{}' holds the character U+{:04X}, which metadata cannot carry (no control characters but tab, newline and carriage return)",
                    i + 1,
                    key.escape_debug(),
                    u32::from(c)
                )));
            }
        }
        Ok(metadata)
    }

    fn metadata_or_empty(&self, i: usize) -> Result<Object> {
        match self.get(i) {
            Value::Null => Ok(Object::new()),
            _ => self.metadata(i),
        }
    }

    fn object_or_null(&self, i: usize, name: &str) -> Result<Value> {
        match self.get(i) {
            v @ (Value::Null | Value::Object(_)) => Ok(v.clone()),
            _ => Err(self.type_error(i, name, "an object")),
        }
    }

    fn strings_or_null(&self, i: usize, name: &str) -> Result<Vec<String>> {
        match self.get(i) {
            Value::Null => Ok(Vec::new()),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() => Ok(s.clone()),
                    _ => Err(self.type_error(i, name, "an array of non-empty strings")),
                })
                .collect(),
            _ => Err(self.type_error(i, name, "an array of strings")),
        }
    }

    /// Sizes are integers in MiB; zero is never a useful size.
    fn size(&self, i: usize, name: &str) -> Result<u64> {
        match self.get(i).as_u64() {
            Some(n) if n > 0 => Ok(n),
            _ => Err(self.type_error(i, name, "a positive integer (MiB)")),
        }
    }
}

/// Every string in `v`, keys included, at any depth.
fn strings_in(v: &Value) -> Box<dyn Iterator<Item = &str> + '_> {
    match v {
        Value::String(s) => Box::new(std::iter::once(s.as_str())),
        Value::Array(items) => Box::new(items.iter().flat_map(strings_in)),
        Value::Object(o) => Box::new(
            o.iter()
                .flat_map(|(k, v)| std::iter::once(k.as_str()).chain(strings_in(v))),
        ),
        _ => Box::new(std::iter::empty()),
    }
}

/// XML 1.0's `Char` production (a Rust `char` is never a surrogate).
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use serde_json::json;

    fn parse(name: &str, args: Value) -> Result<Method> {
        Method::parse(name, args.as_array().unwrap())
    }

    #[test]
    fn unknown_method_is_not_implemented() {
        let e = parse("create_network", json!([])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::NotImplemented);
        assert_eq!(
            e.message,
            "Must call implemented method: Unknown method 'create_network'"
        );
    }

    #[test]
    fn wrong_counts_and_types_name_the_argument() {
        let e = parse("has_vm", json!([])).unwrap_err();
        assert_eq!(e.kind, ErrorKind::CpiError);
        assert!(
            e.message.contains("expected 1 arguments (vm_cid), got 0"),
            "{}",
            e.message
        );
        let e = parse("has_vm", json!([42])).unwrap_err();
        assert!(e
            .message
            .contains("argument 1 (vm_cid) must be a non-empty string, got a number"));
        let e = parse("has_vm", json!([""])).unwrap_err();
        assert!(e.message.contains("non-empty string"));
        let e = parse("create_disk", json!([-1, {}, null])).unwrap_err();
        assert!(e.message.contains("(size) must be a positive integer"));
        let e = parse("create_vm", json!(["a", "sc", {}, [], [], {}])).unwrap_err();
        assert!(e.message.contains("(networks) must be an object"));
    }

    #[test]
    fn surplus_arguments_are_ignored() {
        let m = parse(
            "create_stemcell",
            json!(["/tmp/image", {"disk": 5120}, {"tags": {}}]),
        )
        .unwrap();
        assert!(
            matches!(m, Method::CreateStemcell { ref image_path, .. } if image_path == "/tmp/image")
        );
    }

    #[test]
    fn create_vm_keeps_env_verbatim() {
        let env = json!({"bosh": {"password": "x", "weird": [1, {"a": null}]}});
        let m = parse(
            "create_vm",
            json!(["agent", "sc-1", {}, {"default": {"type": "dynamic"}}, [], env]),
        )
        .unwrap();
        let Method::CreateVm {
            env: got,
            disk_cids,
            ..
        } = m
        else {
            panic!()
        };
        assert_eq!(got, env);
        assert!(disk_cids.is_empty());
    }

    #[test]
    fn metadata_xml_cannot_hold_is_refused_with_its_key() {
        for (method, cid) in [
            ("set_vm_metadata", "vm-1"),
            ("set_disk_metadata", "disk-1"),
            ("snapshot_disk", "disk-1"),
        ] {
            for md in [
                json!({"name": "a\u{0}b"}),
                json!({"name": "bell\u{7}"}),
                json!({"na\u{1}me": "x"}),
                json!({"name": ["\u{fffe}"]}),
            ] {
                let e = parse(method, json!([cid, md])).unwrap_err();
                assert_eq!(e.kind, ErrorKind::CpiError, "{method} {md}");
                assert!(
                    e.message.contains("(metadata) key '") && e.message.contains("U+"),
                    "{method} {md}: {}",
                    e.message
                );
            }
            parse(
                method,
                json!([cid, {"name": "tab\tnew\nline é 💾", "n": 3}]),
            )
            .unwrap();
        }
    }

    #[test]
    fn calculate_vm_cloud_properties_needs_all_fields() {
        let e = parse(
            "calculate_vm_cloud_properties",
            json!([{"cpu": 2, "ram": 1024}]),
        )
        .unwrap_err();
        assert!(e.message.contains("ephemeral_disk_size is missing"));
    }
}
