//! The host check's look at the files on the CPI's machine that the URI's
//! transport reads: TLS certificates and key (found as libvirt finds them)
//! and the ssh key and known_hosts. No libvirt here, and nothing is changed.
//!
//! Where libvirt's TLS client looks (libvirt `src/rpc/virnettlsconfig.c` and
//! `virnettlscontext.c`): with `pkipath=DIR`, `DIR/cacert.pem`,
//! `DIR/clientcert.pem` and `DIR/clientkey.pem`; otherwise, for root, the
//! system paths `/etc/pki/CA/cacert.pem`, `/etc/pki/libvirt/clientcert.pem`
//! and `/etc/pki/libvirt/private/clientkey.pem`, and for any other user
//! `$HOME/.pki/libvirt/` when it holds them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::signature::KeyPair;
use x509_parser::certificate::X509Certificate;
use x509_parser::pem::Pem;
use x509_parser::x509::SubjectPublicKeyInfo;

use super::Finding;
use crate::uri::{LibvirtUri, Transport};

/// A certificate expiring sooner than this is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// Every finding about the transport's material, in the order an operator fixes them.
pub fn check(uri: &LibvirtUri, now: SystemTime) -> Vec<Finding> {
    match uri.transport {
        Transport::Tls => tls(&TlsPaths::of(uri), now),
        Transport::Ssh => ssh(uri),
        _ => Vec::new(),
    }
}

/// The three files libvirt's TLS client reads.
pub struct TlsPaths {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsPaths {
    pub fn of(uri: &LibvirtUri) -> TlsPaths {
        if let Some(dir) = uri.param("pkipath") {
            let dir = Path::new(dir);
            return TlsPaths {
                ca: dir.join("cacert.pem"),
                cert: dir.join("clientcert.pem"),
                key: dir.join("clientkey.pem"),
            };
        }
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        let user_dir = std::env::var_os("HOME").map(|h| Path::new(&h).join(".pki/libvirt"));
        match user_dir {
            Some(dir) if !root && dir.join("clientcert.pem").exists() => TlsPaths {
                ca: dir.join("cacert.pem"),
                cert: dir.join("clientcert.pem"),
                key: dir.join("clientkey.pem"),
            },
            _ => TlsPaths {
                ca: PathBuf::from("/etc/pki/CA/cacert.pem"),
                cert: PathBuf::from("/etc/pki/libvirt/clientcert.pem"),
                key: PathBuf::from("/etc/pki/libvirt/private/clientkey.pem"),
            },
        }
    }
}

/// The PEM blocks of a file, or the finding that says why there are none.
fn read_pems(path: &Path, check: &str, what: &str) -> Result<Vec<Pem>, Finding> {
    let bytes = std::fs::read(path).map_err(|e| {
        Finding::error(
            check,
            format!("cannot read {what} {}: {e}", path.display()),
            "put the PEM files where libvirt.uri's pkipath= points (the job renders libvirt.tls into config/pki); the CPI's user must be able to read them",
        )
    })?;
    let pems: Vec<Pem> = Pem::iter_from_buffer(&bytes)
        .map_while(Result::ok)
        .collect();
    if pems.is_empty() {
        return Err(Finding::error(
            check,
            format!("{} holds no PEM block ({what} expected)", path.display()),
            "give the PEM text, from its -----BEGIN line to its -----END line",
        ));
    }
    Ok(pems)
}

fn tls(paths: &TlsPaths, now: SystemTime) -> Vec<Finding> {
    let mut out = Vec::new();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);

    let ca_pems = match read_pems(&paths.ca, "tls.ca", "the CA certificate") {
        Ok(p) => Some(p),
        Err(f) => {
            out.push(f);
            None
        }
    };
    let cas: Vec<X509Certificate> = ca_pems
        .iter()
        .flatten()
        .filter(|p| p.label == "CERTIFICATE")
        .filter_map(|p| p.parse_x509().ok())
        .collect();
    if ca_pems.is_some() {
        if cas.is_empty() {
            out.push(Finding::error(
                "tls.ca",
                format!("{} holds no X.509 certificate", paths.ca.display()),
                "cacert.pem must be the PEM certificate of the CA that signed libvirtd's server certificate",
            ));
        }
        for ca in &cas {
            let what = format!("CA certificate {} ({})", ca.subject(), paths.ca.display());
            out.push(validity("tls.ca", &what, ca, now));
        }
    }

    let cert_pems = read_pems(&paths.cert, "tls.client_cert", "the client certificate");
    let cert_pems = match cert_pems {
        Ok(p) => Some(p),
        Err(f) => {
            out.push(f);
            None
        }
    };
    let cert = cert_pems.as_ref().and_then(|pems| {
        pems.iter()
            .find(|p| p.label == "CERTIFICATE")
            .and_then(|p| p.parse_x509().ok())
    });
    match (&cert_pems, &cert) {
        (Some(_), None) => out.push(Finding::error(
            "tls.client_cert",
            format!("{} holds no X.509 certificate", paths.cert.display()),
            "clientcert.pem must be the PEM client certificate (extended key usage clientAuth)",
        )),
        (_, Some(cert)) => {
            let what = format!(
                "client certificate {} ({})",
                cert.subject(),
                paths.cert.display()
            );
            out.push(validity("tls.client_cert", &what, cert, now));
            if !cas.is_empty() {
                out.push(signed_by(cert, &cas, &paths.ca));
            }
        }
        _ => {}
    }

    match read_pems(&paths.key, "tls.client_key", "the client key") {
        Err(f) => out.push(f),
        Ok(pems) => {
            // `openssl ecparam -genkey` writes EC PARAMETERS before the key.
            let key = pems
                .iter()
                .find(|p| p.label.ends_with("PRIVATE KEY"))
                .unwrap_or(&pems[0]);
            if let Some(cert) = &cert {
                out.push(key_matches(key, cert, &paths.key, &paths.cert));
            }
            if let Some(f) = private_file_mode("tls.client_key", &paths.key) {
                out.push(f);
            }
        }
    }
    out
}

/// Expired or not yet valid: error; expiring within EXPIRY_WARNING_DAYS: warning.
fn validity(check: &str, what: &str, cert: &X509Certificate, now: i64) -> Finding {
    let from = cert.validity().not_before.timestamp();
    let until = cert.validity().not_after.timestamp();
    let renew = "issue a new one with the same CA (docs/operator-guide.md, section 2.2; for a CLI-generated variable, delete it from the vars store and run create-env again)";
    if now > until {
        Finding::error(
            check,
            format!("{what} expired on {}", date(until)),
            format!("the TLS handshake fails with it: {renew}"),
        )
    } else if now < from {
        Finding::error(
            check,
            format!(
                "{what} is not valid before {} (is this machine's clock right?)",
                date(from)
            ),
            "correct the clock of this machine or of the host, or issue a certificate valid now",
        )
    } else {
        let days = (until - now) / 86_400;
        if days < EXPIRY_WARNING_DAYS {
            Finding::warning(
                check,
                format!("{what} expires on {} (in {days} days)", date(until)),
                renew,
            )
        } else {
            Finding::ok(
                check,
                format!("{what} valid until {} ({days} days)", date(until)),
            )
        }
    }
}

/// The client certificate's signature checked against each CA of cacert.pem.
fn signed_by(cert: &X509Certificate, cas: &[X509Certificate], ca_path: &Path) -> Finding {
    match cas
        .iter()
        .find(|ca| cert.verify_signature(Some(ca.public_key())).is_ok())
    {
        Some(ca) => Finding::ok("tls.signed_by", format!("client certificate signed by {}", ca.subject())),
        None => Finding::error(
            "tls.signed_by",
            format!(
                "the client certificate (issuer {}) is not signed by the CA in {} ({})",
                cert.issuer(),
                ca_path.display(),
                cas.iter()
                    .map(|c| c.subject().to_string())
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            "libvirt refuses its own certificate before connecting: issue the client certificate from the CA libvirtd trusts, or put that CA in cacert.pem",
        ),
    }
}

/// The private key's public half must be the certificate's public key.
fn key_matches(key: &Pem, cert: &X509Certificate, key_path: &Path, cert_path: &Path) -> Finding {
    let check = "tls.client_key";
    let spki: &SubjectPublicKeyInfo = cert.public_key();
    let public = match public_key_of(key) {
        Ok(p) => p,
        Err(why) => {
            return Finding::error(
                check,
                format!("{}: {why}", key_path.display()),
                "clientkey.pem must be the unencrypted private key of clientcert.pem (PEM, PKCS#1 or PKCS#8)",
            )
        }
    };
    match public {
        None => Finding::warning(
            check,
            format!(
                "{}: a {} key cannot be matched with the certificate here",
                key_path.display(),
                key.label
            ),
            "convert it to PKCS#8 (openssl pkcs8 -topk8 -nocrypt) to have it checked",
        ),
        Some(public) if public == spki.subject_public_key.data.as_ref() => Finding::ok(
            check,
            format!("{} is the key of the client certificate", key_path.display()),
        ),
        Some(_) => Finding::error(
            check,
            format!(
                "{} is not the private key of {}",
                key_path.display(),
                cert_path.display()
            ),
            "the TLS handshake fails with a key of another certificate: give the key the client certificate was issued for (libvirt.tls.private_key beside libvirt.tls.certificate)",
        ),
    }
}

/// The public key (as a certificate holds it) of a private key in PEM:
/// Ok(None) for a kind that cannot be checked here.
fn public_key_of(key: &Pem) -> Result<Option<Vec<u8>>, String> {
    use ring::signature::{
        EcdsaKeyPair, Ed25519KeyPair, RsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING,
        ECDSA_P384_SHA384_ASN1_SIGNING,
    };
    let der = key.contents.as_slice();
    match key.label.as_str() {
        "RSA PRIVATE KEY" => RsaKeyPair::from_der(der)
            .map(|k| Some(k.public_key().as_ref().to_vec()))
            .map_err(|e| format!("not a usable RSA private key ({e})")),
        "PRIVATE KEY" => {
            if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
                return Ok(Some(k.public_key().as_ref().to_vec()));
            }
            let rng = ring::rand::SystemRandom::new();
            for alg in [
                &ECDSA_P256_SHA256_ASN1_SIGNING,
                &ECDSA_P384_SHA384_ASN1_SIGNING,
            ] {
                if let Ok(k) = EcdsaKeyPair::from_pkcs8(alg, der, &rng) {
                    return Ok(Some(k.public_key().as_ref().to_vec()));
                }
            }
            if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
                return Ok(Some(k.public_key().as_ref().to_vec()));
            }
            Ok(None)
        }
        "ENCRYPTED PRIVATE KEY" => {
            Err("the key is encrypted; libvirt has nobody to ask for its passphrase".into())
        }
        label if label.ends_with("PRIVATE KEY") => Ok(None),
        label => Err(format!("a PEM {label}, not a private key")),
    }
}

/// A key file of ours that others may read.
fn private_file_mode(check: &str, path: &Path) -> Option<Finding> {
    let meta = std::fs::metadata(path).ok()?;
    // SAFETY: geteuid cannot fail.
    let ours = meta.uid() == unsafe { libc::geteuid() };
    let mode = meta.mode() & 0o777;
    (ours && mode & 0o077 != 0).then(|| {
        Finding::warning(
            check,
            format!(
                "{} is mode {mode:04o}: others on this machine can read the key",
                path.display()
            ),
            format!("chmod 600 {}", path.display()),
        )
    })
}

fn ssh(uri: &LibvirtUri) -> Vec<Finding> {
    let mut out = Vec::new();
    match uri.param("keyfile") {
        None => out.push(Finding::ok(
            "ssh.keyfile",
            "no keyfile= in libvirt.uri: the ssh client offers the CPI user's own keys (~/.ssh/id_*, an agent)",
        )),
        Some(path) => out.push(keyfile(Path::new(path))),
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let known_hosts = match uri.param("known_hosts") {
        Some(p) => vec![PathBuf::from(p)],
        // The ssh binary reads the user's file and the system one.
        None if uri.runs_ssh_binary() => vec![
            home.join(".ssh/known_hosts"),
            PathBuf::from("/etc/ssh/ssh_known_hosts"),
        ],
        // libvirt's libssh/libssh2 default (src/rpc/virnetclient.c).
        None => vec![std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| home.join(".config"))
            .join("libvirt/known_hosts")],
    };
    out.push(known_host(&known_hosts, &uri.host, uri.port));
    out
}

fn keyfile(path: &Path) -> Finding {
    let check = "ssh.keyfile";
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            return Finding::error(
                check,
                format!("cannot read the ssh key {}: {e}", path.display()),
                "put the private key where keyfile= points (the job renders libvirt.ssh.private_key into config/ssh/private_key); the CPI's user must be able to read it",
            )
        }
    };
    if !text.contains("PRIVATE KEY-----") {
        return Finding::error(
            check,
            format!("{} is not a private key", path.display()),
            "give the private key in OpenSSH or PEM format (-----BEGIN ... PRIVATE KEY-----)",
        );
    }
    if text.contains("ENCRYPTED") {
        return Finding::error(
            check,
            format!("{} is encrypted", path.display()),
            "the CPI has nobody to ask for a passphrase: use an unencrypted key (ssh-keygen -p -N '' -f KEY)",
        );
    }
    if let Some(mut f) = private_file_mode(check, path) {
        // ssh refuses such a key ("UNPROTECTED PRIVATE KEY FILE"); libssh takes
        // it, but anybody on this machine may log in to the host with it.
        f.status = super::Status::Error;
        return f;
    }
    Finding::ok(
        check,
        format!("{} is a readable, unencrypted private key", path.display()),
    )
}

/// Whether one of the files pins a key for the host, by the name the ssh
/// clients look up: `host`, or `[host]:port` on a port other than 22.
fn known_host(files: &[PathBuf], host: &str, port: Option<u16>) -> Finding {
    let check = "ssh.known_hosts";
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = match port {
        Some(p) if p != 22 => format!("[{host}]:{p}"),
        _ => host.to_string(),
    };
    let keyscan = match port {
        Some(p) if p != 22 => format!("ssh-keyscan -p {p} {host}"),
        _ => format!("ssh-keyscan {host}"),
    };
    let listed = files
        .iter()
        .map(|f| f.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut readable = false;
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        readable = true;
        if let Some(key_type) = known_hosts_entry(&text, &name) {
            return Finding::ok(
                check,
                format!("{} pins a {key_type} key for {name}", file.display()),
            );
        }
    }
    let fix = format!("add the line `{keyscan}` prints, after comparing its key with the host's own (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub on the host); with the job, in libvirt.ssh.known_hosts");
    if readable {
        Finding::error(
            check,
            format!("no key for {name} in {listed}: the host will be refused"),
            fix,
        )
    } else {
        Finding::error(
            check,
            format!("no known_hosts file to read ({listed})"),
            fix,
        )
    }
}

/// The key type of the first known_hosts line for `name` (no revoked or CA lines).
pub fn known_hosts_entry(text: &str, name: &str) -> Option<String> {
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with('@') {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(hosts), Some(key_type)) = (fields.next(), fields.next()) else {
            continue;
        };
        if hosts_match(hosts, name) {
            return Some(key_type.to_string());
        }
    }
    None
}

/// OpenSSH's rules (`hostfile.c`, `match.c`): a hashed entry `|1|salt|hash`
/// is HMAC-SHA1(salt, name); otherwise a comma list of patterns with `*`
/// and `?`, where a matching `!pattern` rules the line out.
fn hosts_match(hosts: &str, name: &str) -> bool {
    if let Some(hashed) = hosts.strip_prefix("|1|") {
        let Some((salt, hash)) = hashed.split_once('|') else {
            return false;
        };
        let b64 = data_encoding::BASE64;
        let (Ok(salt), Ok(hash)) = (b64.decode(salt.as_bytes()), b64.decode(hash.as_bytes()))
        else {
            return false;
        };
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, &salt);
        return ring::hmac::verify(&key, name.as_bytes(), &hash).is_ok();
    }
    let name = name.to_ascii_lowercase();
    let mut matched = false;
    for pattern in hosts.split(',') {
        let pattern = pattern.to_ascii_lowercase();
        match pattern.strip_prefix('!') {
            Some(neg) if glob(neg.as_bytes(), name.as_bytes()) => return false,
            Some(_) => {}
            None => matched |= glob(pattern.as_bytes(), name.as_bytes()),
        }
    }
    matched
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    match (pattern.first(), text.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            glob(&pattern[1..], text) || (!text.is_empty() && glob(pattern, &text[1..]))
        }
        (Some(b'?'), Some(_)) => glob(&pattern[1..], &text[1..]),
        (Some(p), Some(t)) if p == t => glob(&pattern[1..], &text[1..]),
        _ => false,
    }
}

/// A UNIX time as YYYY-MM-DD (UTC).
pub fn date(secs: i64) -> String {
    // Howard Hinnant's days-to-civil.
    let z = secs.div_euclid(86_400) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(1_580_515_200), "2020-02-01");
        assert_eq!(date(951_782_400), "2000-02-29");
    }

    #[test]
    fn known_hosts_names_patterns_and_hashes() {
        let text = "# comment\n@revoked h1 ssh-rsa AAAA\n\
                    h2,[h3]:2222 ssh-ed25519 AAAA\n\
                    *.example.com,!bad.example.com ecdsa-sha2-nistp256 AAAA\n\
                    |1|LmjOWkE0qHm4/UBy83tmgxgwEro=|46vZMmECPEo8+4hi6/qN/SFNM+4= ssh-ed25519 AAAA\n";
        assert_eq!(known_hosts_entry(text, "h1"), None);
        assert_eq!(
            known_hosts_entry(text, "h2").as_deref(),
            Some("ssh-ed25519")
        );
        assert_eq!(
            known_hosts_entry(text, "[h3]:2222").as_deref(),
            Some("ssh-ed25519")
        );
        assert_eq!(known_hosts_entry(text, "h3"), None);
        assert!(known_hosts_entry(text, "kvm.example.com").is_some());
        assert_eq!(known_hosts_entry(text, "bad.example.com"), None);
        // `ssh-keygen -H` of "[127.0.0.1]:2222" with that salt.
        assert!(known_hosts_entry(text, "[127.0.0.1]:2222").is_some());
        assert_eq!(known_hosts_entry(text, "127.0.0.1"), None);
    }
}
