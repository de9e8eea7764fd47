//! The `<disk>` devices of domain XML: the device the CPI attaches for a
//! persistent disk, the minimal one it detaches with, and the disks read
//! back from a domain's live or persistent XML.

use crate::error::{CpiError, Result};
use crate::host::{DiskDevice, DomainDisks};
use crate::libvirt::volume::DiskFormat;
use crate::libvirt::xmltree::Element;
use crate::libvirt::xmlwrite::El;
use crate::vm_spec::DiskOptions;

impl DomainDisks {
    /// From the domain's live XML (while it runs) and persistent XML.
    pub(super) fn parse(
        name: &str,
        running: bool,
        live: Option<&str>,
        config: &str,
    ) -> Result<DomainDisks> {
        let parse = |xml: &str| {
            parse_domain_disks(xml)
                .map_err(|e| CpiError::cloud(format!("parsing the XML of domain {name}: {e}")))
        };
        Ok(DomainDisks {
            running,
            live: live.map(parse).transpose()?.unwrap_or_default(),
            config: parse(config)?,
        })
    }
}

/// The device the CPI attaches for a persistent disk: on its disk_type's
/// bus (virtio-blk, or a disk of the domain's virtio-scsi controller), with
/// its cache/io/discard options, and `<serial>` = CID either way (how the
/// agent finds it). Without a disk_type cache mode, `cache='none'` (O_DIRECT
/// on the host: no double caching, guest flushes reach the disk), which
/// works under both TCG and KVM on the local filesystems a `dir` pool lives on.
pub fn disk_device_xml(
    path: &str,
    format: DiskFormat,
    target: &str,
    serial: &str,
    options: &DiskOptions,
) -> String {
    let mut options = options.clone();
    options.cache.get_or_insert_with(|| "none".to_string());
    El::new("disk")
        .attr("type", "file")
        .attr("device", "disk")
        .child(driver_element(format.as_str(), &options))
        .child(El::new("source").attr("file", path))
        .child(
            El::new("target")
                .attr("dev", target)
                .attr("bus", options.bus.as_str()),
        )
        .text_child("serial", serial)
        .to_compact()
}

/// `<driver>` of a QEMU disk image of `format` with its cache, io and
/// discard options (also the root and ephemeral disks' in the domain XML).
pub fn driver_element(format: &str, options: &DiskOptions) -> El {
    El::new("driver")
        .attr("name", "qemu")
        .attr("type", format)
        .attr_opt("cache", options.cache.as_ref())
        .attr_opt("io", options.io.as_ref())
        .attr("discard", &options.discard)
}

/// Enough of a device for libvirt to find it again (it matches disks by target).
pub(super) fn detach_xml(d: &DiskDevice) -> String {
    let source = match (&d.kind[..], &d.source_path) {
        ("file", Some(p)) => Some(El::new("source").attr("file", p)),
        ("block", Some(p)) => Some(El::new("source").attr("dev", p)),
        _ => None,
    };
    El::new("disk")
        .attr("type", &d.kind)
        .attr("device", &d.device)
        .children(source)
        .child(
            El::new("target")
                .attr("dev", &d.target)
                .attr_opt("bus", Some(&d.bus).filter(|b| !b.is_empty())),
        )
        .to_compact()
}

/// What a block copy writes to: the existing qcow2 volume at `path`.
pub(super) fn copy_destination_xml(path: &str) -> String {
    El::new("disk")
        .attr("type", "file")
        .child(El::new("source").attr("file", path))
        .child(El::new("driver").attr("type", "qcow2"))
        .to_compact()
}

/// Whether a domain XML document's root carries an `id`: libvirt writes one
/// for an active domain only (`<domain type='qemu' id='3'>`; shut off, or
/// asked for the inactive definition, it has none).
pub(super) fn has_domain_id(xml: &str) -> std::result::Result<bool, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    loop {
        match reader.read_event().map_err(|e| e.to_string())? {
            quick_xml::events::Event::Start(e) | quick_xml::events::Event::Empty(e) => {
                return Ok(e.attributes().flatten().any(|a| a.key.as_ref() == b"id"));
            }
            quick_xml::events::Event::Eof => return Err("no root element".into()),
            _ => {}
        }
    }
}

/// The `<disk>` devices of a domain XML document (live or inactive). Only a
/// disk's own children count: the `<source>` inside `<backingStore>` or
/// `<mirror>` describes another image.
pub fn parse_domain_disks(xml: &str) -> std::result::Result<Vec<DiskDevice>, String> {
    let root = Element::parse(xml)?;
    if root.name != "domain" {
        return Ok(Vec::new());
    }
    Ok(root
        .children_named("devices")
        .flat_map(|devices| devices.children_named("disk"))
        .map(disk_device)
        .collect())
}

fn disk_device(el: &Element) -> DiskDevice {
    let owned = |v: Option<&str>| v.map(str::to_string);
    let mut d = DiskDevice {
        kind: el.attr("type").unwrap_or_default().to_string(),
        device: el.attr("device").unwrap_or("disk").to_string(),
        ..Default::default()
    };
    // A later element of the same name overrides an earlier one.
    for c in &el.children {
        match c.name.as_str() {
            "serial" if !c.text.is_empty() => {
                d.serial.get_or_insert_with(String::new).push_str(&c.text);
            }
            "target" => {
                d.target = c.attr("dev").unwrap_or_default().to_string();
                d.bus = c.attr("bus").unwrap_or_default().to_string();
            }
            "source" => {
                d.source_path = owned(c.attr("file").or_else(|| c.attr("dev")));
                if let (Some(p), Some(v)) = (c.attr("pool"), c.attr("volume")) {
                    d.source_volume = Some((p.to_string(), v.to_string()));
                }
            }
            "driver" => d.driver_type = owned(c.attr("type")),
            "mirror" => {
                d.mirror_ready = Some(c.attr("ready") == Some("yes"));
                d.mirror_path = owned(
                    c.attr("file")
                        .or_else(|| c.child("source").and_then(|s| s.attr("file"))),
                );
            }
            _ => {}
        }
    }
    if let Some(s) = &mut d.serial {
        *s = s.trim().to_string();
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::DiskRef;
    use crate::libvirt::xmlwrite::HOSTILE;

    const LIVE: &str = r#"<domain type='qemu' id='3'>
  <name>vm-1</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/pool/vm-1-root' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/pool/sc-1'/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/pool/vm-1-config.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/pool/disk-0f3a9c21b7e54d8' index='4'/>
      <backingStore/>
      <target dev='vdc' bus='virtio'/>
      <serial>disk-0f3a9c21b7e54d8</serial>
      <mirror type='file' file='/pool/snap' format='qcow2' job='copy' ready='yes'>
        <format type='qcow2'/>
        <source file='/pool/snap' index='5'/>
      </mirror>
    </disk>
    <disk type='volume' device='disk'>
      <source pool='bosh' volume='disk-aaaaaaaaaaaaaaa'/>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
  </devices>
</domain>"#;

    #[test]
    fn only_an_active_domains_xml_carries_an_id() {
        assert_eq!(has_domain_id(LIVE), Ok(true));
        let inactive = LIVE.replace(" id='3'", "");
        assert_eq!(has_domain_id(&inactive), Ok(false));
        // Only the root's own attributes count.
        let nested = "<domain type='qemu'><devices><disk id='1'/></devices></domain>";
        assert_eq!(has_domain_id(nested), Ok(false));
        assert!(has_domain_id("").is_err());
    }

    #[test]
    fn parses_disks_ignoring_nested_sources() {
        let d = parse_domain_disks(LIVE).unwrap();
        assert_eq!(d.len(), 4);
        assert_eq!(d[0].target, "vda");
        assert_eq!(d[0].source_path.as_deref(), Some("/pool/vm-1-root"));
        assert_eq!(d[0].serial, None);
        assert_eq!(d[1].device, "cdrom");
        assert_eq!(d[2].serial.as_deref(), Some("disk-0f3a9c21b7e54d8"));
        assert_eq!(
            d[2].source_path.as_deref(),
            Some("/pool/disk-0f3a9c21b7e54d8")
        );
        assert_eq!(d[2].driver_type.as_deref(), Some("raw"));
        assert_eq!(d[2].mirror_ready, Some(true));
        assert_eq!(d[0].mirror_ready, None);
        assert_eq!(
            d[3].source_volume,
            Some(("bosh".into(), "disk-aaaaaaaaaaaaaaa".into()))
        );
    }

    #[test]
    fn disks_are_found_by_serial_path_or_volume() {
        let d = parse_domain_disks(LIVE).unwrap();
        let by_serial = DiskRef {
            cid: "disk-0f3a9c21b7e54d8",
            path: None,
            pool: "bosh",
        };
        assert!(d[2].refers_to(&by_serial));
        assert!(!d[0].refers_to(&by_serial));
        let by_path = DiskRef {
            cid: "disk-bbbbbbbbbbbbbbb",
            path: Some("/pool/vm-1-root"),
            pool: "bosh",
        };
        assert!(d[0].refers_to(&by_path));
        let by_volume = DiskRef {
            cid: "disk-aaaaaaaaaaaaaaa",
            path: Some("/elsewhere"),
            pool: "bosh",
        };
        assert!(d[3].refers_to(&by_volume));
        let other_pool = DiskRef {
            pool: "other",
            ..by_volume
        };
        assert!(!d[3].refers_to(&other_pool));
    }

    #[test]
    fn escaped_serials_and_bad_xml() {
        let xml = "<domain><devices><disk type='file' device='disk'><target dev='vdb'/>\
                   <serial>a&amp;b</serial></disk></devices></domain>";
        assert_eq!(
            parse_domain_disks(xml).unwrap()[0].serial.as_deref(),
            Some("a&b")
        );
        assert!(parse_domain_disks("<domain><devices><disk></devices>").is_err());
    }

    #[test]
    fn device_xml_round_trips() {
        let defaults = DiskOptions::default();
        let xml = disk_device_xml("/p/disk-1", DiskFormat::Raw, "vdc", "disk-1", &defaults);
        assert!(xml.contains("cache='none' discard='unmap'"), "{xml}");
        let scsi = DiskOptions {
            bus: crate::vm_spec::DiskBus::Scsi,
            cache: Some("writeback".into()),
            ..defaults.clone()
        };
        let s = disk_device_xml("/p/disk-1", DiskFormat::Raw, "sdd", "disk-1", &scsi);
        assert!(
            s.contains("cache='writeback'") && s.contains("bus='scsi'"),
            "{s}"
        );
        let wrapped = format!("<domain><devices>{xml}</devices></domain>");
        let d = &parse_domain_disks(&wrapped).unwrap()[0];
        assert_eq!(
            (
                d.kind.as_str(),
                d.target.as_str(),
                d.serial.as_deref(),
                d.driver_type.as_deref()
            ),
            ("file", "vdc", Some("disk-1"), Some("raw"))
        );
        let detach = format!("<domain><devices>{}</devices></domain>", detach_xml(d));
        assert_eq!(parse_domain_disks(&detach).unwrap()[0].target, "vdc");
    }

    #[test]
    fn hostile_paths_serials_and_targets_stay_values() {
        for v in HOSTILE {
            let xml = disk_device_xml(v, DiskFormat::Qcow2, v, v, &DiskOptions::default());
            let wrapped = format!("<domain><devices>{xml}</devices></domain>");
            let disks = parse_domain_disks(&wrapped).unwrap();
            assert_eq!(disks.len(), 1, "{xml}");
            let d = &disks[0];
            assert_eq!(d.source_path.as_deref(), Some(*v));
            assert_eq!(d.target, *v);
            // The parser trims serials (libvirt may pad them); empty is none.
            assert_eq!(
                d.serial.as_deref(),
                Some(v.trim()).filter(|s| !s.is_empty())
            );
            let names: Vec<_> = Element::parse(&xml)
                .unwrap()
                .children
                .iter()
                .map(|c| c.name.clone())
                .collect();
            assert_eq!(names, ["driver", "source", "target", "serial"]);
            let dev = DiskDevice {
                kind: "file".into(),
                device: "disk".into(),
                target: v.to_string(),
                bus: v.to_string(),
                source_path: Some(v.to_string()),
                ..Default::default()
            };
            let detach = format!("<domain><devices>{}</devices></domain>", detach_xml(&dev));
            let back = &parse_domain_disks(&detach).unwrap()[0];
            assert_eq!((&back.target, &back.bus), (&dev.target, &dev.bus));
            assert_eq!(back.source_path, dev.source_path);
            let copy = Element::parse(&copy_destination_xml(v)).unwrap();
            assert_eq!(copy.at(&["source"]).unwrap().attr("file"), Some(*v));
            assert_eq!(copy.children.len(), 2);
        }
    }
}
