//! Domains (VMs): define / start / destroy / undefine, the persistent
//! definition read back, the `bosh` metadata element and the title set live
//! and in the persistent definition. The domain XML is `spec`'s, the metadata
//! element `metadata`'s, rebooting `reboot`'s, a paused start `start`'s.
//!
//! Not-found is a value here; handlers decide which BOSH error it becomes.

mod metadata;
mod reboot;
mod spec;
mod start;

use virt::domain::Domain;
use virt::sys;

pub use self::metadata::{DomainFacts, NicRecord, VmMetadata};
pub use self::reboot::RebootOutcome;
pub use self::spec::{is_q35, DomainSpec, SPARE_ROOT_PORTS};
use super::{is_not_found, lv_error, not_found_as_none, Libvirt};
use crate::error::{CpiError, Result};
use crate::names::{METADATA_NS, METADATA_PREFIX};

impl Libvirt {
    pub fn find_domain(&self, name: &str) -> Result<Option<Domain>> {
        not_found_as_none(
            self.conn().lookup_domain_by_name(name),
            format!("looking up domain {name}"),
        )
    }

    /// The names of all defined domains, running or not (one call).
    pub fn domain_names(&self) -> Result<Vec<String>> {
        let doms = self
            .conn()
            .list_all_domains(0)
            .map_err(|e| lv_error("listing domains", e))?;
        Ok(doms.into_iter().filter_map(|d| d.name().ok()).collect())
    }

    /// Domains whose guest does not run: shut off (defined, not running) or
    /// paused, with their names (one call, filtered by libvirt: on a BOSH
    /// host these are few).
    pub fn domains_not_running(&self) -> Result<Vec<(String, Domain)>> {
        let doms = self
            .conn()
            .list_all_domains(
                sys::VIR_CONNECT_LIST_DOMAINS_SHUTOFF | sys::VIR_CONNECT_LIST_DOMAINS_PAUSED,
            )
            .map_err(|e| lv_error("listing domains that are not running", e))?;
        Ok(doms
            .into_iter()
            .filter_map(|d| Some((d.name().ok()?, d)))
            .collect())
    }

    pub fn define_domain(&self, spec: &DomainSpec) -> Result<Domain> {
        self.conn()
            .define_domain_xml(&spec.to_xml())
            .map_err(|e| lv_error(format!("defining domain {}", spec.name), e))
    }

    pub fn start_domain(&self, dom: &Domain, name: &str) -> Result<()> {
        dom.create()
            .map(|_| ())
            .map_err(|e| lv_error(format!("starting domain {name}"), e))
    }

    /// Hard power-off. Ok when the domain is (now) not running or gone.
    pub fn destroy_domain(&self, dom: &Domain, name: &str) -> Result<()> {
        match dom.destroy() {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => match dom.is_active() {
                Ok(false) => Ok(()),
                Err(e2) if is_not_found(&e2) => Ok(()),
                _ => Err(lv_error(format!("destroying domain {name}"), e)),
            },
        }
    }

    /// Removes the definition and libvirt's state kept with it (managed save,
    /// snapshot and checkpoint metadata, NVRAM). Ok when already gone.
    pub fn undefine_domain(&self, dom: &Domain, name: &str) -> Result<()> {
        let flags = sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | sys::VIR_DOMAIN_UNDEFINE_NVRAM
            | sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA;
        match dom.undefine_flags(flags) {
            Ok(()) => Ok(()),
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(lv_error(format!("undefining domain {name}"), e)),
        }
    }

    /// The domain's persistent definition, parsed.
    pub fn domain_facts(&self, dom: &Domain, name: &str) -> Result<DomainFacts> {
        let xml = dom
            .xml_desc(sys::VIR_DOMAIN_XML_INACTIVE)
            .map_err(|e| lv_error(format!("reading domain {name}"), e))?;
        DomainFacts::from_xml(&xml)
            .map_err(|e| CpiError::cloud(format!("parsing domain {name}: {e}")))
    }

    /// Replaces the `bosh` metadata element, live and in the persistent definition.
    pub fn set_vm_metadata(&self, dom: &Domain, name: &str, md: &VmMetadata) -> Result<()> {
        let xml = md.inner_xml();
        self.with_affect_flags(dom, |flags| {
            dom.set_metadata(
                sys::VIR_DOMAIN_METADATA_ELEMENT as i32,
                Some(&xml),
                Some(METADATA_PREFIX),
                Some(METADATA_NS),
                flags,
            )
        })
        .map_err(|e| lv_error(format!("setting metadata of domain {name}"), e))
    }

    pub fn set_title(&self, dom: &Domain, name: &str, title: &str) -> Result<()> {
        self.with_affect_flags(dom, |flags| {
            dom.set_metadata(
                sys::VIR_DOMAIN_METADATA_TITLE as i32,
                Some(title),
                None,
                None,
                flags,
            )
        })
        .map_err(|e| lv_error(format!("setting the title of domain {name}"), e))
    }

    /// Runs `f` with CONFIG, plus LIVE while the domain runs; once more if the
    /// domain started or stopped in between.
    fn with_affect_flags<F>(
        &self,
        dom: &Domain,
        f: F,
    ) -> std::result::Result<(), virt::error::Error>
    where
        F: Fn(u32) -> std::result::Result<(), virt::error::Error>,
    {
        let flags = |active: bool| {
            sys::VIR_DOMAIN_AFFECT_CONFIG
                | if active {
                    sys::VIR_DOMAIN_AFFECT_LIVE
                } else {
                    0
                }
        };
        let active = dom.is_active()?;
        match f(flags(active)) {
            Ok(()) => Ok(()),
            Err(e) => match dom.is_active() {
                Ok(now) if now != active => f(flags(now)),
                _ => Err(e),
            },
        }
    }
}
