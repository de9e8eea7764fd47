//! What `create_vm` is asked for, validated before anything is created: the
//! VM's cloud_properties (this CPI's schema) and the BOSH networks. Pure
//! logic; the handler turns errors into `VMCreationFailed`.
//!
//! cloud_properties accepted (sizes in MiB):
//! `cpu`; `memory` (or `ram`); `ephemeral_disk` (integer, or `{"size": N}`;
//! 0 or absent: no ephemeral disk); `root_disk_size` (or `root_disk:
//! {"size": N}`; default: the stemcell's size); `domain_type` (`kvm`/`qemu`)
//! and `machine` override the config. Other keys are ignored (and logged).

use serde_json::{json, Map, Value};

pub const DEFAULT_CPU: u64 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProperties {
    pub cpu: u64,
    pub memory_mib: u64,
    /// 0: no ephemeral disk.
    pub ephemeral_disk_mib: u64,
    pub root_disk_mib: Option<u64>,
    pub domain_type: Option<String>,
    pub machine: Option<String>,
    /// Keys present but not understood, for the log.
    pub ignored: Vec<String>,
}

const KNOWN_KEYS: &[&str] = &[
    "cpu",
    "memory",
    "ram",
    "ephemeral_disk",
    "root_disk_size",
    "root_disk",
    "domain_type",
    "machine",
];

fn integer(value: &Value, what: &str, min: u64) -> Result<u64, String> {
    match value.as_u64() {
        Some(n) if n >= min => Ok(n),
        _ => Err(format!(
            "cloud_properties.{what} must be an integer >= {min}, got {value}"
        )),
    }
}

/// An integer, or an object whose `size` is one.
fn size_of(value: &Value, what: &str, min: u64) -> Result<u64, String> {
    match value {
        Value::Object(o) => match o.get("size") {
            Some(size) => integer(size, &format!("{what}.size"), min),
            None => Err(format!(
                "cloud_properties.{what} must be an integer or {{\"size\": N}}, got {value}"
            )),
        },
        other => integer(other, what, min),
    }
}

impl VmProperties {
    pub fn parse(cp: &Map<String, Value>) -> Result<VmProperties, String> {
        let cpu = cp
            .get("cpu")
            .map(|v| integer(v, "cpu", 1))
            .transpose()?
            .unwrap_or(DEFAULT_CPU);
        let memory_mib = match (cp.get("memory"), cp.get("ram")) {
            (Some(m), Some(r)) if m != r => {
                return Err(format!(
                    "cloud_properties.memory ({m}) and cloud_properties.ram ({r}) disagree"
                ))
            }
            (Some(m), _) => integer(m, "memory", 1)?,
            (None, Some(r)) => integer(r, "ram", 1)?,
            (None, None) => DEFAULT_MEMORY_MIB,
        };
        let ephemeral_disk_mib = cp
            .get("ephemeral_disk")
            .map(|v| size_of(v, "ephemeral_disk", 0))
            .transpose()?
            .unwrap_or(0);
        let root_disk_mib = match (cp.get("root_disk_size"), cp.get("root_disk")) {
            (Some(v), _) => Some(integer(v, "root_disk_size", 1)?),
            (None, Some(v)) => Some(size_of(v, "root_disk", 1)?),
            (None, None) => None,
        };
        let domain_type = match cp.get("domain_type") {
            None => None,
            Some(Value::String(t)) if t == "kvm" || t == "qemu" => Some(t.clone()),
            Some(other) => {
                return Err(format!(
                    "cloud_properties.domain_type must be \"kvm\" or \"qemu\", got {other}"
                ))
            }
        };
        let machine = match cp.get("machine") {
            None => None,
            Some(Value::String(m)) if valid_machine(m) => Some(m.clone()),
            Some(other) => {
                return Err(format!(
                    "cloud_properties.machine must be a QEMU machine type like \"q35\", got {other}"
                ))
            }
        };
        let ignored = cp
            .keys()
            .filter(|k| !KNOWN_KEYS.contains(&k.as_str()))
            .cloned()
            .collect();
        Ok(VmProperties {
            cpu,
            memory_mib,
            ephemeral_disk_mib,
            root_disk_mib,
            domain_type,
            machine,
            ignored,
        })
    }
}

fn valid_machine(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `calculate_vm_cloud_properties`: the director's desired size as this
/// CPI's cloud_properties.
pub fn cloud_properties_for(
    cpu: u64,
    ram_mib: u64,
    ephemeral_disk_mib: u64,
) -> Result<Value, String> {
    if cpu == 0 || ram_mib == 0 {
        return Err(format!(
            "cannot make a VM with {cpu} CPUs and {ram_mib} MiB of memory"
        ));
    }
    Ok(json!({
        "cpu": cpu,
        "memory": ram_mib,
        "ephemeral_disk": {"size": ephemeral_disk_mib},
    }))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetKind {
    Manual,
    Dynamic,
    Vip,
}

impl NetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            NetKind::Manual => "manual",
            NetKind::Dynamic => "dynamic",
            NetKind::Vip => "vip",
        }
    }
}

/// One BOSH network of a create_vm call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    pub name: String,
    pub kind: NetKind,
    pub ip: Option<String>,
    /// The libvirt network named by the network's cloud_properties
    /// (`network_name`, or `network`); None: the config's network.
    pub libvirt_network: Option<String>,
}

impl NetworkRequest {
    pub fn has_nic(&self) -> bool {
        self.kind != NetKind::Vip
    }
}

/// The networks in a stable order (by name), each validated.
pub fn parse_networks(networks: &Map<String, Value>) -> Result<Vec<NetworkRequest>, String> {
    let mut out = Vec::new();
    let mut names: Vec<&String> = networks.keys().collect();
    names.sort();
    for name in names {
        let Value::Object(n) = &networks[name] else {
            return Err(format!("networks.{name} must be an object"));
        };
        let kind = match n.get("type") {
            None | Some(Value::Null) => NetKind::Manual,
            Some(Value::String(t)) => match t.as_str() {
                "manual" => NetKind::Manual,
                "dynamic" => NetKind::Dynamic,
                "vip" => NetKind::Vip,
                other => {
                    return Err(format!(
                        "networks.{name}.type '{other}' is not manual, dynamic or vip"
                    ))
                }
            },
            Some(other) => {
                return Err(format!(
                    "networks.{name}.type must be a string, got {other}"
                ))
            }
        };
        let ip = match n.get("ip") {
            None | Some(Value::Null) => None,
            Some(Value::String(ip)) if !ip.is_empty() => Some(ip.clone()),
            Some(other) => return Err(format!("networks.{name}.ip must be a string, got {other}")),
        };
        if kind == NetKind::Manual && ip.is_none() {
            return Err(format!("networks.{name} is a manual network without an ip"));
        }
        let libvirt_network = match n.get("cloud_properties") {
            None | Some(Value::Null) => None,
            Some(Value::Object(cp)) => match cp.get("network_name").or_else(|| cp.get("network")) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(other) => {
                    return Err(format!(
                        "networks.{name}.cloud_properties.network_name must be a non-empty string, got {other}"
                    ))
                }
            },
            Some(other) => {
                return Err(format!("networks.{name}.cloud_properties must be an object, got {other}"))
            }
        };
        out.push(NetworkRequest {
            name: name.clone(),
            kind,
            ip,
            libvirt_network,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn props(v: Value) -> Result<VmProperties, String> {
        VmProperties::parse(v.as_object().unwrap())
    }

    #[test]
    fn defaults_and_aliases() {
        let p = props(json!({})).unwrap();
        assert_eq!((p.cpu, p.memory_mib, p.ephemeral_disk_mib), (1, 1024, 0));
        assert_eq!(p.root_disk_mib, None);
        let p = props(json!({"cpu": 2, "ram": 4096, "root_disk": {"size": 20480},
            "ephemeral_disk": {"size": 10240}, "flavor": "x"}))
        .unwrap();
        assert_eq!(
            (p.cpu, p.memory_mib, p.ephemeral_disk_mib),
            (2, 4096, 10240)
        );
        assert_eq!(p.root_disk_mib, Some(20480));
        assert_eq!(p.ignored, vec!["flavor"]);
        let p = props(
            json!({"memory": 64, "ephemeral_disk": 512, "root_disk_size": 100,
            "domain_type": "qemu", "machine": "pc-q35-10.0"}),
        )
        .unwrap();
        assert_eq!((p.memory_mib, p.ephemeral_disk_mib), (64, 512));
        assert_eq!(p.root_disk_mib, Some(100));
        assert_eq!(p.domain_type.as_deref(), Some("qemu"));
        assert_eq!(p.machine.as_deref(), Some("pc-q35-10.0"));
    }

    #[test]
    fn bad_values_are_named() {
        for (v, needle) in [
            (json!({"cpu": 0}), "cloud_properties.cpu"),
            (json!({"cpu": "2"}), "cloud_properties.cpu"),
            (json!({"memory": 512, "ram": 1024}), "disagree"),
            (json!({"ephemeral_disk": -1}), "ephemeral_disk"),
            (json!({"ephemeral_disk": {"sise": 1}}), "ephemeral_disk"),
            (json!({"root_disk": {"size": 0}}), "root_disk.size"),
            (json!({"domain_type": "xen"}), "domain_type"),
            (json!({"machine": "q35'/><evil"}), "machine"),
        ] {
            let e = props(v.clone()).unwrap_err();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn networks_sorted_and_checked() {
        let n = json!({
            "b": {"type": "dynamic", "cloud_properties": {"network_name": "other"}},
            "a": {"type": "manual", "ip": "10.0.0.5", "cloud_properties": {}},
            "c": {"type": "vip", "ip": "1.2.3.4"}
        });
        let nets = parse_networks(n.as_object().unwrap()).unwrap();
        let names: Vec<_> = nets.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert_eq!(nets[1].libvirt_network.as_deref(), Some("other"));
        assert!(!nets[2].has_nic());
        for (v, needle) in [
            (json!({"d": {"type": "manual"}}), "without an ip"),
            (
                json!({"d": {"type": "bridge"}}),
                "not manual, dynamic or vip",
            ),
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"network_name": 3}}}),
                "network_name",
            ),
            (json!({"d": 1}), "must be an object"),
        ] {
            let e = parse_networks(v.as_object().unwrap()).unwrap_err();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }

    #[test]
    fn calculated_properties_round_trip() {
        let cp = cloud_properties_for(2, 4096, 10240).unwrap();
        let p = props(cp).unwrap();
        assert_eq!(
            (p.cpu, p.memory_mib, p.ephemeral_disk_mib),
            (2, 4096, 10240)
        );
        assert!(p.ignored.is_empty());
        assert!(cloud_properties_for(0, 1, 1).is_err());
    }
}
