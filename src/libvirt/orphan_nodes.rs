//! What a disk hot-plug leaves in QEMU when libvirtd dies in the middle of
//! it: block nodes, and possibly the guest device using them, that QEMU
//! holds but libvirt no longer knows about. They make every later hot-plug
//! of that disk into that VM fail until the VM is powered off; this removes
//! them through QEMU's monitor so the attach can be done again.
//!
//! Why libvirt forgets them (libvirt 11.3, src/qemu/qemu_hotplug.c):
//! qemuDomainAttachDeviceDiskLiveInternal gives the disk its node names
//! (qemuDomainPrepareDiskSource: `libvirt-<N>-storage`/`-format`, N from
//! qemuDomainStorageIDNew, `++priv->nodenameindex` in
//! src/qemu/qemu_domain.c), then qemuDomainAttachDiskGeneric runs
//! `blockdev-add` for them (qemuBlockStorageSourceChainAttach) and
//! `device_add` for the guest device; only after both does it add the disk
//! to the live definition (virDomainDiskInsert), which is then written to
//! the status XML together with `<nodename index='N'/>`
//! (qemuDomainObjPrivateXMLFormat, src/qemu/qemu_domain.c). A libvirtd
//! killed in between restarts from the older status XML: no such disk, and
//! the old node index. Measured here (libvirt 11.3, QEMU 10.0, kills 0-8
//! ms after QEMU opened the file, tests/hotplug_faults.rs): the next
//! attach fails with
//! "Duplicate nodes with node-name='libvirt-4-storage'" (the index is
//! reused), the ones after it with "Duplicate device ID 'virtio-disk1'"
//! (raw: the same target gets the same alias) or "Failed to get \"write\"
//! lock" (qcow2); `virsh detach-disk` cannot help (libvirt has no such
//! disk), and another VM cannot attach the disk either (QEMU's image lock).
//!
//! Only what belongs to the disk's own file and is unknown to the live
//! definition is removed: the nodes whose `file` is the disk's path, the
//! devices holding one of them whose id is no alias in the live XML. A
//! device is unplugged the way libvirt unplugs one (`device_del`, which the
//! guest must acknowledge) and counts as gone only once QEMU no longer lists
//! it; its nodes go after it (`blockdev-del`). libvirt marks a domain whose
//! monitor was used directly as tainted ("custom-monitor"): the handlers
//! look only after a hot-plug failed, or when a detach finds the disk
//! missing from a running domain's live XML.
//!
//! Boundary: QMP and libvirt's live XML only; which BOSH error a failure
//! becomes is the handler's business.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virt::domain::Domain;

use super::xmltree::Element;
use super::{lv_error, Libvirt};
use crate::error::{CpiError, Result};

const POLL_INTERVAL: Duration = Duration::from_millis(200);
/// QEMU's prefix of the QOM path of a device added with an id.
const PERIPHERAL: &str = "/machine/peripheral/";

/// What was removed from a VM's QEMU.
#[derive(Debug, Default, PartialEq)]
pub struct Orphans {
    /// Guest devices (their ids).
    pub devices: Vec<String>,
    /// Block node names.
    pub nodes: Vec<String>,
}

impl Orphans {
    pub fn is_empty(&self) -> bool {
        self.devices.is_empty() && self.nodes.is_empty()
    }
}

impl std::fmt::Display for Orphans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "devices [{}], block nodes [{}]",
            self.devices.join(", "),
            self.nodes.join(", ")
        )
    }
}

impl Libvirt {
    /// Removes the block nodes of the file `path` (and the guest devices
    /// using them) that domain `name`'s QEMU holds and its live XML does not
    /// list. Nothing is touched when the live XML has a disk on `path`.
    /// Waits up to `timeout` for the guest to release a device; returns what
    /// was removed (empty when there was nothing).
    pub fn remove_orphan_block_nodes(
        &self,
        domain: &Domain,
        name: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Orphans> {
        let live = domain
            .xml_desc(0)
            .map_err(|e| lv_error(format!("reading the live XML of domain {name}"), e))?;
        let known = LiveDevices::parse(&live)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of domain {name}: {e}")))?;
        if known.paths.iter().any(|p| p == path) {
            return Ok(Orphans::default());
        }
        let qmp = Qmp { domain, name };
        let nodes = nodes_of_file(
            &qmp.run("query-named-block-nodes", json!({"flat": true}))?,
            path,
        );
        if nodes.is_empty() {
            return Ok(Orphans::default());
        }
        let devices = devices_holding(&qmp.run("query-block", json!({}))?, &nodes);
        if let Some(d) = devices.iter().find(|d| known.aliases.contains(d)) {
            return Err(CpiError::cloud(format!(
                "domain {name}: device {d} uses {path} in QEMU but not in libvirt's live XML; \
                 leaving it alone"
            )));
        }
        for id in &devices {
            qmp.unplug(id, timeout)?;
        }
        let removed = qmp.delete_nodes(&nodes)?;
        Ok(Orphans {
            devices,
            nodes: removed,
        })
    }
}

/// What the live XML knows: every device alias and every disk source path.
struct LiveDevices {
    aliases: Vec<String>,
    paths: Vec<String>,
}

impl LiveDevices {
    fn parse(xml: &str) -> std::result::Result<LiveDevices, String> {
        let root = Element::parse(xml)?;
        let mut me = LiveDevices {
            aliases: Vec::new(),
            paths: Vec::new(),
        };
        for dev in root
            .children_named("devices")
            .flat_map(|d| d.children.iter())
        {
            if let Some(a) = dev.child("alias").and_then(|a| a.attr("name")) {
                me.aliases.push(a.to_string());
            }
            if dev.local_name() == "disk" {
                collect_sources(dev, &mut me.paths);
            }
        }
        Ok(me)
    }
}

/// Every `<source file|dev>` under a disk, backing chain and mirror included.
fn collect_sources(el: &Element, out: &mut Vec<String>) {
    for c in &el.children {
        if c.local_name() == "source" {
            if let Some(p) = c.attr("file").or_else(|| c.attr("dev")) {
                out.push(p.to_string());
            }
        }
        collect_sources(c, out);
    }
}

/// Node names of `query-named-block-nodes` (flat) whose file is `path`.
fn nodes_of_file(reply: &Value, path: &str) -> Vec<String> {
    reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["file"].as_str() == Some(path))
        .filter_map(|n| n["node-name"].as_str().map(str::to_string))
        .collect()
}

/// Ids of the devices whose block backend (`query-block`) has one of
/// `nodes` as its root.
fn devices_holding(reply: &Value, nodes: &[String]) -> Vec<String> {
    let mut ids: Vec<String> = reply
        .as_array()
        .into_iter()
        .flatten()
        .filter(|b| {
            b["inserted"]["node-name"]
                .as_str()
                .is_some_and(|n| nodes.iter().any(|x| x == n))
        })
        .filter_map(|b| b["qdev"].as_str().and_then(device_id))
        .collect();
    ids.dedup();
    ids
}

/// The id in a device's QOM path (`/machine/peripheral/virtio-disk1/virtio-backend`
/// -> `virtio-disk1`); a bare id stays as it is.
fn device_id(qdev: &str) -> Option<String> {
    let id = match qdev.strip_prefix(PERIPHERAL) {
        Some(rest) => rest.split('/').next().unwrap_or(""),
        None if !qdev.starts_with('/') => qdev,
        None => "",
    };
    (!id.is_empty()).then(|| id.to_string())
}

/// QMP commands through libvirt's monitor passthrough.
struct Qmp<'a> {
    domain: &'a Domain,
    name: &'a str,
}

impl Qmp<'_> {
    /// The command's `return` value; QEMU's error as a `CloudError`.
    fn run(&self, command: &str, arguments: Value) -> Result<Value> {
        let request = json!({"execute": command, "arguments": arguments}).to_string();
        let reply = self
            .domain
            .qemu_monitor_command(&request, 0)
            .map_err(|e| lv_error(format!("QEMU command {command} on domain {}", self.name), e))?;
        let reply: Value = serde_json::from_str(&reply).map_err(|e| {
            CpiError::cloud(format!(
                "QEMU command {command} on domain {}: unreadable reply: {e}",
                self.name
            ))
        })?;
        match reply.get("error") {
            Some(err) => Err(CpiError::cloud(format!(
                "QEMU command {command} on domain {}: {}",
                self.name,
                err["desc"].as_str().unwrap_or("failed")
            ))),
            None => Ok(reply["return"].clone()),
        }
    }

    fn device_present(&self, id: &str) -> Result<bool> {
        let children = self.run("qom-list", json!({"path": "/machine/peripheral"}))?;
        Ok(children
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["name"].as_str() == Some(id)))
    }

    /// Asks the guest to release device `id` and waits until QEMU no longer
    /// has it. An unplug already requested (an earlier attempt) is waited for.
    fn unplug(&self, id: &str, timeout: Duration) -> Result<()> {
        if let Err(e) = self.run("device_del", json!({"id": id})) {
            if !e.message.contains("in the process of unplug") && self.device_present(id)? {
                return Err(e);
            }
        }
        let started = Instant::now();
        while self.device_present(id)? {
            if started.elapsed() >= timeout {
                return Err(CpiError::cloud(format!(
                    "domain {}: the guest has not released device {id} (left by a hot-plug \
                     libvirtd did not live to record) after {} s; the unplug request stays \
                     pending, retry later",
                    self.name,
                    timeout.as_secs()
                ))
                .retryable(true));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        Ok(())
    }

    /// Deletes `nodes`, a format node before the file node under it (QEMU
    /// refuses to delete a node still in use); returns those deleted.
    fn delete_nodes(&self, nodes: &[String]) -> Result<Vec<String>> {
        let mut left: Vec<String> = nodes.to_vec();
        let mut deleted = Vec::new();
        while !left.is_empty() {
            let mut last_error = None;
            let before = left.len();
            left.retain(
                |n| match self.run("blockdev-del", json!({"node-name": n})) {
                    Ok(_) => {
                        deleted.push(n.clone());
                        false
                    }
                    Err(e) => {
                        last_error = Some(e);
                        true
                    }
                },
            );
            if left.len() == before {
                return Err(last_error.unwrap_or_else(|| CpiError::cloud("blockdev-del")));
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_nodes_and_devices_of_a_file() {
        let nodes = json!([
            {"node-name": "libvirt-4-format", "drv": "qcow2", "file": "/p/disk-a"},
            {"node-name": "libvirt-4-storage", "drv": "file", "file": "/p/disk-a"},
            {"node-name": "libvirt-2-storage", "drv": "file", "file": "/p/vm-root"}
        ]);
        let found = nodes_of_file(&nodes, "/p/disk-a");
        assert_eq!(found, ["libvirt-4-format", "libvirt-4-storage"]);
        let blocks = json!([
            {"device": "", "qdev": "/machine/peripheral/virtio-disk0/virtio-backend",
             "inserted": {"node-name": "libvirt-2-format"}},
            {"device": "", "qdev": "/machine/peripheral/virtio-disk1/virtio-backend",
             "inserted": {"node-name": "libvirt-4-format"}},
            {"device": "", "qdev": "scsi0-0-0-2", "inserted": {"node-name": "libvirt-4-storage"}},
            {"device": "", "qdev": "/machine/peripheral-anon/device[3]", "inserted": {"node-name": "libvirt-4-storage"}},
            {"device": "", "qdev": "sata0-0-0"}
        ]);
        assert_eq!(
            devices_holding(&blocks, &found),
            ["virtio-disk1", "scsi0-0-0-2"]
        );
        assert!(nodes_of_file(&json!({"no": "list"}), "/p/disk-a").is_empty());
    }

    #[test]
    fn reads_aliases_and_every_source_of_the_live_xml() {
        let xml = "<domain><devices>\
            <disk type='file'><source file='/p/root' index='2'/>\
              <backingStore type='file'><source file='/p/sc'/></backingStore>\
              <alias name='virtio-disk0'/></disk>\
            <disk type='file'><source file='/p/cfg.iso'/><alias name='sata0-0-0'/></disk>\
            <controller type='pci'><alias name='pci.1'/></controller>\
            </devices></domain>";
        let d = LiveDevices::parse(xml).unwrap();
        assert_eq!(d.aliases, ["virtio-disk0", "sata0-0-0", "pci.1"]);
        assert_eq!(d.paths, ["/p/root", "/p/sc", "/p/cfg.iso"]);
    }
}
