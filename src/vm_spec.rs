//! What `create_vm` is asked for, validated before anything is created: the
//! VM's cloud_properties (this CPI's schema) here, the BOSH networks in
//! `networks`. Pure
//! logic; the handler turns errors into `VMCreationFailed`. Every error names
//! the property and the values it accepts.
//!
//! cloud_properties accepted (sizes in MiB; docs/operator-guide.md has the table):
//! `cpu`; `memory` (or `ram`); `ephemeral_disk` (integer, or `{"size": N}`;
//! 0 or absent: no ephemeral disk); `root_disk_size` (or `root_disk:
//! {"size": N}`; default: the stemcell's size); `domain_type` (`kvm`/`qemu`)
//! and `machine` override the config; `cpu_mode` (`host-passthrough`,
//! `host-model`, `custom` with `cpu_model`), `cpu_topology` (`{sockets,
//! cores, threads}`, multiplying to `cpu`), `memory_balloon` (bool);
//! `disk_bus`, `disk_cache`, `disk_io`, `disk_discard` for the root and
//! ephemeral disks (the same options as a disk_type's `bus`, `cache`, `io`,
//! `discard`); `firmware` (`bios`/`uefi`); `graphics` (`none`/`vnc`/`spice`).
//! Other keys are named in a warning (cloud-configs are shared by CPIs).

use serde_json::{json, Map, Value};

mod networks;

pub use self::networks::{parse_networks, NetKind, NetworkRequest, NicSource, DIRECT_MODES};

pub const DEFAULT_CPU: u64 = 1;
pub const DEFAULT_MEMORY_MIB: u64 = 1024;

/// How the guest CPU is modelled (libvirt `<cpu mode=...>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CpuMode {
    /// No `mode`: the hypervisor's default model.
    Default,
    HostPassthrough,
    HostModel,
    /// A named model, e.g. `Skylake-Server` or `qemu64`.
    Custom(String),
}

impl CpuMode {
    /// Modes that need the host CPU exposed through KVM: under TCG
    /// (`type='qemu'`) there is no host CPU to pass through.
    pub fn kvm_only(&self) -> bool {
        matches!(self, CpuMode::HostPassthrough | CpuMode::HostModel)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTopology {
    pub sockets: u64,
    pub cores: u64,
    pub threads: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiskBus {
    #[default]
    Virtio,
    /// A disk on a virtio-scsi controller.
    Scsi,
}

impl DiskBus {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskBus::Virtio => "virtio",
            DiskBus::Scsi => "scsi",
        }
    }
}

/// How a disk is presented and cached: the root and ephemeral disks of a
/// vm_type, or a persistent disk of a disk_type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskOptions {
    pub bus: DiskBus,
    /// libvirt `cache=`; None: the hypervisor's default.
    pub cache: Option<String>,
    /// libvirt `io=`; None: the hypervisor's default.
    pub io: Option<String>,
    /// `unmap` (the default: trims reach the thin image) or `ignore`.
    pub discard: String,
}

impl Default for DiskOptions {
    fn default() -> Self {
        DiskOptions {
            bus: DiskBus::Virtio,
            cache: None,
            io: None,
            discard: "unmap".into(),
        }
    }
}

pub const CACHE_MODES: &[&str] = &[
    "none",
    "writethrough",
    "writeback",
    "directsync",
    "unsafe",
    "default",
];
pub const IO_MODES: &[&str] = &["native", "threads", "io_uring"];
pub const DISCARD_MODES: &[&str] = &["unmap", "ignore"];
pub const BUSES: &[&str] = &["virtio", "scsi"];

impl DiskOptions {
    /// Reads `<prefix>bus`, `<prefix>cache`, `<prefix>io`, `<prefix>discard`.
    pub fn parse(cp: &Map<String, Value>, prefix: &str) -> Result<DiskOptions, String> {
        let key = |k: &str| format!("{prefix}{k}");
        let bus = match one_of(cp, &key("bus"), BUSES)?.as_deref() {
            Some("scsi") => DiskBus::Scsi,
            _ => DiskBus::Virtio,
        };
        let cache = one_of(cp, &key("cache"), CACHE_MODES)?;
        let io = one_of(cp, &key("io"), IO_MODES)?;
        // QEMU refuses native AIO on a page-cached file.
        if io.as_deref() == Some("native")
            && !matches!(cache.as_deref(), Some("none") | Some("directsync"))
        {
            return Err(format!(
                "cloud_properties.{} \"native\" needs cloud_properties.{} \"none\" or \"directsync\" (native AIO bypasses the host's page cache)",
                key("io"),
                key("cache")
            ));
        }
        let discard = one_of(cp, &key("discard"), DISCARD_MODES)?.unwrap_or_else(|| "unmap".into());
        Ok(DiskOptions {
            bus,
            cache,
            io,
            discard,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Firmware {
    #[default]
    Bios,
    /// OVMF, chosen by libvirt's firmware auto-selection.
    Uefi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Graphics {
    #[default]
    None,
    Vnc,
    Spice,
}

impl Graphics {
    pub fn as_str(self) -> &'static str {
        match self {
            Graphics::None => "none",
            Graphics::Vnc => "vnc",
            Graphics::Spice => "spice",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmProperties {
    pub cpu: u64,
    pub memory_mib: u64,
    /// 0: no ephemeral disk.
    pub ephemeral_disk_mib: u64,
    pub root_disk_mib: Option<u64>,
    pub domain_type: Option<String>,
    pub machine: Option<String>,
    pub cpu_mode: CpuMode,
    pub cpu_topology: Option<CpuTopology>,
    pub memory_balloon: bool,
    /// The root and ephemeral disks.
    pub disk: DiskOptions,
    pub firmware: Firmware,
    pub graphics: Graphics,
    /// Keys present but not understood, for the warning.
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
    "cpu_mode",
    "cpu_model",
    "cpu_topology",
    "memory_balloon",
    "disk_bus",
    "disk_cache",
    "disk_io",
    "disk_discard",
    "firmware",
    "graphics",
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

/// The value of `key` when it is one of `allowed` (None when absent or null).
pub fn one_of(
    cp: &Map<String, Value>,
    key: &str,
    allowed: &[&str],
) -> Result<Option<String>, String> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allowed.contains(&s.as_str()) => Ok(Some(s.clone())),
        Some(other) => Err(format!(
            "cloud_properties.{key} must be one of {}; got {other}",
            allowed.join(", ")
        )),
    }
}

fn boolean(cp: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match cp.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(other) => Err(format!(
            "cloud_properties.{key} must be true or false, got {other}"
        )),
    }
}

/// A name that goes into XML and names a host object: letters, digits, `._-`.
fn plain_name(value: &Value, key: &str, max: usize) -> Result<String, String> {
    match value {
        Value::String(s)
            if !s.is_empty()
                && s.len() <= max
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) =>
        {
            Ok(s.clone())
        }
        other => Err(format!(
            "{key} must be a name of at most {max} letters, digits, '.', '_' or '-', got {other}"
        )),
    }
}

fn cpu_mode(cp: &Map<String, Value>) -> Result<CpuMode, String> {
    let model = match cp.get("cpu_model") {
        None | Some(Value::Null) => None,
        Some(v) => Some(plain_name(v, "cloud_properties.cpu_model", 64)?),
    };
    let mode = one_of(
        cp,
        "cpu_mode",
        &["host-passthrough", "host-model", "custom", "default"],
    )?;
    match (mode.as_deref(), model) {
        (Some("custom") | None, Some(m)) => Ok(CpuMode::Custom(m)),
        (Some("custom"), None) => {
            Err("cloud_properties.cpu_mode \"custom\" needs cloud_properties.cpu_model (e.g. \"qemu64\", \"Skylake-Server\")".into())
        }
        (Some(other), Some(_)) => Err(format!(
            "cloud_properties.cpu_model is only used with cpu_mode \"custom\", not \"{other}\""
        )),
        (Some("host-passthrough"), None) => Ok(CpuMode::HostPassthrough),
        (Some("host-model"), None) => Ok(CpuMode::HostModel),
        _ => Ok(CpuMode::Default),
    }
}

fn cpu_topology(cp: &Map<String, Value>, cpu: u64) -> Result<Option<CpuTopology>, String> {
    let t = match cp.get("cpu_topology") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(t)) => t,
        Some(other) => {
            return Err(format!(
                "cloud_properties.cpu_topology must be {{\"sockets\": N, \"cores\": N, \"threads\": N}}, got {other}"
            ))
        }
    };
    if let Some(k) = t
        .keys()
        .find(|k| !["sockets", "cores", "threads"].contains(&k.as_str()))
    {
        return Err(format!(
            "cloud_properties.cpu_topology.{k} is not one of sockets, cores, threads"
        ));
    }
    let get = |k: &str| {
        t.get(k)
            .map(|v| integer(v, &format!("cpu_topology.{k}"), 1))
            .transpose()
            .map(|v| v.unwrap_or(1))
    };
    let topo = CpuTopology {
        sockets: get("sockets")?,
        cores: get("cores")?,
        threads: get("threads")?,
    };
    let product = topo
        .sockets
        .checked_mul(topo.cores)
        .and_then(|n| n.checked_mul(topo.threads));
    if product != Some(cpu) {
        return Err(format!(
            "cloud_properties.cpu_topology: sockets {} x cores {} x threads {} must equal cpu ({cpu})",
            topo.sockets, topo.cores, topo.threads
        ));
    }
    Ok(Some(topo))
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
        let domain_type = one_of(cp, "domain_type", &["kvm", "qemu"])?;
        let machine = match cp.get("machine") {
            None => None,
            Some(Value::String(m)) if valid_machine(m) => Some(m.clone()),
            Some(other) => {
                return Err(format!(
                    "cloud_properties.machine must be a QEMU machine type like \"q35\", got {other}"
                ))
            }
        };
        let firmware = match one_of(cp, "firmware", &["bios", "uefi"])?.as_deref() {
            Some("uefi") => Firmware::Uefi,
            _ => Firmware::Bios,
        };
        let graphics = match one_of(cp, "graphics", &["none", "vnc", "spice"])?.as_deref() {
            Some("vnc") => Graphics::Vnc,
            Some("spice") => Graphics::Spice,
            _ => Graphics::None,
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
            cpu_mode: cpu_mode(cp)?,
            cpu_topology: cpu_topology(cp, cpu)?,
            memory_balloon: boolean(cp, "memory_balloon")?.unwrap_or(true),
            disk: DiskOptions::parse(cp, "disk_")?,
            firmware,
            graphics,
            ignored,
        })
    }

    /// What the chosen domain type cannot do (the domain type may come from
    /// the config, so this is checked once it is known).
    pub fn check_domain_type(&self, domain_type: &str) -> Result<(), String> {
        if domain_type == "qemu" && self.cpu_mode.kvm_only() {
            let mode = match self.cpu_mode {
                CpuMode::HostPassthrough => "host-passthrough",
                _ => "host-model",
            };
            return Err(format!(
                "cloud_properties.cpu_mode \"{mode}\" needs domain_type \"kvm\" (this VM would be \"qemu\", emulated: there is no host CPU to expose); use cpu_mode \"custom\" with a cpu_model, or domain_type \"kvm\""
            ));
        }
        Ok(())
    }
}

fn valid_machine(m: &str) -> bool {
    !m.is_empty()
        && m.len() <= 64
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `calculate_vm_cloud_properties`: the director's desired size as this
/// CPI's cloud_properties. The director caches the answer per vm_resources
/// (cloudfoundry/bosh src/bosh-director/lib/bosh/director/deployment_plan/
/// vm_resources_cache.rb) and uses it in place of a vm_type's, merged
/// SHALLOWLY under the AZ's and over by each vm_extension's
/// (deployment_plan/merged_cloud_properties.rb, Hash#merge): so the answer
/// holds the sizing keys only, and every other property (cpu_mode,
/// disk_bus, firmware...) comes from vm_extensions unchanged.
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
    fn shapes_parse() {
        let p = props(
            json!({"cpu": 4, "cpu_mode": "custom", "cpu_model": "qemu64",
            "cpu_topology": {"sockets": 2, "cores": 2}, "memory_balloon": false,
            "disk_bus": "scsi", "disk_cache": "none", "disk_io": "native", "disk_discard": "ignore",
            "firmware": "uefi", "graphics": "vnc"}),
        )
        .unwrap();
        assert_eq!(p.cpu_mode, CpuMode::Custom("qemu64".into()));
        assert_eq!(
            p.cpu_topology,
            Some(CpuTopology {
                sockets: 2,
                cores: 2,
                threads: 1
            })
        );
        assert!(!p.memory_balloon);
        assert_eq!(p.disk.bus, DiskBus::Scsi);
        assert_eq!(
            (p.disk.cache.as_deref(), p.disk.io.as_deref()),
            (Some("none"), Some("native"))
        );
        assert_eq!(p.disk.discard, "ignore");
        assert_eq!((p.firmware, p.graphics), (Firmware::Uefi, Graphics::Vnc));
        assert!(p.ignored.is_empty());
        let d = props(json!({})).unwrap();
        assert_eq!(d.cpu_mode, CpuMode::Default);
        assert!(d.memory_balloon);
        assert_eq!(d.disk, DiskOptions::default());
        assert_eq!((d.firmware, d.graphics), (Firmware::Bios, Graphics::None));
    }

    #[test]
    fn kvm_only_cpu_modes_are_refused_under_qemu() {
        for mode in ["host-passthrough", "host-model"] {
            let p = props(json!({"cpu_mode": mode})).unwrap();
            let e = p.check_domain_type("qemu").unwrap_err();
            assert!(
                e.contains("cloud_properties.cpu_mode") && e.contains(mode),
                "{e}"
            );
            assert!(e.contains("\"kvm\""), "{e}");
            p.check_domain_type("kvm").unwrap();
        }
        props(json!({"cpu_mode": "custom", "cpu_model": "qemu64"}))
            .unwrap()
            .check_domain_type("qemu")
            .unwrap();
    }

    #[test]
    fn bad_shapes_are_named_with_accepted_values() {
        for (v, needle) in [
            (
                json!({"cpu_mode": "fast"}),
                "cpu_mode must be one of host-passthrough, host-model, custom, default",
            ),
            (
                json!({"cpu_mode": "custom"}),
                "needs cloud_properties.cpu_model",
            ),
            (
                json!({"cpu_mode": "host-model", "cpu_model": "x"}),
                "only used with cpu_mode \"custom\"",
            ),
            (
                json!({"cpu_model": "a'b"}),
                "cloud_properties.cpu_model must be a name",
            ),
            (
                json!({"cpu": 4, "cpu_topology": {"sockets": 3}}),
                "must equal cpu (4)",
            ),
            (
                json!({"cpu_topology": {"dies": 1}}),
                "cpu_topology.dies is not one of sockets, cores, threads",
            ),
            (
                json!({"cpu_topology": 2}),
                "cloud_properties.cpu_topology must be",
            ),
            (
                json!({"cpu_topology": {"cores": 0}}),
                "cpu_topology.cores must be an integer >= 1",
            ),
            (
                json!({"memory_balloon": "yes"}),
                "memory_balloon must be true or false",
            ),
            (
                json!({"disk_bus": "ide"}),
                "disk_bus must be one of virtio, scsi",
            ),
            (
                json!({"disk_cache": "fast"}),
                "disk_cache must be one of none, writethrough",
            ),
            (
                json!({"disk_io": "aio"}),
                "disk_io must be one of native, threads, io_uring",
            ),
            (
                json!({"disk_io": "native"}),
                "needs cloud_properties.disk_cache \"none\"",
            ),
            (
                json!({"disk_discard": "on"}),
                "disk_discard must be one of unmap, ignore",
            ),
            (
                json!({"firmware": "efi"}),
                "firmware must be one of bios, uefi",
            ),
            (
                json!({"graphics": "rdp"}),
                "graphics must be one of none, vnc, spice",
            ),
        ] {
            let e = props(v.clone()).unwrap_err();
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
