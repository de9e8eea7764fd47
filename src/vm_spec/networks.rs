//! The BOSH networks of a `create_vm` call, validated: their kind, IP, what
//! their NIC is plugged into (a libvirt network, a host bridge, a macvtap)
//! and which of them share one NIC (`nic_group`). Pure logic, like the rest
//! of `vm_spec`.

use serde_json::{Map, Value};

use super::plain_name;

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

/// What a NIC is plugged into (libvirt `<interface type=...>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NicSource {
    /// A libvirt network; None: the config's network.
    Network(Option<String>),
    /// An existing Linux bridge on the host (`type='bridge'`).
    Bridge(String),
    /// A macvtap on a host device (`type='direct'`), with its mode.
    Direct { dev: String, mode: String },
}

pub const DIRECT_MODES: &[&str] = &["bridge", "vepa", "private", "passthrough"];

/// Keys of a network's cloud_properties.
const NETWORK_KEYS: &[&str] = &[
    "network_name",
    "network",
    "bridge",
    "macvtap",
    "macvtap_mode",
    "nic_group",
];

/// One BOSH network of a create_vm call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkRequest {
    pub name: String,
    pub kind: NetKind,
    pub ip: Option<String>,
    pub source: NicSource,
    /// Networks with the same group share one NIC.
    pub nic_group: Option<String>,
    /// cloud_properties keys not understood, for the warning.
    pub ignored: Vec<String>,
}

impl NetworkRequest {
    pub fn has_nic(&self) -> bool {
        self.kind != NetKind::Vip
    }

    /// The libvirt network named in cloud_properties (None: the config's,
    /// or no libvirt network at all).
    pub fn libvirt_network(&self) -> Option<&str> {
        match &self.source {
            NicSource::Network(n) => n.as_deref(),
            _ => None,
        }
    }
}

fn nic_source(name: &str, cp: &Map<String, Value>) -> Result<NicSource, String> {
    let key = |k: &str| format!("networks.{name}.cloud_properties.{k}");
    let network = match cp.get("network_name").or_else(|| cp.get("network")) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(other) => {
            return Err(format!(
                "{} must be a non-empty string, got {other}",
                key("network_name")
            ))
        }
    };
    // Linux interface names: at most 15 bytes (IFNAMSIZ - 1).
    let bridge = cp
        .get("bridge")
        .filter(|v| !v.is_null())
        .map(|v| plain_name(v, &key("bridge"), 15))
        .transpose()?;
    let macvtap = cp
        .get("macvtap")
        .filter(|v| !v.is_null())
        .map(|v| plain_name(v, &key("macvtap"), 15))
        .transpose()?;
    let mode = match cp.get("macvtap_mode") {
        None | Some(Value::Null) => None,
        Some(Value::String(m)) if DIRECT_MODES.contains(&m.as_str()) => Some(m.clone()),
        Some(other) => {
            return Err(format!(
                "{} must be one of {}; got {other}",
                key("macvtap_mode"),
                DIRECT_MODES.join(", ")
            ))
        }
    };
    match (network, bridge, macvtap, mode) {
        (n, None, None, None) => Ok(NicSource::Network(n)),
        (None, Some(b), None, None) => Ok(NicSource::Bridge(b)),
        (None, None, Some(dev), mode) => Ok(NicSource::Direct {
            dev,
            mode: mode.unwrap_or_else(|| "bridge".into()),
        }),
        (_, _, None, Some(_)) => Err(format!("{} needs {}", key("macvtap_mode"), key("macvtap"))),
        _ => Err(format!(
            "networks.{name}.cloud_properties: give at most one of network_name, bridge, macvtap"
        )),
    }
}

/// The networks in a stable order (by name), each validated.
pub fn parse_networks(networks: &Map<String, Value>) -> Result<Vec<NetworkRequest>, String> {
    let mut out: Vec<NetworkRequest> = Vec::new();
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
        if let (NetKind::Manual, Some(ip)) = (kind, &ip) {
            if ip.parse::<std::net::IpAddr>().is_err() {
                return Err(format!("networks.{name}.ip '{ip}' is not an IP address"));
            }
        }
        let empty = Map::new();
        let cp = match n.get("cloud_properties") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(cp)) => cp,
            Some(other) => {
                return Err(format!(
                    "networks.{name}.cloud_properties must be an object, got {other}"
                ))
            }
        };
        let source = nic_source(name, cp)?;
        let nic_group = cp
            .get("nic_group")
            .filter(|v| !v.is_null())
            .map(|v| {
                plain_name(
                    v,
                    &format!("networks.{name}.cloud_properties.nic_group"),
                    64,
                )
            })
            .transpose()?;
        if kind == NetKind::Vip && nic_group.is_some() {
            return Err(format!(
                "networks.{name} is a vip network (no NIC): it cannot be in nic_group"
            ));
        }
        if let Some(g) = &nic_group {
            if let Some(first) = out.iter().find(|o| o.nic_group.as_ref() == Some(g)) {
                if first.source != source {
                    return Err(format!(
                        "networks {} and {name} share nic_group '{g}' but not their network_name/bridge/macvtap: one NIC has one source",
                        first.name
                    ));
                }
            }
        }
        let ignored = cp
            .keys()
            .filter(|k| !NETWORK_KEYS.contains(&k.as_str()))
            .map(|k| format!("networks.{name}.cloud_properties.{k}"))
            .collect();
        out.push(NetworkRequest {
            name: name.clone(),
            kind,
            ip,
            source,
            nic_group,
            ignored,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

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
        assert_eq!(nets[1].libvirt_network(), Some("other"));
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
    fn network_sources_and_groups() {
        let n = json!({
            "a": {"type": "manual", "ip": "192.168.50.10", "cloud_properties": {"bridge": "br0", "nic_group": "g"}},
            "b": {"type": "manual", "ip": "fd00::10", "cloud_properties": {"bridge": "br0", "nic_group": "g", "speed": 1}},
            "c": {"type": "dynamic", "cloud_properties": {"macvtap": "eth1"}},
            "d": {"type": "dynamic", "cloud_properties": {"macvtap": "eth1", "macvtap_mode": "vepa"}}
        });
        let nets = parse_networks(n.as_object().unwrap()).unwrap();
        assert_eq!(nets[0].source, NicSource::Bridge("br0".into()));
        assert_eq!(nets[1].nic_group.as_deref(), Some("g"));
        assert_eq!(nets[1].ignored, ["networks.b.cloud_properties.speed"]);
        assert_eq!(
            nets[2].source,
            NicSource::Direct {
                dev: "eth1".into(),
                mode: "bridge".into()
            }
        );
        assert_eq!(nets[2].libvirt_network(), None);
        for (v, needle) in [
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"bridge": "br0", "network_name": "n"}}}),
                "at most one of network_name, bridge, macvtap",
            ),
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"bridge": "br0;rm"}}}),
                "cloud_properties.bridge must be a name",
            ),
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"bridge": "a-very-long-bridge"}}}),
                "at most 15",
            ),
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"macvtap": "eth0", "macvtap_mode": "x"}}}),
                "macvtap_mode must be one of bridge, vepa, private, passthrough",
            ),
            (
                json!({"d": {"type": "dynamic", "cloud_properties": {"macvtap_mode": "vepa"}}}),
                "needs networks.d.cloud_properties.macvtap",
            ),
            (
                json!({"d": {"type": "vip", "ip": "1.2.3.4", "cloud_properties": {"nic_group": "g"}}}),
                "cannot be in nic_group",
            ),
            (
                json!({"d": {"type": "manual", "ip": "10.0.0.300"}}),
                "is not an IP address",
            ),
            (
                json!({"a": {"type": "dynamic", "cloud_properties": {"bridge": "br0", "nic_group": "g"}},
                    "b": {"type": "dynamic", "cloud_properties": {"nic_group": "g"}}}),
                "share nic_group 'g'",
            ),
        ] {
            let e = parse_networks(v.as_object().unwrap()).unwrap_err();
            assert!(e.contains(needle), "{v}: {e}");
        }
    }
}
