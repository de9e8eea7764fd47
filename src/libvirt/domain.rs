//! Domains (VMs): the domain XML the CPI defines, the `bosh` metadata element
//! it keeps in each domain (what later calls need: agent id, stemcell, NICs and
//! their DHCP reservations, BOSH's own metadata; never the agent env, which
//! holds secrets), and define / start / destroy / undefine / reboot.
//!
//! Not-found is a value here; handlers decide which BOSH error it becomes.

use std::os::raw::{c_int, c_void};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use virt::domain::Domain;
use virt::sys;

use super::xmltree::Element;
use super::{is_not_found, lv_error, not_found_as_none, xml_escape, Libvirt};
use crate::error::{CpiError, Result};
use crate::names::{EPHEMERAL_SERIAL, METADATA_NS, METADATA_PREFIX};
use crate::vm_spec::{CpuMode, DiskBus, Firmware, NicSource};

/// Spare PCIe root ports beyond those the domain's own devices take, so
/// persistent disks can be hot-plugged into q35 domains later.
pub const SPARE_ROOT_PORTS: usize = 6;

pub use crate::host::{NicRecord, VmMetadata};

impl VmMetadata {
    /// The element as `virDomainSetMetadata` takes it: no prefixes (libvirt
    /// puts the element and its children into the namespace).
    pub fn inner_xml(&self) -> String {
        self.render("", "")
    }

    /// The element as it appears inside a domain's `<metadata>`, the way
    /// libvirt itself writes it after a `virDomainSetMetadata`.
    pub fn domain_xml(&self) -> String {
        self.render(
            &format!("{METADATA_PREFIX}:"),
            &format!(" xmlns:{METADATA_PREFIX}='{METADATA_NS}'"),
        )
    }

    fn render(&self, p: &str, ns_decl: &str) -> String {
        let e = xml_escape;
        let mut x = format!("<{p}vm{ns_decl}>");
        x.push_str(&format!(
            "<{p}agent_id>{}</{p}agent_id><{p}stemcell>{}</{p}stemcell><{p}created_at>{}</{p}created_at><{p}networks>",
            e(&self.agent_id),
            e(&self.stemcell),
            e(&self.created_at)
        ));
        for n in &self.networks {
            x.push_str(&format!(
                "<{p}network name='{}' type='{}'",
                e(&n.network),
                e(&n.kind)
            ));
            for (k, v) in [
                ("libvirt_network", &n.libvirt_network),
                ("mac", &n.mac),
                ("ip", &n.ip),
                ("dhcp_host", &n.dhcp_host),
            ] {
                if let Some(v) = v {
                    x.push_str(&format!(" {k}='{}'", e(v)));
                }
            }
            x.push_str("/>");
        }
        x.push_str(&format!("</{p}networks><{p}bosh_metadata>"));
        for (k, v) in &self.tags {
            x.push_str(&format!("<{p}tag name='{}'>{}</{p}tag>", e(k), e(v)));
        }
        x.push_str(&format!("</{p}bosh_metadata>"));
        if let Some(c) = &self.creating {
            x.push_str(&format!("<{p}creating>{}</{p}creating>", e(c)));
        }
        x.push_str(&format!("</{p}vm>"));
        x
    }

    pub fn from_element(el: &Element) -> VmMetadata {
        let text = |name: &str| {
            el.child(name)
                .map(|c| c.text_trimmed().to_string())
                .unwrap_or_default()
        };
        let networks = el
            .child("networks")
            .map(|ns| {
                ns.children_named("network")
                    .map(|n| {
                        let a = |k: &str| n.attr(k).map(str::to_string);
                        NicRecord {
                            network: a("name").unwrap_or_default(),
                            kind: a("type").unwrap_or_default(),
                            libvirt_network: a("libvirt_network"),
                            mac: a("mac"),
                            ip: a("ip"),
                            dhcp_host: a("dhcp_host"),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tags = el
            .child("bosh_metadata")
            .map(|m| {
                m.children_named("tag")
                    .map(|t| {
                        (
                            t.attr("name").unwrap_or_default().to_string(),
                            t.text.clone(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        VmMetadata {
            agent_id: text("agent_id"),
            stemcell: text("stemcell"),
            created_at: text("created_at"),
            networks,
            tags,
            creating: el.child("creating").map(|c| c.text_trimmed().to_string()),
        }
    }
}

pub use crate::host::DomainSpec;

pub fn is_q35(machine: &str) -> bool {
    machine == "q35" || machine.starts_with("pc-q35")
}

impl DomainSpec {
    pub fn to_xml(&self) -> String {
        let e = xml_escape;
        let mut x = String::with_capacity(4096);
        x.push_str(&format!(
            "<domain type='{}'>\n  <name>{}</name>\n  <uuid>{}</uuid>\n",
            e(&self.domain_type),
            e(&self.name),
            e(&self.uuid)
        ));
        x.push_str(&format!(
            "  <metadata>\n    {}\n  </metadata>\n",
            self.metadata.domain_xml()
        ));
        x.push_str(&format!(
            "  <memory unit='MiB'>{}</memory>\n  <vcpu>{}</vcpu>\n",
            self.memory_mib, self.cpus
        ));
        x.push_str(&self.os_xml());
        x.push_str(&self.cpu_xml());
        x.push_str("  <features>\n    <acpi/>\n    <apic/>\n  </features>\n");
        x.push_str("  <clock offset='utc'/>\n");
        x.push_str("  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>restart</on_crash>\n");
        x.push_str("  <devices>\n");
        let (root_dev, eph_dev) = match self.disk.bus {
            DiskBus::Virtio => ("vda", "vdb"),
            // sda is the config drive's (SATA) name; libvirt wants names unique.
            DiskBus::Scsi => ("sdb", "sdc"),
        };
        let driver = self.disk.driver_attrs();
        x.push_str(&format!(
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2'{driver}/>\n      <source file='{}'/>\n      <target dev='{root_dev}' bus='{}'/>\n    </disk>\n",
            e(&self.root_disk),
            self.disk.bus.as_str()
        ));
        if let Some(eph) = &self.ephemeral_disk {
            x.push_str(&format!(
                "    <disk type='file' device='disk'>\n      <driver name='qemu' type='raw'{driver}/>\n      <source file='{}'/>\n      <target dev='{eph_dev}' bus='{}'/>\n      <serial>{EPHEMERAL_SERIAL}</serial>\n    </disk>\n",
                e(eph),
                self.disk.bus.as_str()
            ));
        }
        // The config drive is a SATA CD-ROM: the guest sees /dev/sr0 and the
        // virtio letters stay vda (root), vdb (ephemeral), vdc... (persistent).
        x.push_str(&format!(
            "    <disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>\n      <target dev='sda' bus='sata'/>\n      <readonly/>\n    </disk>\n",
            e(&self.config_drive)
        ));
        for (mac, source) in &self.nics {
            let (kind, src) = match source {
                NicSource::Network(n) => (
                    "network",
                    format!(
                        "<source network='{}'/>",
                        e(n.as_deref().unwrap_or_default())
                    ),
                ),
                NicSource::Bridge(b) => ("bridge", format!("<source bridge='{}'/>", e(b))),
                NicSource::Direct { dev, mode } => (
                    "direct",
                    format!("<source dev='{}' mode='{}'/>", e(dev), e(mode)),
                ),
            };
            x.push_str(&format!(
                "    <interface type='{kind}'>\n      <mac address='{}'/>\n      {src}\n      <model type='virtio'/>\n    </interface>\n",
                e(mac)
            ));
        }
        // Every domain has a virtio-scsi controller, so a disk_type with
        // bus scsi can be hot-plugged into any VM.
        x.push_str("    <controller type='scsi' index='0' model='virtio-scsi'/>\n");
        if is_q35(&self.machine) {
            // libvirt puts each PCIe device behind its own root port, taking
            // the ports it is given first, so the spare ones come on top.
            let disks = match self.disk.bus {
                DiskBus::Virtio => 1 + usize::from(self.ephemeral_disk.is_some()),
                DiskBus::Scsi => 0,
            };
            let graphics = usize::from(self.graphics.is_some());
            let used =
                disks + self.nics.len() + 1 + usize::from(self.memory_balloon) + 1 + graphics;
            x.push_str("    <controller type='pci' index='0' model='pcie-root'/>\n");
            for _ in 0..used + SPARE_ROOT_PORTS {
                x.push_str("    <controller type='pci' model='pcie-root-port'/>\n");
            }
        }
        x.push_str("    <controller type='usb' model='none'/>\n");
        x.push_str(&format!(
            "    <serial type='pty'>\n      <log file='{}' append='off'/>\n      <target port='0'/>\n    </serial>\n",
            e(&self.console_log)
        ));
        x.push_str(
            "    <console type='pty'>\n      <target type='serial' port='0'/>\n    </console>\n",
        );
        if let Some((kind, password)) = &self.graphics {
            // Never on 0.0.0.0: the host's localhost only (an SSH tunnel
            // reaches it), and with a password.
            x.push_str(&format!(
                "    <graphics type='{}' autoport='yes' passwd='{}'>\n      <listen type='address' address='127.0.0.1'/>\n    </graphics>\n    <video>\n      <model type='virtio'/>\n    </video>\n",
                kind.as_str(),
                e(password)
            ));
        }
        if self.memory_balloon {
            x.push_str("    <memballoon model='virtio'/>\n");
        } else {
            x.push_str("    <memballoon model='none'/>\n");
        }
        x.push_str("    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>\n");
        x.push_str("  </devices>\n</domain>\n");
        x
    }

    fn os_xml(&self) -> String {
        let machine = xml_escape(&self.machine);
        match self.firmware {
            Firmware::Bios => format!(
                "  <os>\n    <type arch='x86_64' machine='{machine}'>hvm</type>\n    <boot dev='hd'/>\n  </os>\n"
            ),
            // libvirt picks an OVMF build from QEMU's firmware descriptors;
            // stemcells are not signed for secure boot, so not that one.
            Firmware::Uefi => format!(
                "  <os firmware='efi'>\n    <type arch='x86_64' machine='{machine}'>hvm</type>\n    <firmware>\n      <feature enabled='no' name='secure-boot'/>\n    </firmware>\n    <boot dev='hd'/>\n  </os>\n"
            ),
        }
    }

    fn cpu_xml(&self) -> String {
        let topology = self
            .cpu_topology
            .map(|t| {
                format!(
                    "    <topology sockets='{}' dies='1' cores='{}' threads='{}'/>\n",
                    t.sockets, t.cores, t.threads
                )
            })
            .unwrap_or_default();
        match &self.cpu_mode {
            CpuMode::Default if topology.is_empty() => String::new(),
            CpuMode::Default => format!("  <cpu>\n{topology}  </cpu>\n"),
            CpuMode::HostPassthrough => {
                format!("  <cpu mode='host-passthrough' check='none'>\n{topology}  </cpu>\n")
            }
            CpuMode::HostModel => format!("  <cpu mode='host-model'>\n{topology}  </cpu>\n"),
            CpuMode::Custom(model) => format!(
                "  <cpu mode='custom' match='exact'>\n    <model fallback='forbid'>{}</model>\n{topology}  </cpu>\n",
                xml_escape(model)
            ),
        }
    }
}

pub use crate::host::DomainFacts;

impl DomainFacts {
    pub fn from_xml(xml: &str) -> std::result::Result<DomainFacts, String> {
        let root = Element::parse(xml)?;
        let interfaces = root
            .child("devices")
            .map(|d| {
                d.children_named("interface")
                    .filter_map(|i| {
                        let mac = i.child("mac")?.attr("address")?.to_ascii_lowercase();
                        let net = i
                            .child("source")
                            .and_then(|s| s.attr("network"))
                            .unwrap_or_default()
                            .to_string();
                        Some((mac, net))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let metadata = root.child("metadata").and_then(|m| {
            m.children
                .iter()
                .find(|c| c.local_name() == "vm" && c.in_namespace(METADATA_NS))
                .map(VmMetadata::from_element)
        });
        let title = root.child("title").map(|t| t.text.clone());
        Ok(DomainFacts {
            interfaces,
            metadata,
            title,
        })
    }
}

pub use crate::host::RebootOutcome;

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

    /// Defined domains that are not running, with their names (one call,
    /// filtered by libvirt: on a BOSH host these are few).
    pub fn inactive_domains(&self) -> Result<Vec<(String, Domain)>> {
        let doms = self
            .conn()
            .list_all_domains(sys::VIR_CONNECT_LIST_DOMAINS_INACTIVE)
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

    /// Asks the guest to reboot (ACPI), waits up to `grace` for it to do so,
    /// then resets the domain the hard way. A shut-off domain is started.
    /// When events cannot be registered the guest still gets the whole
    /// `grace` (a reboot is then invisible; only a stop ends the wait early).
    pub fn reboot_domain(
        &self,
        dom: &Domain,
        name: &str,
        grace: Duration,
    ) -> Result<RebootOutcome> {
        let active = dom
            .is_active()
            .map_err(|e| lv_error(format!("checking domain {name}"), e))?;
        if !active {
            self.start_domain(dom, name)?;
            return Ok(RebootOutcome::Started);
        }
        let watch = EventWatch::register(self, dom);
        let asked = dom.reboot(sys::VIR_DOMAIN_REBOOT_ACPI_POWER_BTN);
        let seen = match (wait_plan(watch.is_some(), asked.is_ok()), &watch) {
            (Wait::Events, Some(w)) => w.wait(grace),
            (Wait::PollState, _) => wait_until_stopped(dom, grace),
            _ => Seen::Nothing,
        };
        drop(watch);
        match seen {
            Seen::Reboot => Ok(RebootOutcome::Graceful),
            Seen::Stopped | Seen::Nothing
                if !dom
                    .is_active()
                    .map_err(|e| lv_error(format!("checking domain {name}"), e))? =>
            {
                self.start_domain(dom, name)?;
                Ok(RebootOutcome::Started)
            }
            _ => {
                dom.reset()
                    .map_err(|e| lv_error(format!("resetting domain {name}"), e))?;
                Ok(RebootOutcome::HardReset)
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Nothing,
    Reboot,
    Stopped,
}

type Signal = Arc<(Mutex<Seen>, Condvar)>;

/// How a reboot waits for the guest after the ACPI request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// For the reboot or stop event, up to the grace period.
    Events,
    /// No events (registration failed) but the request went out: the guest
    /// still gets the whole grace period; only a stop is visible by polling.
    PollState,
    /// The request was refused: nothing will happen, reset at once.
    Nothing,
}

fn wait_plan(watching: bool, asked: bool) -> Wait {
    match (watching, asked) {
        (_, false) => Wait::Nothing,
        (true, true) => Wait::Events,
        (false, true) => Wait::PollState,
    }
}

/// How often the domain state is polled when events are not available.
const STATE_POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Polls the domain's state for `grace`: `Stopped` once it is shut off,
/// `Nothing` when the grace period ends (or the state cannot be read; the
/// caller reads it again and reports that).
fn wait_until_stopped(dom: &Domain, grace: Duration) -> Seen {
    let deadline = Instant::now() + grace;
    loop {
        match dom.is_active() {
            Ok(false) => return Seen::Stopped,
            Ok(true) => {}
            Err(_) => return Seen::Nothing,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Seen::Nothing;
        }
        std::thread::sleep(left.min(STATE_POLL_INTERVAL));
    }
}

/// Reboot and lifecycle event callbacks for one domain, delivered by the
/// event loop thread started in `Libvirt::open`; deregistered on drop.
struct EventWatch {
    conn: sys::virConnectPtr,
    ids: Vec<c_int>,
    signal: Signal,
}

unsafe extern "C" fn on_reboot(_c: sys::virConnectPtr, _d: sys::virDomainPtr, opaque: *mut c_void) {
    // SAFETY: opaque is the Box<Signal> registered below, alive until freed by free_signal.
    let signal = unsafe { &*(opaque as *const Signal) };
    notify(signal, Seen::Reboot);
}

unsafe extern "C" fn on_lifecycle(
    _c: sys::virConnectPtr,
    _d: sys::virDomainPtr,
    event: c_int,
    _detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    // SAFETY: as in on_reboot.
    let signal = unsafe { &*(opaque as *const Signal) };
    if event == sys::VIR_DOMAIN_EVENT_STOPPED as c_int {
        notify(signal, Seen::Stopped);
    }
    0
}

unsafe extern "C" fn free_signal(opaque: *mut c_void) {
    // SAFETY: created by Box::into_raw in EventWatch::register, freed once by libvirt.
    drop(unsafe { Box::from_raw(opaque as *mut Signal) });
}

fn notify(signal: &Signal, seen: Seen) {
    if let Ok(mut s) = signal.0.lock() {
        if *s == Seen::Nothing {
            *s = seen;
        }
        signal.1.notify_all();
    }
}

impl EventWatch {
    fn register(lv: &Libvirt, dom: &Domain) -> Option<EventWatch> {
        let signal: Signal = Arc::new((Mutex::new(Seen::Nothing), Condvar::new()));
        // SAFETY: the pointers come from live virt objects; the callbacks have
        // the signatures libvirt calls them with (the lifecycle one is cast to
        // the generic type, as libvirt's VIR_DOMAIN_EVENT_CALLBACK does).
        let conn = unsafe { lv.conn().as_ptr() };
        let dom_ptr = unsafe { dom.as_ptr() };
        let mut ids = Vec::new();
        type Lifecycle = unsafe extern "C" fn(
            sys::virConnectPtr,
            sys::virDomainPtr,
            c_int,
            c_int,
            *mut c_void,
        ) -> c_int;
        type Generic = unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void);
        let lifecycle: Lifecycle = on_lifecycle;
        // SAFETY: libvirt calls the callback with the lifecycle signature; the
        // generic type is only how the registration function is declared.
        let lifecycle = unsafe { std::mem::transmute::<Lifecycle, Generic>(lifecycle) };
        let callbacks: [(c_int, sys::virConnectDomainEventGenericCallback); 2] = [
            (sys::VIR_DOMAIN_EVENT_ID_REBOOT as c_int, Some(on_reboot)),
            (sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE as c_int, Some(lifecycle)),
        ];
        for (event, cb) in callbacks {
            let opaque = Box::into_raw(Box::new(signal.clone())) as *mut c_void;
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn,
                    dom_ptr,
                    event,
                    cb,
                    opaque,
                    Some(free_signal),
                )
            };
            if id < 0 {
                // SAFETY: libvirt did not take the opaque pointer.
                unsafe { free_signal(opaque) };
                let watch = EventWatch { conn, ids, signal };
                drop(watch);
                return None;
            }
            ids.push(id);
        }
        Some(EventWatch { conn, ids, signal })
    }

    fn wait(&self, grace: Duration) -> Seen {
        let deadline = Instant::now() + grace;
        let Ok(mut seen) = self.signal.0.lock() else {
            return Seen::Nothing;
        };
        while *seen == Seen::Nothing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match self.signal.1.wait_timeout(seen, left) {
                Ok((s, _)) => seen = s,
                Err(_) => return Seen::Nothing,
            }
        }
        *seen
    }
}

impl Drop for EventWatch {
    fn drop(&mut self) {
        for id in &self.ids {
            // SAFETY: ids were returned by virConnectDomainEventRegisterAny on this connection.
            unsafe {
                sys::virConnectDomainEventDeregisterAny(self.conn, *id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm_spec::{CpuTopology, DiskOptions, Graphics};

    #[test]
    fn reboot_waits_the_grace_period_even_without_events() {
        assert_eq!(wait_plan(true, true), Wait::Events);
        assert_eq!(wait_plan(false, true), Wait::PollState);
        assert_eq!(wait_plan(true, false), Wait::Nothing);
        assert_eq!(wait_plan(false, false), Wait::Nothing);
    }

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
    fn metadata_as_libvirt_returns_it() {
        // virDomainGetMetadata / dumpxml give the element back like this.
        let xml = "<domain><metadata><other:vm xmlns:other='urn:else'><agent_id>x</agent_id></other:vm>\
            <bosh:vm xmlns:bosh=\"urn:bosh-libvirt-cpi:vm:1\">\n  <agent_id>a1</agent_id>\n  <stemcell>sc-2</stemcell>\n\
            <networks><network name='n' type='dynamic' libvirt_network='l' mac='m'/></networks>\
            <bosh_metadata><tag name='name'>j/0</tag></bosh_metadata></bosh:vm></metadata><title>t</title></domain>";
        let f = DomainFacts::from_xml(xml).unwrap();
        let md = f.metadata.unwrap();
        assert_eq!(md.agent_id, "a1");
        assert_eq!(md.networks[0].mac.as_deref(), Some("m"));
        assert_eq!(md.networks[0].ip, None);
        assert_eq!(md.tags, vec![("name".to_string(), "j/0".to_string())]);
        assert_eq!(f.title.as_deref(), Some("t"));
        assert!(md.inner_xml().starts_with("<vm><agent_id>a1</agent_id>"));
    }
}
