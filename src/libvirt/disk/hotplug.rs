//! Which domains hold a disk, and hot-plug: attaching a disk device live
//! and/or persistently, removing it from the persistent definition, and the
//! confirmed live unplug (done only once the live XML no longer shows it).

use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use super::xml::{detach_xml, has_domain_id};
use super::POLL_INTERVAL;
use crate::error::{CpiError, Result};
use crate::host::{DiskDevice, DiskRef, DomainDisks, Holder};
use crate::libvirt::{lv_error, not_found_as_none, Libvirt};

impl Libvirt {
    /// The disks of a domain; `None` when the domain vanished meanwhile.
    pub fn domain_disks(&self, domain: &Domain, name: &str) -> Result<Option<DomainDisks>> {
        let Some((running, live, config)) = self.domain_xmls(domain, name)? else {
            return Ok(None);
        };
        DomainDisks::parse(name, running, live.as_deref(), &config).map(Some)
    }

    /// (running, live XML while running, persistent XML): one round trip
    /// for a domain that is shut off, two for one that runs.
    #[allow(clippy::type_complexity)]
    fn domain_xmls(
        &self,
        domain: &Domain,
        name: &str,
    ) -> Result<Option<(bool, Option<String>, String)>> {
        let Some(current) = not_found_as_none(
            domain.xml_desc(0),
            format!("reading the XML of domain {name}"),
        )?
        else {
            return Ok(None);
        };
        // An active (running or paused) domain's XML carries its id; a shut
        // off one's is its persistent definition.
        if !has_domain_id(&current)
            .map_err(|e| CpiError::cloud(format!("parsing the XML of domain {name}: {e}")))?
        {
            return Ok(Some((false, None, current)));
        }
        let Some(config) = not_found_as_none(
            domain.xml_desc(sys::VIR_DOMAIN_XML_INACTIVE),
            format!("reading the persistent XML of domain {name}"),
        )?
        else {
            return Ok(None);
        };
        Ok(Some((true, Some(current), config)))
    }

    /// Every domain (running or not, ours or not) whose live or persistent
    /// definition refers to the disk. The domains' XML is the only record of
    /// attachments, so this is how the CPI knows where a disk is.
    pub fn disk_holders(&self, r: &DiskRef) -> Result<Vec<Holder>> {
        let domains = self
            .conn()
            .list_all_domains(0)
            .map_err(|e| lv_error("listing domains", e))?;
        // A cheap look before parsing: the path as libvirt writes it in an
        // attribute (it escapes the same five characters).
        let path = r.path.map(quick_xml::escape::escape);
        let mut holders = Vec::new();
        for domain in domains {
            let Some(name) = not_found_as_none(domain.name(), "reading a domain name")? else {
                continue;
            };
            let Some((running, live, config)) = self.domain_xmls(&domain, &name)? else {
                continue;
            };
            let mentions =
                |xml: &str| xml.contains(r.cid) || path.as_deref().is_some_and(|p| xml.contains(p));
            if !(mentions(&config) || live.as_deref().is_some_and(mentions)) {
                continue;
            }
            let disks = DomainDisks::parse(&name, running, live.as_deref(), &config)?;
            if disks.holds(r) {
                holders.push(Holder {
                    domain: name,
                    disks,
                });
            }
        }
        Ok(holders)
    }

    /// Adds a device to the running domain (`live`) and/or its persistent
    /// definition (`config`).
    pub fn attach_disk_device(
        &self,
        domain: &Domain,
        name: &str,
        xml: &str,
        live: bool,
        config: bool,
    ) -> Result<()> {
        let mut flags = 0;
        if live {
            flags |= sys::VIR_DOMAIN_AFFECT_LIVE;
        }
        if config {
            flags |= sys::VIR_DOMAIN_AFFECT_CONFIG;
        }
        let what = match (live, config) {
            (true, true) => "live and persistent",
            (true, false) => "live",
            _ => "persistent",
        };
        domain
            .attach_device_flags(xml, flags)
            .map_err(|e| lv_error(format!("attaching disk to domain {name} ({what})"), e))
    }

    /// Removes a device from the persistent definition. A device already gone
    /// counts as removed.
    pub fn detach_disk_config(&self, domain: &Domain, name: &str, dev: &DiskDevice) -> Result<()> {
        match domain.detach_device_flags(&detach_xml(dev), sys::VIR_DOMAIN_AFFECT_CONFIG) {
            Ok(()) => Ok(()),
            Err(e) => {
                let still_there = self
                    .domain_disks(domain, name)?
                    .is_some_and(|d| d.config.iter().any(|c| c.target == dev.target));
                if still_there {
                    Err(lv_error(
                        format!(
                            "removing disk {} from the persistent definition of domain {name}",
                            dev.target
                        ),
                        e,
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Asks the guest to release a hot-plugged disk and waits until libvirt's
    /// live XML no longer shows it. libvirt itself may return "success" while
    /// the device is still there (the guest has not let go yet), so only the
    /// re-read XML counts.
    pub fn detach_disk_live(
        &self,
        domain: &Domain,
        name: &str,
        dev: &DiskDevice,
        r: &DiskRef,
        timeout: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        let gone = |this: &Self| -> Result<bool> {
            Ok(match this.domain_disks(domain, name)? {
                None => true,
                Some(d) => !d.running || d.live_ref(r).is_none(),
            })
        };
        if let Err(e) = domain.detach_device_flags(&detach_xml(dev), sys::VIR_DOMAIN_AFFECT_LIVE) {
            if gone(self)? {
                return Ok(());
            }
            // A detach requested earlier (a previous attempt) is still pending:
            // keep waiting for it; anything else is a real failure.
            if !e.message().contains("in the process of unplug") {
                return Err(lv_error(
                    format!("detaching disk {} from running domain {name}", dev.target),
                    e,
                ));
            }
        }
        loop {
            if gone(self)? {
                return Ok(());
            }
            if started.elapsed() >= timeout {
                return Err(CpiError::cloud(format!(
                    "disk {} ({}) is still attached to running domain {name} after {} s: \
                     the guest has not released it (is the disk still mounted or the guest hung?); \
                     the detach request stays pending, retry later",
                    r.cid,
                    dev.target,
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}
