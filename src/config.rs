//! The CPI's configuration: `cpi.json` (rendered by the BOSH job), overlaid by
//! the request context's top-level keys of the same names (a director
//! cpi-config merges its properties there).
//!
//! The schema lives in `spec/cpi.schema.json`; a test keeps the two in step.
//! Unknown keys are errors, so a typo never silently falls back to a default.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{CpiError, Result};
use crate::uri::LibvirtUri;

pub const DEFAULT_STEMCELL_FORMATS: [&str; 2] = ["openstack-qcow2", "openstack-raw"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub libvirt: LibvirtConfig,
    pub pool: PoolConfig,
    pub network: NetworkConfig,
    pub agent: AgentConfig,
    #[serde(default = "default_stemcell_formats")]
    pub stemcell_formats: Vec<String>,
    /// Where libvirt's host writes each VM's serial console log.
    #[serde(default = "default_console_log_dir")]
    pub console_log_dir: String,
    #[serde(default)]
    pub log_level: LogLevel,
    /// How long `reboot_vm` waits for the guest to react to the ACPI reboot
    /// request before it resets the VM the hard way.
    #[serde(default = "default_reboot_grace_seconds")]
    pub reboot_grace_seconds: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LibvirtConfig {
    /// Any URI libvirt accepts, e.g. `qemu+tls://host/system?pkipath=/dir`.
    pub uri: String,
    #[serde(default)]
    pub domain_type: DomainType,
    #[serde(default = "default_machine")]
    pub machine: String,
    /// Turns off TLS certificate verification (adds `no_verify=1`). Never the default.
    #[serde(default)]
    pub insecure_skip_tls_verify: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DomainType {
    #[default]
    Kvm,
    Qemu,
}

impl DomainType {
    pub fn as_str(self) -> &'static str {
        match self {
            DomainType::Kvm => "kvm",
            DomainType::Qemu => "qemu",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    pub name: String,
    /// Directory of the `dir` pool; required when the CPI may create the pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Whether the CPI defines, builds and starts the pool when it is missing.
    #[serde(default)]
    pub create: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkConfig {
    /// The libvirt network VMs attach to unless a network's cloud_properties name another.
    pub name: String,
    /// IPv4 CIDR of the NAT network; when given, the CPI creates the network if missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub mbus: String,
    #[serde(default)]
    pub ntp: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blobstore: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    Debug,
    #[default]
    Info,
    Warn,
    Error,
}

fn default_stemcell_formats() -> Vec<String> {
    DEFAULT_STEMCELL_FORMATS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

fn default_console_log_dir() -> String {
    "/var/log/libvirt/qemu".to_string()
}

fn default_reboot_grace_seconds() -> u64 {
    60
}

fn default_machine() -> String {
    "q35".to_string()
}

impl Config {
    /// Reads `path`, overlays the context's matching keys, validates.
    pub fn load(path: Option<&Path>, context: &Map<String, Value>) -> Result<Config> {
        let path = path.ok_or_else(|| {
            CpiError::cloud("no config file: the CPI is run as `cpi <path to cpi.json>`")
        })?;
        let bytes = std::fs::read(path)
            .map_err(|e| CpiError::cloud(format!("reading config file {}: {e}", path.display())))?;
        let file: Value = serde_json::from_slice(&bytes).map_err(|e| {
            CpiError::cloud(format!(
                "config file {} is not valid JSON: {e}",
                path.display()
            ))
        })?;
        let mut config = Self::from_value(file, context)
            .map_err(|e| e.context(format!("config file {}", path.display())))?;
        if let Some(dir) = path.parent() {
            config.libvirt.uri = absolutize_uri_paths(&config.libvirt.uri, dir);
        }
        Ok(config)
    }

    pub fn from_value(mut file: Value, context: &Map<String, Value>) -> Result<Config> {
        let Value::Object(ref mut object) = file else {
            return Err(CpiError::cloud("config must be a JSON object"));
        };
        check_sections(object, "config")?;
        check_sections(context, "request context")?;
        check_context(object, context)?;
        for key in CONFIG_KEYS {
            if let Some(overlay) = context.get(*key) {
                match object.get_mut(*key) {
                    Some(base) => deep_merge(base, overlay),
                    None => {
                        object.insert(key.to_string(), overlay.clone());
                    }
                }
            }
        }
        let config: Config = serde_path_to_error::deserialize(file).map_err(|e| {
            let at = e.path().to_string();
            if at == "." {
                CpiError::cloud(format!("invalid config: {}", e.inner()))
            } else {
                CpiError::cloud(format!("invalid config at '{at}': {}", e.inner()))
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(CpiError::cloud(format!("invalid config: {m}")));
        if self.libvirt.uri.trim().is_empty() {
            return invalid("libvirt.uri is empty".into());
        }
        let uri = match LibvirtUri::parse(&self.libvirt.uri) {
            Ok(uri) => uri,
            Err(e) => return invalid(format!("libvirt.uri: {e}")),
        };
        if uri.skips_verification() && !self.libvirt.insecure_skip_tls_verify {
            return invalid(format!("libvirt.uri turns verification of the {} server off (no_verify, or known_hosts_verify other than normal); set libvirt.insecure_skip_tls_verify to true if that is really wanted", uri.transport.as_str()));
        }
        if uri.runs_ssh_binary() && uri.param("known_hosts").is_some() {
            return invalid("libvirt.uri: libvirt's qemu+ssh transport runs the ssh binary, which ignores known_hosts= (it checks the CPI user's own ~/.ssh/known_hosts instead); use qemu+libssh:// or qemu+libssh2:// to pin the host key with known_hosts=".into());
        }
        if self.pool.name.is_empty() || self.network.name.is_empty() {
            return invalid("pool.name and network.name must not be empty".into());
        }
        // libvirt names go through its C API: a NUL cannot, and a lookup
        // that fails for it must not read as "no such volume".
        for (key, name) in [
            ("pool.name", &self.pool.name),
            ("network.name", &self.network.name),
        ] {
            if name.chars().any(char::is_control) {
                return invalid(format!("{key} {name:?} holds a control character"));
            }
        }
        if self.pool.create {
            match &self.pool.path {
                Some(p) if p.starts_with('/') => {}
                _ => return invalid("pool.create needs pool.path, an absolute directory".into()),
            }
        }
        if let Some(subnet) = &self.network.subnet {
            if let Err(e) = crate::net::parse_subnet(subnet) {
                return invalid(format!("network.subnet: {e}"));
            }
        }
        if self.stemcell_formats.is_empty() {
            return invalid("stemcell_formats must not be empty".into());
        }
        if self.agent.mbus.is_empty() {
            return invalid("agent.mbus is empty".into());
        }
        Ok(())
    }

    /// The URI actually opened: with `no_verify=1` only when explicitly asked for.
    pub fn libvirt_uri(&self) -> String {
        let uri = &self.libvirt.uri;
        let skips = LibvirtUri::parse(uri).is_ok_and(|u| u.skips_verification());
        if self.libvirt.insecure_skip_tls_verify && !skips {
            // Into the query, before any fragment (libvirt ignores a
            // fragment, so a parameter after `#` would do nothing).
            let (base, fragment) = match uri.split_once('#') {
                Some((b, f)) => (b, format!("#{f}")),
                None => (uri.as_str(), String::new()),
            };
            // libvirt splits on ';' only when the query has no '&': an '&'
            // added to "a=1;b=2" would make "1;b=2" the value of a.
            let sep = match base.split_once('?') {
                None => '?',
                Some((_, q)) if q.contains(';') && !q.contains('&') => ';',
                Some(_) => '&',
            };
            format!("{base}{sep}no_verify=1{fragment}")
        } else {
            uri.clone()
        }
    }
}

/// Top-level keys of `cpi.json`, which a request context may override.
pub const CONFIG_KEYS: &[&str] = &[
    "libvirt",
    "pool",
    "network",
    "agent",
    "stemcell_formats",
    "console_log_dir",
    "log_level",
    "reboot_grace_seconds",
];

/// Settings only `cpi.json` may hold. A request context (where a director
/// merges a cpi-config's properties) selects a host, a pool and a network,
/// but cannot loosen how the host is reached or make the host write where it
/// likes: turning verification off, creating a pool at a directory of its
/// choosing (the pool build changes the directory's mode), or pointing the
/// console logs at one.
const FILE_ONLY: &[(&str, &str)] = &[
    ("libvirt", "insecure_skip_tls_verify"),
    ("pool", "path"),
    ("pool", "create"),
    ("console_log_dir", ""),
];

/// The keys whose values are sections (objects of settings).
const SECTIONS: &[&str] = &["libvirt", "pool", "network", "agent"];

/// A section must be a JSON object, in the file and in a context alike:
/// serde would also read a struct from an array of its fields in order
/// (`"libvirt": ["qemu+tls://h/system", "kvm", "q35", true]`), which the
/// key-by-key checks of a context would not see.
fn check_sections(object: &Map<String, Value>, whose: &str) -> Result<()> {
    for key in SECTIONS {
        match object.get(*key) {
            None | Some(Value::Object(_)) => {}
            Some(other) => {
                return Err(CpiError::cloud(format!(
                    "invalid {whose}: '{key}' must be an object, got {}",
                    crate::envelope::json_type(other)
                )))
            }
        }
    }
    Ok(())
}

fn check_context(file: &Map<String, Value>, context: &Map<String, Value>) -> Result<()> {
    let refuse = |what: String| {
        Err(CpiError::cloud(format!(
            "invalid request context: {what}; only the CPI's config file may set that"
        )))
    };
    for (key, sub) in FILE_ONLY {
        let set = match (context.get(*key), sub.is_empty()) {
            (Some(_), true) => true,
            (Some(Value::Object(o)), false) => o.contains_key(*sub),
            _ => false,
        };
        if set {
            let path = if sub.is_empty() {
                key.to_string()
            } else {
                format!("{key}.{sub}")
            };
            return refuse(format!("it sets {path}"));
        }
    }
    let Some(uri) = context
        .get("libvirt")
        .and_then(|l| l.get("uri"))
        .and_then(Value::as_str)
    else {
        return Ok(());
    };
    let wanted = LibvirtUri::parse(uri)
        .map_err(|e| CpiError::cloud(format!("invalid request context: libvirt.uri: {e}")))?;
    if wanted.skips_verification() {
        return refuse("its libvirt.uri turns server verification off (no_verify)".into());
    }
    let base = file
        .get("libvirt")
        .and_then(|l| l.get("uri"))
        .and_then(Value::as_str)
        .and_then(|u| LibvirtUri::parse(u).ok());
    match base {
        Some(base) if base.transport == wanted.transport => Ok(()),
        Some(base) => refuse(format!(
            "its libvirt.uri uses the {} transport where the config file's uses {}",
            wanted.transport.as_str(),
            base.transport.as_str()
        )),
        // Replaced, the file's own URI would never be judged: without it
        // there is nothing to hold the context's transport to.
        None => Err(CpiError::cloud(
            "invalid request context: it sets libvirt.uri, but the config file has no valid libvirt.uri to compare it with",
        )),
    }
}

/// URI parameters naming a file or directory on the CPI's machine.
const PATH_PARAMS: &[&str] = &["pkipath", "keyfile", "known_hosts"];

/// A relative `pkipath=`, `keyfile=` or `known_hosts=` in the URI names a
/// path beside the config file (the BOSH job renders the TLS and ssh material
/// next to cpi.json, and `bosh create-env` only knows where that is at run
/// time). Parameter names are matched as libvirt matches them (without case,
/// percent-decoded); everything else in the URI stays as written.
fn absolutize_uri_paths(uri: &str, config_dir: &Path) -> String {
    let Some((base, query)) = uri.split_once('?') else {
        return uri.to_string();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let dir = percent_encode_path(&config_dir.display().to_string());
    let mut out = format!("{base}?");
    let mut rest = query;
    loop {
        let end = rest.find(['&', ';']).unwrap_or(rest.len());
        let (segment, tail) = rest.split_at(end);
        match segment.split_once('=') {
            Some((name, value))
                if !value.is_empty()
                    && !value.starts_with('/')
                    && !value.to_ascii_lowercase().starts_with("%2f")
                    && PATH_PARAMS
                        .iter()
                        .any(|p| crate::uri::percent_decode(name).eq_ignore_ascii_case(p)) =>
            {
                out.push_str(&format!("{name}={dir}/{value}"));
            }
            _ => out.push_str(segment),
        }
        match tail.chars().next() {
            Some(sep) => {
                out.push(sep);
                rest = &tail[1..];
            }
            None => break,
        }
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

/// Bytes a URI may not hold as they are (libvirt parses URIs strictly)
/// become `%XX`; a typical path is unchanged.
fn percent_encode_path(path: &str) -> String {
    path.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"/-._~+,:@".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// Objects merge key by key; anything else replaces.
fn deep_merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(existing) => deep_merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (base, overlay) => *base = overlay.clone(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn sample() -> Value {
        json!({
            "libvirt": {"uri": "test:///default", "domain_type": "qemu"},
            "pool": {"name": "bosh", "path": "/var/lib/bosh-pool", "create": true},
            "network": {"name": "bosh-net", "subnet": "10.0.16.0/24"},
            "agent": {"mbus": "nats://10.0.16.6:4222", "ntp": ["time1.example"]}
        })
    }

    fn load(v: Value) -> Result<Config> {
        Config::from_value(v, &Map::new())
    }

    #[test]
    fn defaults_apply() {
        let c = load(sample()).unwrap();
        assert_eq!(c.libvirt.machine, "q35");
        assert_eq!(c.libvirt.domain_type, DomainType::Qemu);
        assert_eq!(c.stemcell_formats, vec!["openstack-qcow2", "openstack-raw"]);
        assert_eq!(c.log_level, LogLevel::Info);
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let mut v = sample();
        v["pool"]["colour"] = json!("blue");
        let e = load(v).unwrap_err().message;
        assert!(
            e.contains("'pool.colour'") && e.contains("unknown field `colour`"),
            "{e}"
        );
        let mut v = sample();
        v["libvirt"].as_object_mut().unwrap().remove("uri");
        let e = load(v).unwrap_err().message;
        assert!(e.contains("missing field `uri`"), "{e}");
        let mut v = sample();
        v.as_object_mut().unwrap().remove("agent");
        assert!(load(v)
            .unwrap_err()
            .message
            .contains("missing field `agent`"));
    }

    #[test]
    fn context_overrides_file() {
        let ctx = json!({"director_uuid": "x", "request_id": "cpi-1", "vm": {"stemcell": {"api_version": 3}},
                         "libvirt": {"uri": "qemu+tls://kvm-2/system"}, "pool": {"name": "other"}});
        let mut file = sample();
        file["libvirt"]["uri"] = json!("qemu+tls://kvm-1/system?pkipath=/p");
        let c = Config::from_value(file, ctx.as_object().unwrap()).unwrap();
        assert_eq!(c.libvirt.uri, "qemu+tls://kvm-2/system");
        assert_eq!(
            c.libvirt.domain_type,
            DomainType::Qemu,
            "merge keeps the rest"
        );
        assert_eq!(c.pool.name, "other");
        assert_eq!(c.pool.path.as_deref(), Some("/var/lib/bosh-pool"));
    }

    #[test]
    fn a_context_cannot_loosen_security_or_move_storage() {
        let mut file = sample();
        file["libvirt"]["uri"] = json!("qemu+tls://kvm-1/system?pkipath=/p");
        for (ctx, expect) in [
            (
                json!({"libvirt": {"insecure_skip_tls_verify": true}}),
                "libvirt.insecure_skip_tls_verify",
            ),
            (
                json!({"libvirt": {"insecure_skip_tls_verify": false}}),
                "libvirt.insecure_skip_tls_verify",
            ),
            (json!({"pool": {"name": "p", "path": "/etc"}}), "pool.path"),
            (json!({"pool": {"create": true}}), "pool.create"),
            (json!({"console_log_dir": "/etc"}), "console_log_dir"),
            (
                json!({"libvirt": {"uri": "qemu+tls://kvm-2/system?No_Verify=%31"}}),
                "no_verify",
            ),
            (
                json!({"libvirt": {"uri": "qemu+tcp://kvm-2/system"}}),
                "tcp transport where the config file's uses tls",
            ),
            (
                json!({"libvirt": {"uri": "qemu:///system"}}),
                "unix transport",
            ),
            (json!({"libvirt": {"uri": "nonsense"}}), "not a libvirt URI"),
        ] {
            let e = Config::from_value(file.clone(), ctx.as_object().unwrap())
                .unwrap_err()
                .message;
            assert!(
                e.contains(expect) && e.contains("request context"),
                "{ctx}: {e}"
            );
        }
        // A file URI that does not parse cannot be replaced by a context's.
        let mut broken = file.clone();
        broken["libvirt"]["uri"] = json!("qemu+tls:/%zz/system");
        let ctx = json!({"libvirt": {"uri": "qemu+tcp://kvm-2/system"}});
        let e = Config::from_value(broken, ctx.as_object().unwrap())
            .unwrap_err()
            .message;
        assert!(e.contains("no valid libvirt.uri to compare"), "{e}");
        // Another host over the same transport, its own pool and network: fine.
        let ctx = json!({"libvirt": {"uri": "qemu+tls://kvm-2/system?pkipath=/q"},
                         "pool": {"name": "p2"}, "network": {"name": "n2"}});
        let c = Config::from_value(file, ctx.as_object().unwrap()).unwrap();
        assert_eq!(
            (c.pool.name.as_str(), c.network.name.as_str()),
            ("p2", "n2")
        );
    }

    #[test]
    fn sections_must_be_objects_in_the_file_and_in_a_context() {
        let mut file = sample();
        file["libvirt"]["uri"] = json!("qemu+tls://kvm-1/system?pkipath=/p");
        // Field order of the structs: a context that could otherwise turn
        // verification off, switch the transport or place a pool anywhere.
        for ctx in [
            json!({"libvirt": ["qemu+tcp://kvm-2/system", "kvm", "q35", true]}),
            json!({"libvirt": ["qemu+tls://kvm-2/system?no_verify=1"]}),
            json!({"pool": ["p", "/etc", true]}),
            json!({"network": ["n", "10.9.0.0/24"]}),
            json!({"agent": "nats://x"}),
            json!({"pool": null}),
        ] {
            let e = Config::from_value(file.clone(), ctx.as_object().unwrap()).unwrap_err();
            assert!(
                e.message.contains("invalid request context")
                    && e.message.contains("must be an object"),
                "{ctx}: {}",
                e.message
            );
        }
        let mut v = sample();
        v["pool"] = json!(["bosh", "/var/lib/bosh-pool", true]);
        let e = load(v).unwrap_err().message;
        assert!(
            e.contains("invalid config: 'pool' must be an object, got an array"),
            "{e}"
        );
    }

    #[test]
    fn tls_verification_is_only_off_when_asked() {
        let mut v = sample();
        v["libvirt"]["uri"] = json!("qemu+tls://h/system?no_verify=1");
        assert!(load(v.clone())
            .unwrap_err()
            .message
            .contains("insecure_skip_tls_verify"));
        for spelling in [
            "NO_VERIFY=1",
            "no_verify=2",
            "no%5Fverify=1",
            "no_verify=%31",
            "no_verify=-1",
        ] {
            v["libvirt"]["uri"] = json!(format!("qemu+ssh://h/system?{spelling}"));
            let e = load(v.clone()).unwrap_err().message;
            assert!(e.contains("insecure_skip_tls_verify"), "{spelling}: {e}");
        }
        v["libvirt"]["uri"] = json!("qemu+tls://h/system?pkipath=/p");
        v["libvirt"]["insecure_skip_tls_verify"] = json!(true);
        assert_eq!(
            load(v.clone()).unwrap().libvirt_uri(),
            "qemu+tls://h/system?pkipath=/p&no_verify=1"
        );
        assert_eq!(load(sample()).unwrap().libvirt_uri(), "test:///default");
        v["libvirt"]["uri"] = json!("qemu+tls://h/system?pkipath=/p;mode=direct");
        let uri = load(v.clone()).unwrap().libvirt_uri();
        assert_eq!(
            uri,
            "qemu+tls://h/system?pkipath=/p;mode=direct;no_verify=1"
        );
        let params = LibvirtUri::parse(&uri).unwrap().params;
        assert_eq!(params[0], ("pkipath".into(), "/p".into()));
        v["libvirt"]["uri"] = json!("qemu+tls://h/system#f");
        assert_eq!(
            load(v).unwrap().libvirt_uri(),
            "qemu+tls://h/system?no_verify=1#f"
        );
    }

    #[test]
    fn relative_paths_in_the_uri_are_beside_the_config_file() {
        let dir = Path::new("/var/vcap/jobs/libvirt_cpi/config");
        let abs = |uri: &str| absolutize_uri_paths(uri, dir);
        assert_eq!(
            abs("qemu+tls://h/system?pkipath=pki&no_verify=0"),
            "qemu+tls://h/system?pkipath=/var/vcap/jobs/libvirt_cpi/config/pki&no_verify=0"
        );
        assert_eq!(
            abs("qemu+tls://h/system?pkipath=/abs/pki"),
            "qemu+tls://h/system?pkipath=/abs/pki"
        );
        assert_eq!(abs("qemu:///system"), "qemu:///system");
        assert_eq!(
            abs("qemu+libssh://bosh@h:2222/system?keyfile=ssh/private_key;KNOWN_HOSTS=ssh/known_hosts&known_hosts_verify=normal"),
            "qemu+libssh://bosh@h:2222/system?keyfile=/var/vcap/jobs/libvirt_cpi/config/ssh/private_key;\
             KNOWN_HOSTS=/var/vcap/jobs/libvirt_cpi/config/ssh/known_hosts&known_hosts_verify=normal"
        );
        assert_eq!(
            abs("qemu+ssh://h/system?keyfile=%2Froot%2Fk&no_tty=1&xkeyfile=k&keyfile="),
            "qemu+ssh://h/system?keyfile=%2Froot%2Fk&no_tty=1&xkeyfile=k&keyfile="
        );
        assert_eq!(
            absolutize_uri_paths("qemu+libssh://h/system?key%66ile=k", Path::new("/a dir")),
            "qemu+libssh://h/system?key%66ile=/a%20dir/k"
        );
    }

    #[test]
    fn known_hosts_is_refused_where_libvirt_would_ignore_it() {
        let mut v = sample();
        v["libvirt"]["uri"] = json!("qemu+ssh://h/system?keyfile=/k&known_hosts=/kh&no_tty=1");
        let e = load(v.clone()).unwrap_err().message;
        assert!(
            e.contains("ignores known_hosts") && e.contains("qemu+libssh://"),
            "{e}"
        );
        for uri in [
            "qemu+libssh://h/system?keyfile=/k&known_hosts=/kh",
            "qemu+libssh2://h/system?keyfile=/k&known_hosts=/kh",
            "qemu+ssh://h/system?keyfile=/k&no_tty=1",
        ] {
            v["libvirt"]["uri"] = json!(uri);
            load(v.clone()).unwrap();
        }
        v["libvirt"]["uri"] = json!("qemu+libssh://h/system?known_hosts_verify=auto");
        assert!(load(v)
            .unwrap_err()
            .message
            .contains("insecure_skip_tls_verify"));
    }

    #[test]
    fn semantic_checks() {
        let mut v = sample();
        v["pool"]["path"] = json!("relative");
        assert!(load(v)
            .unwrap_err()
            .message
            .contains("pool.create needs pool.path"));
        for key in ["pool", "network"] {
            let mut v = sample();
            v[key]["name"] = json!("a\u{0}b");
            let e = load(v).unwrap_err().message;
            assert!(e.contains("holds a control character"), "{e}");
        }
        let mut v = sample();
        v["network"]["subnet"] = json!("10.0.0.0/33");
        assert!(load(v).unwrap_err().message.contains("network.subnet"));
        let mut v = sample();
        v["libvirt"]["domain_type"] = json!("xen");
        assert!(load(v)
            .unwrap_err()
            .message
            .contains("'libvirt.domain_type'"));
    }
}
