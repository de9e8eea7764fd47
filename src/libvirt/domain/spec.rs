//! The domain XML the CPI defines for a new VM: its disks, config drive,
//! NICs, controllers (with spare PCIe root ports for hot-plugged disks),
//! console, optional graphics, and the `bosh` metadata element.

use crate::libvirt::disk::driver_element;
use crate::libvirt::xmlwrite::El;
use crate::names::EPHEMERAL_SERIAL;
use crate::vm_spec::{CpuMode, DiskBus, Firmware, NicSource};

/// Spare PCIe root ports beyond those the domain's own devices take, so
/// persistent disks can be hot-plugged into q35 domains later.
pub const SPARE_ROOT_PORTS: usize = 6;

pub use crate::host::DomainSpec;

pub fn is_q35(machine: &str) -> bool {
    machine == "q35" || machine.starts_with("pc-q35")
}

impl DomainSpec {
    pub fn to_xml(&self) -> String {
        El::new("domain")
            .attr("type", &self.domain_type)
            .text_child("name", &self.name)
            .text_child("uuid", &self.uuid)
            .child(El::new("metadata").child(self.metadata.domain_element()))
            .child(El::new("memory").attr("unit", "MiB").text(self.memory_mib))
            .text_child("vcpu", self.cpus)
            .child(self.os())
            .children(self.cpu())
            .child(
                El::new("features")
                    .child(El::new("acpi"))
                    .child(El::new("apic")),
            )
            .child(El::new("clock").attr("offset", "utc"))
            .text_child("on_poweroff", "destroy")
            .text_child("on_reboot", "restart")
            .text_child("on_crash", "restart")
            .child(self.devices())
            .to_indented()
    }

    fn devices(&self) -> El {
        let (root_dev, eph_dev) = match self.disk.bus {
            DiskBus::Virtio => ("vda", "vdb"),
            // sda is the config drive's (SATA) name; libvirt wants names unique.
            DiskBus::Scsi => ("sdb", "sdc"),
        };
        let disk = |format: &str, path: &str, dev: &str| {
            El::new("disk")
                .attr("type", "file")
                .attr("device", "disk")
                .child(driver_element(format, &self.disk))
                .child(El::new("source").attr("file", path))
                .child(
                    El::new("target")
                        .attr("dev", dev)
                        .attr("bus", self.disk.bus.as_str()),
                )
        };
        let ephemeral = self
            .ephemeral_disk
            .as_deref()
            .map(|eph| disk("raw", eph, eph_dev).text_child("serial", EPHEMERAL_SERIAL));
        // The config drive is a SATA CD-ROM: the guest sees /dev/sr0 and the
        // virtio letters stay vda (root), vdb (ephemeral), vdc... (persistent).
        let config_drive = El::new("disk")
            .attr("type", "file")
            .attr("device", "cdrom")
            .child(El::new("driver").attr("name", "qemu").attr("type", "raw"))
            .child(El::new("source").attr("file", &self.config_drive))
            .child(El::new("target").attr("dev", "sda").attr("bus", "sata"))
            .child(El::new("readonly"));
        let nics = self.nics.iter().map(|(mac, source)| {
            let (kind, src) = match source {
                NicSource::Network(n) => (
                    "network",
                    El::new("source").attr("network", n.as_deref().unwrap_or_default()),
                ),
                NicSource::Bridge(b) => ("bridge", El::new("source").attr("bridge", b)),
                NicSource::Direct { dev, mode } => (
                    "direct",
                    El::new("source").attr("dev", dev).attr("mode", mode),
                ),
            };
            El::new("interface")
                .attr("type", kind)
                .child(El::new("mac").attr("address", mac))
                .child(src)
                .child(El::new("model").attr("type", "virtio"))
        });
        // Every domain has a virtio-scsi controller, so a disk_type with
        // bus scsi can be hot-plugged into any VM.
        let scsi = El::new("controller")
            .attr("type", "scsi")
            .attr("index", 0)
            .attr("model", "virtio-scsi");
        let graphics = self.graphics.as_ref().map(|(kind, password)| {
            // Never on 0.0.0.0: the host's localhost only (an SSH tunnel
            // reaches it), and with a password.
            El::new("graphics")
                .attr("type", kind.as_str())
                .attr("autoport", "yes")
                .attr("passwd", password)
                .child(
                    El::new("listen")
                        .attr("type", "address")
                        .attr("address", "127.0.0.1"),
                )
        });
        let video = self
            .graphics
            .as_ref()
            .map(|_| El::new("video").child(El::new("model").attr("type", "virtio")));
        El::new("devices")
            .child(disk("qcow2", &self.root_disk, root_dev))
            .children(ephemeral)
            .child(config_drive)
            .children(nics)
            .child(scsi)
            .children(self.pcie_controllers())
            .child(
                El::new("controller")
                    .attr("type", "usb")
                    .attr("model", "none"),
            )
            .child(
                El::new("serial")
                    .attr("type", "pty")
                    .child(
                        El::new("log")
                            .attr("file", &self.console_log)
                            .attr("append", "off"),
                    )
                    .child(El::new("target").attr("port", 0)),
            )
            .child(
                El::new("console")
                    .attr("type", "pty")
                    .child(El::new("target").attr("type", "serial").attr("port", 0)),
            )
            .children(graphics)
            .children(video)
            .child(El::new("memballoon").attr(
                "model",
                if self.memory_balloon {
                    "virtio"
                } else {
                    "none"
                },
            ))
            .child(
                El::new("rng").attr("model", "virtio").child(
                    El::new("backend")
                        .attr("model", "random")
                        .text("/dev/urandom"),
                ),
            )
    }

    /// On q35, the PCIe root and its root ports; none on i440fx.
    fn pcie_controllers(&self) -> Vec<El> {
        if !is_q35(&self.machine) {
            return Vec::new();
        }
        // libvirt puts each PCIe device behind its own root port, taking
        // the ports it is given first, so the spare ones come on top.
        let disks = match self.disk.bus {
            DiskBus::Virtio => 1 + usize::from(self.ephemeral_disk.is_some()),
            DiskBus::Scsi => 0,
        };
        let graphics = usize::from(self.graphics.is_some());
        let used = disks + self.nics.len() + 1 + usize::from(self.memory_balloon) + 1 + graphics;
        let root = El::new("controller")
            .attr("type", "pci")
            .attr("index", 0)
            .attr("model", "pcie-root");
        let port = El::new("controller")
            .attr("type", "pci")
            .attr("model", "pcie-root-port");
        std::iter::once(root)
            .chain(std::iter::repeat_n(port, used + SPARE_ROOT_PORTS))
            .collect()
    }

    fn os(&self) -> El {
        let os_type = El::new("type")
            .attr("arch", "x86_64")
            .attr("machine", &self.machine)
            .text("hvm");
        let boot = El::new("boot").attr("dev", "hd");
        match self.firmware {
            Firmware::Bios => El::new("os").child(os_type).child(boot),
            // libvirt picks an OVMF build from QEMU's firmware descriptors;
            // stemcells are not signed for secure boot, so not that one.
            Firmware::Uefi => El::new("os")
                .attr("firmware", "efi")
                .child(os_type)
                .child(
                    El::new("firmware").child(
                        El::new("feature")
                            .attr("enabled", "no")
                            .attr("name", "secure-boot"),
                    ),
                )
                .child(boot),
        }
    }

    fn cpu(&self) -> Option<El> {
        let topology = self.cpu_topology.map(|t| {
            El::new("topology")
                .attr("sockets", t.sockets)
                .attr("dies", 1)
                .attr("cores", t.cores)
                .attr("threads", t.threads)
        });
        let cpu = match &self.cpu_mode {
            CpuMode::Default if topology.is_none() => return None,
            CpuMode::Default => El::new("cpu"),
            CpuMode::HostPassthrough => El::new("cpu")
                .attr("mode", "host-passthrough")
                .attr("check", "none"),
            CpuMode::HostModel => El::new("cpu").attr("mode", "host-model"),
            CpuMode::Custom(model) => El::new("cpu")
                .attr("mode", "custom")
                .attr("match", "exact")
                .child(El::new("model").attr("fallback", "forbid").text(model)),
        };
        Some(cpu.children(topology))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::libvirt::domain::{DomainFacts, NicRecord, VmMetadata};
    use crate::libvirt::xmltree::Element;
    use crate::libvirt::xmlwrite::HOSTILE;
    use crate::vm_spec::{CpuTopology, DiskOptions, Graphics};

    fn spec() -> DomainSpec {
        DomainSpec {
            name: "vm-1".into(),
            uuid: "6b0f4c4e-1b7a-4a53-9d1e-000000000001".into(),
            domain_type: "qemu".into(),
            machine: "q35".into(),
            memory_mib: 512,
            cpus: 2,
            cpu_mode: CpuMode::Default,
            cpu_topology: None,
            memory_balloon: true,
            firmware: Firmware::Bios,
            graphics: None,
            root_disk: "/pool/vm-1-root".into(),
            ephemeral_disk: Some("/pool/vm-1-ephemeral".into()),
            disk: DiskOptions::parse(&serde_json::Map::new(), "").unwrap(),
            config_drive: "/pool/vm-1-config.iso".into(),
            nics: vec![(
                "52:54:00:00:00:01".into(),
                NicSource::Network(Some("net-a".into())),
            )],
            console_log: "/logs/vm-1.console.log".into(),
            metadata: VmMetadata {
                agent_id: "agent-<1>".into(),
                stemcell: "sc-1".into(),
                created_at: "2026-01-01T00:00:00Z".into(),
                networks: vec![NicRecord {
                    network: "default".into(),
                    kind: "manual".into(),
                    libvirt_network: Some("net-a".into()),
                    mac: Some("52:54:00:00:00:01".into()),
                    ip: Some("10.0.0.5".into()),
                    dhcp_host: Some("vm-1".into()),
                }],
                tags: vec![("deployment".into(), "d & 'e'".into())],
                creating: Some("boot:1:2:3".into()),
            },
        }
    }

    #[test]
    fn domain_xml_round_trips_through_the_parser() {
        let s = spec();
        let xml = s.to_xml();
        let facts = DomainFacts::from_xml(&xml).unwrap();
        assert_eq!(
            facts.interfaces,
            vec![("52:54:00:00:00:01".to_string(), "net-a".to_string())]
        );
        assert_eq!(facts.metadata.as_ref(), Some(&s.metadata));
        let root = Element::parse(&xml).unwrap();
        let ports = root
            .child("devices")
            .unwrap()
            .children_named("controller")
            .filter(|c| c.attr("model") == Some("pcie-root-port"))
            .count();
        // root, ephemeral, one NIC, scsi controller, balloon, rng + the spares.
        assert_eq!(ports, 6 + SPARE_ROOT_PORTS);
        assert!(xml.contains("<controller type='scsi' index='0' model='virtio-scsi'/>"));
        assert!(!xml.contains("<cpu") && !xml.contains("<graphics") && !xml.contains("firmware"));
        assert!(xml.contains("<memballoon model='virtio'/>"));
        assert!(xml.contains("<readonly/>") && xml.contains("bus='sata'"));
        assert!(xml.contains("append='off'"));
    }

    #[test]
    fn shapes_in_the_domain_xml() {
        let mut s = spec();
        s.cpu_mode = CpuMode::Custom("qemu64".into());
        s.cpu_topology = Some(CpuTopology {
            sockets: 1,
            cores: 2,
            threads: 1,
        });
        s.memory_balloon = false;
        s.firmware = Firmware::Uefi;
        s.graphics = Some((Graphics::Vnc, "pw".into()));
        s.disk = DiskOptions::parse(
            serde_json::json!({"bus": "scsi", "cache": "none", "io": "native"})
                .as_object()
                .unwrap(),
            "",
        )
        .unwrap();
        s.nics
            .push(("02:00:00:00:00:02".into(), NicSource::Bridge("br0".into())));
        s.nics.push((
            "02:00:00:00:00:03".into(),
            NicSource::Direct {
                dev: "eth1".into(),
                mode: "vepa".into(),
            },
        ));
        let xml = s.to_xml();
        let root = Element::parse(&xml).unwrap();
        let cpu = root.child("cpu").unwrap();
        assert_eq!(cpu.attr("mode"), Some("custom"));
        assert_eq!(cpu.child("model").unwrap().text_trimmed(), "qemu64");
        assert_eq!(cpu.child("topology").unwrap().attr("cores"), Some("2"));
        assert_eq!(root.child("os").unwrap().attr("firmware"), Some("efi"));
        assert!(xml.contains("<memballoon model='none'/>"));
        assert!(xml.contains("<graphics type='vnc' autoport='yes' passwd='pw'>"));
        assert!(xml.contains("<listen type='address' address='127.0.0.1'/>"));
        assert!(xml.contains("<target dev='sdb' bus='scsi'/>"));
        assert!(xml.contains("<target dev='sdc' bus='scsi'/>"));
        assert!(xml.contains(
            "<driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>"
        ));
        assert!(
            xml.contains("<interface type='bridge'>") && xml.contains("<source bridge='br0'/>")
        );
        assert!(xml.contains("<source dev='eth1' mode='vepa'/>"));
        let facts = DomainFacts::from_xml(&xml).unwrap();
        assert_eq!(facts.interfaces.len(), 3);
        s.cpu_mode = CpuMode::HostPassthrough;
        assert!(s
            .to_xml()
            .contains("<cpu mode='host-passthrough' check='none'>"));
        s.cpu_mode = CpuMode::Default;
        s.cpu_topology = None;
        assert!(!s.to_xml().contains("<cpu"));
    }

    #[test]
    fn i440fx_domains_get_no_pcie_ports() {
        let mut s = spec();
        s.machine = "pc".into();
        s.ephemeral_disk = None;
        let xml = s.to_xml();
        assert!(!xml.contains("pcie-root"));
        assert!(!xml.contains("vdb"));
    }

    #[test]
    fn hostile_values_stay_values() {
        for v in HOSTILE {
            let mut s = spec();
            s.name = v.to_string();
            s.root_disk = v.to_string();
            s.console_log = v.to_string();
            s.graphics = Some((Graphics::Spice, v.to_string()));
            s.nics
                .push((v.to_string(), NicSource::Bridge(v.to_string())));
            s.metadata.agent_id = format!("a{v}z");
            s.metadata.tags = vec![(v.to_string(), v.to_string())];
            s.metadata.networks[0].network = v.to_string();
            s.metadata.networks[0].ip = Some(v.to_string());
            s.metadata.creating = Some(format!("c{v}z"));
            let xml = s.to_xml();
            let root = Element::parse(&xml).unwrap_or_else(|e| panic!("{v:?}: {e}\n{xml}"));
            assert_eq!(root.child("name").unwrap().text, *v);
            assert_eq!(
                DomainFacts::from_xml(&xml).unwrap().metadata.as_ref(),
                Some(&s.metadata)
            );
            let devices = root.child("devices").unwrap();
            let disk = devices.child("disk").unwrap();
            assert_eq!(disk.child("source").unwrap().attr("file"), Some(*v));
            let nic = devices.children_named("interface").last().unwrap();
            assert_eq!(nic.child("mac").unwrap().attr("address"), Some(*v));
            assert_eq!(nic.child("source").unwrap().attr("bridge"), Some(*v));
            let graphics = devices.child("graphics").unwrap();
            assert_eq!(graphics.attr("passwd"), Some(*v));
            // The same elements as with plain values, in the same order.
            let shape = |root: &Element| {
                fn walk(el: &Element, out: &mut Vec<String>) {
                    out.push(format!(
                        "{}{:?}",
                        el.name,
                        el.attrs.iter().map(|(k, _)| k).collect::<Vec<_>>()
                    ));
                    el.children.iter().for_each(|c| walk(c, out));
                }
                let mut out = Vec::new();
                walk(root, &mut out);
                out
            };
            let mut plain = spec();
            plain.graphics = Some((Graphics::Spice, "pw".into()));
            plain
                .nics
                .push(("m".into(), NicSource::Bridge("br0".into())));
            plain.metadata.tags = vec![("k".into(), "v".into())];
            assert_eq!(
                shape(&root),
                shape(&Element::parse(&plain.to_xml()).unwrap()),
                "{v:?}"
            );
        }
    }

    /// Through libvirt's own parser (libxml2, in libvirt's in-process test
    /// driver): the domain as defined, and the metadata element as
    /// set_vm_metadata replaces it, come back with every value unchanged.
    /// libxml2 normalises whitespace in attribute values and line ends in
    /// text, so a tab, newline or carriage return a value holds must reach it
    /// as a character reference.
    #[test]
    fn hostile_values_survive_libvirts_parser() {
        use crate::libvirt::disk::parse_domain_disks;
        use crate::libvirt::Libvirt;
        let lv = Libvirt::open("test:///default").unwrap();
        for (i, v) in HOSTILE.iter().enumerate() {
            let mut s = spec();
            // The test driver's domain type; the XML is otherwise the CPI's.
            s.domain_type = "test".into();
            s.name = format!("xmlw-hostile-{i}");
            s.uuid = uuid::Uuid::new_v4().to_string();
            s.root_disk = format!("/pool/{v}");
            s.metadata.tags = vec![
                (v.to_string(), v.to_string()),
                (format!("k{v}\n"), format!("{v}\r\n")),
            ];
            s.metadata.networks[0].network = v.to_string();
            let dom = lv
                .define_domain(&s)
                .unwrap_or_else(|e| panic!("{v:?}: {}", e.message));
            let facts = lv.domain_facts(&dom, &s.name).unwrap();
            assert_eq!(facts.metadata.as_ref(), Some(&s.metadata), "{v:?}");
            let xml = dom.xml_desc(0).unwrap();
            let disks = parse_domain_disks(&xml).unwrap();
            assert_eq!(disks[0].source_path, Some(s.root_disk.clone()), "{v:?}");
            let mut md = s.metadata.clone();
            md.tags.reverse();
            md.agent_id = format!("a{v}z");
            md.creating = None;
            lv.set_vm_metadata(&dom, &s.name, &md).unwrap();
            let facts = lv.domain_facts(&dom, &s.name).unwrap();
            assert_eq!(facts.metadata, Some(md), "{v:?}");
            // Titles are one line (see handlers' title_for); libvirt writes them.
            let title: String = v
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            if !title.is_empty() {
                lv.set_title(&dom, &s.name, &title).unwrap();
                let facts = lv.domain_facts(&dom, &s.name).unwrap();
                assert_eq!(facts.title, Some(title), "{v:?}");
            }
            dom.undefine().unwrap();
        }
    }
}
