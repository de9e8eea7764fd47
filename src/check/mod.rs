//! `cpi check [--json] [--static IP|FIRST-LAST]... <cpi.json>`: the host
//! check an operator runs before `bosh create-env` (the job's `bin/check`
//! runs it with the rendered config). It loads the config as the CPI does,
//! looks at the transport's TLS or ssh material, connects as the CPI does and
//! asks libvirt about versions, the domain type, the pool and the network.
//! Each finding is ok, warning or error, with the fix. Nothing on the host is
//! changed: a missing pool or network is judged by what the CPI would do on
//! first use.
//!
//! Exit status: 0 without errors, 1 with at least one, 2 for a bad command line.

pub mod host;
#[cfg(test)]
mod host_tests;
pub mod material;

use std::ffi::OsString;
use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{json, Map};

use crate::config::Config;
use crate::uri::{LibvirtUri, Transport};

pub const USAGE: &str = "usage: cpi check [--json] [--static IP|FIRST-LAST]... <cpi.json>";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Warning,
    Error,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warning => "warning",
            Status::Error => "error",
        }
    }
}

/// One thing checked: what was found, and what to do about it.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: String,
    pub status: Status,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl Finding {
    pub fn ok(check: &str, message: impl Into<String>) -> Finding {
        Finding {
            check: check.to_string(),
            status: Status::Ok,
            message: message.into(),
            fix: None,
        }
    }

    pub fn warning(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            status: Status::Warning,
            fix: Some(fix.into()),
            ..Finding::ok(check, message)
        }
    }

    pub fn error(check: &str, message: impl Into<String>, fix: impl Into<String>) -> Finding {
        Finding {
            status: Status::Error,
            fix: Some(fix.into()),
            ..Finding::ok(check, message)
        }
    }
}

/// IPv4 addresses BOSH will give out statically (a director's IP, a
/// manual network's static range).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl IpRange {
    pub fn parse(text: &str) -> Result<IpRange, String> {
        let ip = |s: &str| {
            s.trim()
                .parse::<Ipv4Addr>()
                .map_err(|_| format!("'{s}' is not an IPv4 address"))
        };
        let (first, last) = match text.split_once('-') {
            Some((a, b)) => (ip(a)?, ip(b)?),
            None => (ip(text)?, ip(text)?),
        };
        if u32::from(first) > u32::from(last) {
            return Err(format!("'{text}': the range ends before it starts"));
        }
        Ok(IpRange { first, last })
    }
}

impl fmt::Display for IpRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

#[derive(Debug, PartialEq)]
pub struct Options {
    pub json: bool,
    pub statics: Vec<IpRange>,
    pub config: PathBuf,
}

/// The arguments after `check`.
pub fn parse_args(args: &[OsString]) -> Result<Options, String> {
    let mut json = false;
    let mut statics = Vec::new();
    let mut config = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--json") => json = true,
            Some("--static") => {
                let value = args
                    .next()
                    .and_then(|v| v.to_str())
                    .ok_or("--static needs IP or FIRST-LAST")?;
                for part in value.split(',').filter(|p| !p.trim().is_empty()) {
                    statics.push(IpRange::parse(part)?);
                }
            }
            Some(flag) if flag.starts_with("--") => return Err(format!("unknown option {flag}")),
            _ if config.is_none() => config = Some(PathBuf::from(arg)),
            _ => return Err("more than one config file given".into()),
        }
    }
    Ok(Options {
        json,
        statics,
        config: config.ok_or("no config file given")?,
    })
}

/// Every finding for the config at `opts.config`, in the order an operator
/// would fix them. Stops early only when there is nothing left to ask.
pub fn run(opts: &Options) -> Vec<Finding> {
    let mut out = Vec::new();
    let config = match Config::load(Some(&opts.config), &Map::new()) {
        Ok(c) => c,
        Err(e) => {
            out.push(Finding::error(
                "config",
                e.message,
                "correct cpi.json (its schema: spec/cpi.schema.json; with the job, the libvirt_cpi properties)",
            ));
            return out;
        }
    };
    out.push(Finding::ok(
        "config",
        format!(
            "{} loaded: domain type {}, machine {}, pool '{}', network '{}'",
            opts.config.display(),
            config.libvirt.domain_type.as_str(),
            config.libvirt.machine,
            config.pool.name,
            config.network.name
        ),
    ));
    // Config::load has validated the URI.
    let Ok(uri) = LibvirtUri::parse(&config.libvirt.uri) else {
        return out;
    };
    out.extend(transport(&config, &uri));
    out.extend(material::check(&uri, SystemTime::now()));
    let facts = crate::libvirt::inspect::inspect(&config);
    out.extend(host::check(&config, &uri, &opts.statics, facts));
    out
}

fn transport(config: &Config, uri: &LibvirtUri) -> Option<Finding> {
    if config.libvirt.insecure_skip_tls_verify {
        return Some(Finding::warning(
            "transport",
            format!("libvirt.insecure_skip_tls_verify is on: the {} server is not verified, anybody in the middle can pose as the host", uri.transport.as_str()),
            "set libvirt.insecure_skip_tls_verify to false and give the CA (libvirt.tls.ca) or the pinned host key (libvirt.ssh.known_hosts)",
        ));
    }
    match uri.transport {
        Transport::Tcp => Some(Finding::warning(
            "transport",
            "qemu+tcp: the link to libvirtd is neither encrypted nor authenticated by a certificate",
            "use qemu+tls:// (or qemu+libssh://) unless the link is on a network nobody else reaches",
        )),
        _ => None,
    }
}

/// The document `--json` prints.
pub fn json_report(opts: &Options, findings: &[Finding]) -> serde_json::Value {
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    json!({
        "config": opts.config.display().to_string(),
        "status": overall(findings).as_str(),
        "summary": {"ok": count(Status::Ok), "warning": count(Status::Warning), "error": count(Status::Error)},
        "findings": findings,
    })
}

fn overall(findings: &[Finding]) -> Status {
    if findings.iter().any(|f| f.status == Status::Error) {
        Status::Error
    } else if findings.iter().any(|f| f.status == Status::Warning) {
        Status::Warning
    } else {
        Status::Ok
    }
}

/// The report as an operator reads it: one line per finding, its fix below.
pub fn text_report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        out.push_str(&format!(
            "{:<8} {:<17} {}\n",
            f.status.as_str(),
            f.check,
            f.message
        ));
        if let Some(fix) = &f.fix {
            out.push_str(&format!("{:<8} {:<17} fix: {fix}\n", "", ""));
        }
    }
    let count = |s: Status| findings.iter().filter(|f| f.status == s).count();
    let plural = |n: usize, what: &str| format!("{n} {what}{}", if n == 1 { "" } else { "s" });
    out.push_str(&format!(
        "{} ok, {}, {}\n",
        count(Status::Ok),
        plural(count(Status::Warning), "warning"),
        plural(count(Status::Error), "error")
    ));
    out
}

/// `cpi check ...`: prints the report, returns the exit status.
pub fn main(args: &[OsString]) -> ExitCode {
    let opts = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("cpi check: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let findings = run(&opts);
    let text = if opts.json {
        format!("{:#}\n", json_report(&opts, &findings))
    } else {
        text_report(&findings)
    };
    // A reader that went away (`| head`) is no reason to panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout(), text.as_bytes());
    if overall(&findings) == Status::Error {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<OsString> {
        a.iter().map(OsString::from).collect()
    }

    #[test]
    fn command_line() {
        let o = parse_args(&args(&[
            "--json",
            "--static",
            "10.0.16.6,10.0.16.10-10.0.16.20",
            "c.json",
        ]))
        .unwrap();
        assert!(o.json);
        assert_eq!(o.config, PathBuf::from("c.json"));
        assert_eq!(
            o.statics.iter().map(|r| r.to_string()).collect::<Vec<_>>(),
            ["10.0.16.6", "10.0.16.10-10.0.16.20"]
        );
        assert!(parse_args(&args(&[])).is_err());
        assert!(parse_args(&args(&["--colour", "c.json"])).is_err());
        assert!(parse_args(&args(&["--static", "10.0.0.9-10.0.0.1", "c"])).is_err());
        assert!(parse_args(&args(&["a", "b"])).is_err());
    }
}
