//! The BOSH agent's settings (cpi-contract.md 4.3/4.4): the JSON the agent
//! reads from the config drive's `ec2/latest/user-data`, and the small
//! `meta-data.json` beside it.
//!
//! Shapes the agent insists on: `disks.system` is a string, hints hold only
//! strings, `disks.persistent` is `{}` at create time, every network with a
//! NIC carries that NIC's `mac`, `env` is the director's value verbatim.
//! The result holds secrets (env, blobstore credentials): never log it.

use serde_json::{json, Map, Value};

use crate::config::AgentConfig;
use crate::names::EPHEMERAL_SERIAL;
use crate::vm_spec::DiskBus;

/// Device the root disk has in the guest (virtio-blk, first).
pub const SYSTEM_DISK: &str = "/dev/vda";
/// Device the ephemeral disk has in the guest (virtio-blk, second).
pub const EPHEMERAL_DISK: &str = "/dev/vdb";

/// udev's name for a disk of a virtio-scsi controller with a `<serial>`:
/// QEMU's scsi-hd reports vendor QEMU, model "QEMU HARDDISK" and the serial
/// in its unit serial page, which udev's scsi_id turns into
/// `scsi-0QEMU_QEMU_HARDDISK_<serial>`.
pub fn scsi_by_id(serial: &str) -> String {
    format!("/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_{serial}")
}

/// The ephemeral disk's path hint. The agent finds an ephemeral disk by its
/// path only (it has no ID), and its mapped resolver tries a `/dev/sdX`
/// hint as `/dev/xvdX` and `/dev/vdX` first (bosh-agent
/// infrastructure/devicepathresolver/mapped_device_path_resolver.go), which
/// on a VM with virtio persistent disks can be another disk: so on SCSI the
/// hint is the stable by-id link, which that resolver follows.
pub fn ephemeral_path(bus: DiskBus) -> String {
    match bus {
        DiskBus::Virtio => EPHEMERAL_DISK.to_string(),
        DiskBus::Scsi => scsi_by_id(EPHEMERAL_SERIAL),
    }
}

/// The root disk: the first disk of its bus (the config drive is a SATA
/// CD-ROM, /dev/sr0, so it takes no `sd` name).
pub fn system_disk(bus: DiskBus) -> &'static str {
    match bus {
        DiskBus::Virtio => SYSTEM_DISK,
        DiskBus::Scsi => "/dev/sda",
    }
}

pub struct SettingsInput<'a> {
    pub agent_id: &'a str,
    pub vm_cid: &'a str,
    pub agent: &'a AgentConfig,
    /// The create_vm networks, each NIC-backed one already carrying its `mac`.
    pub networks: &'a Map<String, Value>,
    pub has_ephemeral_disk: bool,
    /// The bus of the root and ephemeral disks.
    pub disk_bus: DiskBus,
    /// The create_vm `env`, passed through untouched (null becomes `{}`).
    pub env: &'a Value,
}

pub fn agent_settings(input: &SettingsInput) -> Value {
    let mut disks = Map::new();
    disks.insert("system".into(), json!(system_disk(input.disk_bus)));
    if input.has_ephemeral_disk {
        disks.insert(
            "ephemeral".into(),
            json!({ "path": ephemeral_path(input.disk_bus) }),
        );
    }
    disks.insert("persistent".into(), json!({}));

    let mut s = Map::new();
    s.insert("agent_id".into(), json!(input.agent_id));
    s.insert("vm".into(), json!({ "name": input.vm_cid }));
    s.insert("mbus".into(), json!(input.agent.mbus));
    s.insert("ntp".into(), json!(input.agent.ntp));
    if let Some(blobstore) = &input.agent.blobstore {
        s.insert("blobstore".into(), blobstore.clone());
    }
    s.insert("networks".into(), Value::Object(input.networks.clone()));
    s.insert("disks".into(), Value::Object(disks));
    s.insert(
        "env".into(),
        match input.env {
            Value::Null => json!({}),
            env => env.clone(),
        },
    );
    Value::Object(s)
}

/// `ec2/latest/meta-data.json`: the agent requires valid JSON here; there is
/// no SSH key to offer (BOSH puts keys into env).
pub fn meta_data(vm_cid: &str) -> Value {
    json!({ "instance-id": vm_cid, "local-hostname": vm_cid })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentConfig {
        AgentConfig {
            mbus: "nats://10.0.16.6:4222".into(),
            ntp: vec!["time1.example".into()],
            blobstore: Some(json!({"provider": "dav", "options": {"endpoint": "https://b"}})),
        }
    }

    #[test]
    fn settings_have_the_shapes_the_agent_needs() {
        let networks = json!({"default": {"type": "manual", "ip": "10.0.0.5", "prefix": "32",
            "mac": "52:54:00:00:00:01", "cloud_properties": {}}});
        let env = json!({"bosh": {"password": "secret", "odd": [1, null, {"x": 1.5}]}});
        let a = agent();
        let s = agent_settings(&SettingsInput {
            agent_id: "agent-1",
            vm_cid: "vm-1",
            agent: &a,
            networks: networks.as_object().unwrap(),
            has_ephemeral_disk: true,
            disk_bus: DiskBus::Virtio,
            env: &env,
        });
        assert_eq!(s["agent_id"], "agent-1");
        assert_eq!(s["vm"], json!({"name": "vm-1"}));
        assert_eq!(s["mbus"], "nats://10.0.16.6:4222");
        assert_eq!(s["ntp"], json!(["time1.example"]));
        assert_eq!(s["blobstore"]["provider"], "dav");
        assert_eq!(s["disks"]["system"], "/dev/vda");
        assert_eq!(s["disks"]["ephemeral"], json!({"path": "/dev/vdb"}));
        assert_eq!(s["disks"]["persistent"], json!({}));
        assert_eq!(s["networks"]["default"]["mac"], "52:54:00:00:00:01");
        assert_eq!(s["networks"]["default"]["prefix"], "32");
        assert_eq!(s["env"], env);
    }

    #[test]
    fn no_ephemeral_disk_means_no_ephemeral_key_and_null_env_is_empty() {
        let a = AgentConfig {
            blobstore: None,
            ..agent()
        };
        let s = agent_settings(&SettingsInput {
            agent_id: "a",
            vm_cid: "vm-2",
            agent: &a,
            networks: &Map::new(),
            has_ephemeral_disk: false,
            disk_bus: DiskBus::Scsi,
            env: &Value::Null,
        });
        assert!(s["disks"].get("ephemeral").is_none());
        assert_eq!(s["disks"]["system"], "/dev/sda");
        assert_eq!(
            ephemeral_path(DiskBus::Scsi),
            "/dev/disk/by-id/scsi-0QEMU_QEMU_HARDDISK_bosh-ephemeral"
        );
        assert!(s.get("blobstore").is_none());
        assert_eq!(s["env"], json!({}));
        assert_eq!(meta_data("vm-2")["instance-id"], "vm-2");
    }
}
