//! `cpi check`, the operator's host check, through the built binary against
//! the test bed: the test bed's own config passes, and each deliberately
//! broken setup (material made on the fly with the openssl CLI, configs
//! naming what does not exist) is an error with its fix and exit status 1.
//! The check never changes the host: what it finds missing stays missing.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

const SSH_PORT: u16 = 2222;

/// `cpi check --json ARGS... CONFIG` as an operator runs it (through the
/// front executable); its exit status and its one JSON document.
fn check(config: &Path, args: &[&str]) -> (i32, Value) {
    let child = Command::new(env!("CARGO_BIN_EXE_cpi"))
        .arg("check")
        .arg("--json")
        .args(args)
        .arg(config)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/root".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning cpi check");
    let out = wait_with_timeout(child, CPI_CALL_TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "cpi check --json must print one JSON document ({e}): {text}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().expect("exit status"), report)
}

/// The findings of one check.
fn findings<'a>(report: &'a Value, name: &str) -> Vec<&'a Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["check"] == name)
        .collect()
}

/// The one finding of `name` with `status`, whose message contains `text`.
fn expect<'a>(report: &'a Value, name: &str, status: &str, text: &str) -> &'a Value {
    findings(report, name)
        .into_iter()
        .find(|f| f["status"] == status && f["message"].as_str().unwrap().contains(text))
        .unwrap_or_else(|| panic!("no {status} '{name}' finding with '{text}' in:\n{report:#}"))
}

fn errors(report: &Value) -> Vec<&Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["status"] == "error")
        .collect()
}

fn run(cmd: &mut Command) {
    let out = cmd.output().expect("running a command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A copy of the test bed's client PKI (what `pkipath=` names) in a scratch
/// dir, and a config using it.
fn pki_copy(name: &str) -> (PathBuf, PathBuf) {
    let tb = testbed();
    let dir = scratch_dir(name).join("pki");
    std::fs::create_dir(&dir).unwrap();
    for f in ["cacert.pem", "clientcert.pem", "clientkey.pem"] {
        std::fs::copy(tb.dir.join("pki/client").join(f), dir.join(f)).unwrap();
    }
    std::fs::set_permissions(
        dir.join("clientkey.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let uri = format!("qemu+tls://localhost/system?pkipath={}", dir.display());
    let config = tb.config_with(name, json!({"libvirt": {"uri": uri}}));
    (dir, config)
}

/// A new client key and certificate from the test bed's CA, valid from
/// `start` to `end` (openssl's YYYYMMDDHHMMSSZ), written into `pki`; the
/// key made by `openssl genpkey KEY_ARGS...`.
fn issue_client_cert(pki: &Path, start: &str, end: &str, key_args: &[&str]) {
    let tb = testbed();
    let ca = tb.dir.join("pki/ca");
    let work = pki.parent().unwrap().join("ca-work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("index.txt"), "").unwrap();
    std::fs::write(work.join("serial"), "1000\n").unwrap();
    std::fs::write(
        work.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\nunique_subject = no\nx509_extensions = ext\n\
         [p]\ncommonName = supplied\n[ext]\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\nextendedKeyUsage = clientAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .current_dir(&work)
        .arg("genpkey")
        .args(key_args)
        .args(["-out", "key.pem"]));
    run(Command::new("openssl")
        .current_dir(&work)
        .args(["req", "-new", "-key", "key.pem"])
        .args(["-subj", "/O=cpi-testbed/CN=cpi-client"])
        .args(["-out", "req.csr"]));
    run(Command::new("openssl")
        .current_dir(&work)
        .args(["ca", "-batch", "-notext", "-config", "ca.cnf"])
        .arg("-cert")
        .arg(ca.join("cacert.pem"))
        .arg("-keyfile")
        .arg(ca.join("cakey.pem"))
        .args(["-startdate", start, "-enddate", end])
        .args(["-in", "req.csr", "-out", "cert.pem"]));
    std::fs::copy(work.join("cert.pem"), pki.join("clientcert.pem")).unwrap();
    std::fs::copy(work.join("key.pem"), pki.join("clientkey.pem")).unwrap();
}

const RSA: &[&str] = &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"];

/// openssl's date form, `days` from now.
fn openssl_date(days: i64) -> String {
    let out = Command::new("date")
        .args(["-u", "-d", &format!("{days} days"), "+%Y%m%d%H%M%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn virsh_finds(args: &[&str]) -> bool {
    testbed().virsh(args).status.success()
}

/// A name no other test uses.
fn unique(kind: &str) -> String {
    format!("cpi-check-{kind}-{}", uuid_like())
}

#[test]
fn the_test_beds_own_config_passes_with_every_check_reported() {
    let tb = testbed();
    tb.pool_in_use();
    let (code, report) = check(&tb.config, &[]);
    assert_eq!(errors(&report), Vec::<&Value>::new(), "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "warning", "the test bed runs TCG");
    for name in [
        "config",
        "tls.ca",
        "tls.client_cert",
        "tls.signed_by",
        "tls.client_key",
        "connection",
        "versions",
        "domain_type",
        "pool",
        "pool.space",
        "pool.qemu_access",
        "network",
        "network.dhcp",
    ] {
        assert!(!findings(&report, name).is_empty(), "no {name}: {report:#}");
    }
    // The versions are the ones libvirt itself reports.
    let version = tb.virsh_ok(&["version"]);
    let field = |label: &str| {
        version
            .lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap()
            .trim()
            .rsplit(' ')
            .next()
            .unwrap()
            .to_string()
    };
    expect(
        &report,
        "versions",
        "ok",
        &format!(
            "libvirt {}, QEMU {}",
            field("Using API: QEMU"),
            field("Running hypervisor: QEMU")
        ),
    );
    let tcg = expect(&report, "domain_type", "warning", "TCG");
    assert!(
        tcg["fix"].as_str().unwrap().contains("domain_type"),
        "{tcg}"
    );
    expect(&report, "pool", "ok", "active at");
    expect(&report, "pool.qemu_access", "ok", "can reach");
    expect(&report, "network.dhcp", "ok", "10.253.77.0/24");
    // Every finding that is not ok says what to do.
    for f in report["findings"].as_array().unwrap() {
        assert_eq!(f["status"] == "ok", f.get("fix").is_none(), "{f}");
    }
}

#[test]
fn the_text_report_has_a_line_per_finding_and_the_fixes() {
    let tb = testbed();
    let out = Command::new(env!("CARGO_BIN_EXE_cpi"))
        .args(["check", "--static", "10.253.77.200"])
        .arg(&tb.config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_with_timeout(out, CPI_CALL_TIMEOUT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("error    network.dhcp ") && l.contains("10.253.77.200")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.trim_start().starts_with("fix: keep BOSH's static")),
        "{text}"
    );
    assert!(
        text.trim_end().ends_with("1 warning, 1 error"),
        "summary line: {text}"
    );
}

#[test]
fn kvm_is_reported_as_libvirt_finds_it_on_this_host() {
    let tb = testbed();
    let config = tb.config_with("kvm", json!({"libvirt": {"domain_type": "kvm"}}));
    let (code, report) = check(&config, &[]);
    let libvirt_says = tb
        .virsh(&["domcapabilities", "--virttype", "kvm", "--machine", "q35"])
        .status
        .success();
    if libvirt_says {
        expect(&report, "domain_type", "ok", "kvm available");
        assert_eq!(code, 0, "{report:#}");
    } else {
        let f = expect(&report, "domain_type", "error", "kvm cannot run");
        assert!(f["fix"].as_str().unwrap().contains("/dev/kvm"), "{f}");
        assert_eq!(code, 1);
    }
}

#[test]
fn a_client_cert_from_another_ca_is_an_error() {
    let tb = testbed();
    let (pki, config) = pki_copy("wrong-ca");
    for f in ["clientcert.pem", "clientkey.pem"] {
        std::fs::copy(tb.dir.join("pki/rogue").join(f), pki.join(f)).unwrap();
    }
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "tls.signed_by", "error", "is not signed by the CA");
    assert!(f["message"].as_str().unwrap().contains("ROGUE"), "{f}");
    assert!(
        f["fix"].as_str().unwrap().contains("CA libvirtd trusts"),
        "{f}"
    );
    // The key is still the certificate's own: only the CA is wrong.
    expect(&report, "tls.client_key", "ok", "is the key of");
    expect(&report, "connection", "error", "connecting to libvirt");
}

#[test]
fn an_expired_client_cert_is_an_error_and_one_expiring_soon_a_warning() {
    let (pki, config) = pki_copy("expired");
    issue_client_cert(&pki, "20200101000000Z", "20200201000000Z", RSA);
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1, "{report:#}");
    let f = expect(&report, "tls.client_cert", "error", "expired on 2020-02-01");
    assert!(
        f["fix"].as_str().unwrap().contains("issue a new one"),
        "{f}"
    );
    expect(&report, "tls.signed_by", "ok", "cpi-testbed CA");
    expect(&report, "tls.client_key", "ok", "is the key of");

    let (pki, config) = pki_copy("expiring");
    issue_client_cert(&pki, &openssl_date(-1), &openssl_date(10), RSA);
    let (code, report) = check(&config, &[]);
    let f = expect(&report, "tls.client_cert", "warning", "expires on");
    let m = f["message"].as_str().unwrap();
    assert!(
        m.contains("(in 9 days)") || m.contains("(in 10 days)"),
        "{f}"
    );
    // Still valid: libvirt connects, and a warning is no failure.
    expect(&report, "connection", "ok", "connected");
    assert_eq!(code, 0, "{report:#}");
}

#[test]
fn a_key_that_is_not_the_certificates_is_an_error() {
    let (pki, config) = pki_copy("wrong-key");
    run(Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(pki.join("clientkey.pem")));
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(
        &report,
        "tls.client_key",
        "error",
        "is not the private key of",
    );
    assert!(f["fix"].as_str().unwrap().contains("private_key"), "{f}");
    expect(&report, "tls.signed_by", "ok", "signed by");
}

/// The bosh CLI's certificate variables carry PKCS#1 RSA keys ("RSA PRIVATE
/// KEY"), openssl writes PKCS#8; EC keys are checked too.
#[test]
fn keys_in_the_formats_the_cli_and_openssl_write_are_matched() {
    let (pki, config) = pki_copy("pkcs1");
    let pkcs8 = std::fs::read_to_string(pki.join("clientkey.pem")).unwrap();
    assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
    run(Command::new("openssl")
        .args(["rsa", "-traditional", "-in"])
        .arg(pki.join("clientkey.pem"))
        .arg("-out")
        .arg(pki.join("clientkey.pem")));
    let pkcs1 = std::fs::read_to_string(pki.join("clientkey.pem")).unwrap();
    assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"));
    let (code, report) = check(&config, &[]);
    expect(&report, "tls.client_key", "ok", "is the key of");
    expect(&report, "connection", "ok", "connected");
    assert_eq!(code, 0, "{report:#}");

    let (pki, config) = pki_copy("ec");
    let ec = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"];
    issue_client_cert(&pki, &openssl_date(-1), &openssl_date(400), &ec);
    let (_, report) = check(&config, &[]);
    expect(&report, "tls.client_key", "ok", "is the key of");
    expect(&report, "tls.signed_by", "ok", "cpi-testbed CA");
    // Another EC key is not the certificate's.
    run(Command::new("openssl")
        .arg("genpkey")
        .args(ec)
        .arg("-out")
        .arg(pki.join("clientkey.pem")));
    let (code, report) = check(&config, &[]);
    expect(
        &report,
        "tls.client_key",
        "error",
        "is not the private key of",
    );
    assert_eq!(code, 1);
}

#[test]
fn missing_tls_files_are_named() {
    let (pki, config) = pki_copy("no-files");
    std::fs::remove_file(pki.join("clientcert.pem")).unwrap();
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "tls.client_cert", "error", "clientcert.pem");
    assert!(f["fix"].as_str().unwrap().contains("pkipath"), "{f}");
}

#[test]
fn an_unreachable_libvirtd_is_an_error_with_the_transports_hint() {
    let tb = testbed();
    let config = tb.config_with(
        "unreachable",
        json!({"libvirt": {"uri": tb.uri.replace("localhost/system", "localhost:1/system")}}),
    );
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "connection", "error", "connecting to libvirt");
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("listening for TLS on port 1 "),
        "{f}"
    );
    // The material is fine, and nothing after the connection is claimed.
    expect(&report, "tls.client_key", "ok", "is the key of");
    assert!(findings(&report, "pool").is_empty(), "{report:#}");
}

#[test]
fn a_missing_pool_is_judged_by_what_the_cpi_would_do_and_not_created() {
    let tb = testbed();
    let scratch = scratch_dir("pool-missing");
    let name = unique("pool");

    // Creatable: the CPI makes it on first use.
    let path = scratch.join("new/pool");
    let config = tb.config_with(
        "pool-creatable",
        json!({"pool": {"name": name, "path": path, "create": true}}),
    );
    let (code, report) = check(&config, &[]);
    expect(&report, "pool", "ok", "creates it at");
    expect(&report, "pool.space", "ok", "free");
    assert_eq!(code, 0, "{report:#}");

    // Under a regular file: it can never be made.
    std::fs::write(scratch.join("afile"), "").unwrap();
    let config = tb.config_with(
        "pool-not-creatable",
        json!({"pool": {"name": name, "path": scratch.join("afile/pool"), "create": true}}),
    );
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "pool", "error", "is not a directory");
    assert!(f["fix"].as_str().unwrap().contains("pool.path"), "{f}");

    // Not to be created by the CPI.
    let config = tb.config_with(
        "pool-no-create",
        json!({"pool": {"name": name, "path": path, "create": false}}),
    );
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "pool", "error", "does not exist");
    assert!(f["fix"].as_str().unwrap().contains("pool.create"), "{f}");

    assert!(
        !virsh_finds(&["pool-info", &name]),
        "the check defined {name}"
    );
    assert!(!path.exists(), "the check made {}", path.display());
}

#[test]
fn a_pool_directory_qemu_cannot_reach_is_an_error() {
    let tb = testbed();
    let scratch = scratch_dir("pool-private");
    let private = scratch.join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    let config = tb.config_with(
        "pool-private",
        json!({"pool": {"name": unique("pool"), "path": private.join("pool"), "create": true}}),
    );
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1, "{report:#}");
    let f = expect(&report, "pool.qemu_access", "error", "cannot enter");
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains(&private.display().to_string()),
        "{f}"
    );
    assert!(f["fix"].as_str().unwrap().starts_with("chmod o+x"), "{f}");
}

#[test]
fn a_missing_network_is_judged_by_what_the_cpi_would_do_and_not_created() {
    let tb = testbed();
    let name = unique("net");
    let config = tb.config_with("net-missing", json!({"network": {"name": name}}));
    // Without network.subnet (config_with can only add keys).
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&config).unwrap()).unwrap();
    cfg["network"].as_object_mut().unwrap().remove("subnet");
    std::fs::write(&config, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "network", "error", "does not exist");
    assert!(f["fix"].as_str().unwrap().contains("network.subnet"), "{f}");

    // With a subnet the CPI creates it, unless another network is on it
    // (other checkouts' tests make networks too: a third octet nobody uses).
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let (code, report, octet) = (0..8)
        .map(|i| {
            let octet = 100 + (seed / 1000 + i * 37) % 150;
            let config = tb.config_with(
                "net-creatable",
                json!({"network": {"name": name, "subnet": format!("10.254.{octet}.0/24")}}),
            );
            let statics = format!("10.254.{octet}.10-10.254.{octet}.20");
            let (code, report) = check(&config, &["--static", &statics]);
            (code, report, octet)
        })
        .find(|(_, r, _)| {
            !findings(r, "network")[0]["message"]
                .as_str()
                .unwrap()
                .contains("overlapping")
        })
        .expect("a free subnet in 8 tries");
    expect(&report, "network", "ok", "creates it on first use");
    // The DHCP range the CPI would give it is the upper half.
    expect(
        &report,
        "network.dhcp",
        "ok",
        &format!("10.254.{octet}.128-10.254.{octet}.254"),
    );
    assert_eq!(code, 0, "{report:#}");

    // Another network on that subnet (defined, not started: the CPI's
    // define would clash with it all the same). Made here, as on a fresh
    // machine nothing has made the test bed's own network yet.
    let other = unique("net-other");
    let xml = std::env::temp_dir().join(format!("{other}.xml"));
    std::fs::write(
        &xml,
        format!(
            "<network><name>{other}</name><ip address='10.254.{octet}.1' netmask='255.255.255.0'/></network>"
        ),
    )
    .unwrap();
    assert!(virsh_finds(&["net-define", xml.to_str().unwrap()]));
    let config = tb.config_with(
        "net-clash",
        json!({"network": {"name": name, "subnet": format!("10.254.{octet}.0/24")}}),
    );
    let (code, report) = check(&config, &[]);
    assert!(virsh_finds(&["net-undefine", &other]));
    let _ = std::fs::remove_file(&xml);
    assert_eq!(code, 1, "{report:#}");
    expect(&report, "network", "error", &other);

    assert!(
        !virsh_finds(&["net-info", &name]),
        "the check defined {name}"
    );
}

#[test]
fn static_ips_in_the_dhcp_range_or_outside_the_subnet_are_errors() {
    let tb = testbed();
    let (code, report) = check(&tb.config, &["--static", "10.253.77.2-10.253.77.127"]);
    expect(
        &report,
        "network.dhcp",
        "ok",
        "10.253.77.2-10.253.77.127 outside it",
    );
    assert_eq!(code, 0, "{report:#}");

    let (code, report) = check(&tb.config, &["--static", "10.253.77.100-10.253.77.130"]);
    assert_eq!(code, 1);
    let f = expect(
        &report,
        "network.dhcp",
        "error",
        "overlaps the DHCP range 10.253.77.128-10.253.77.254",
    );
    assert!(f["fix"].as_str().unwrap().contains("reserved"), "{f}");

    let (code, report) = check(&tb.config, &["--static", "10.0.16.6"]);
    assert_eq!(code, 1);
    expect(
        &report,
        "network.dhcp",
        "error",
        "is not in libvirt network",
    );

    // A director's own address, from agent.mbus, counts as a static IP.
    let config = tb.config_with(
        "mbus-in-dhcp",
        json!({"agent": {"mbus": "nats://nats:pw@10.253.77.200:4222"}}),
    );
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    expect(
        &report,
        "network.dhcp",
        "error",
        "10.253.77.200 (agent.mbus)",
    );
}

/// A config reaching the test bed over its sshd with libvirt's libssh
/// client, the key and known_hosts beside cpi.json as the job renders them.
fn ssh_config(name: &str, known_hosts: &str, key_mode: u32) -> PathBuf {
    let tb = testbed();
    let uri = format!(
        "qemu+libssh://root@127.0.0.1:{SSH_PORT}/system?keyfile=ssh/private_key&known_hosts=ssh/known_hosts"
    );
    let config = tb.config_with(name, json!({"libvirt": {"uri": uri}}));
    let dir = config.parent().unwrap().join("ssh");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        tb.dir.join("ssh/client/id_ed25519"),
        dir.join("private_key"),
    )
    .unwrap();
    std::fs::set_permissions(
        dir.join("private_key"),
        std::fs::Permissions::from_mode(key_mode),
    )
    .unwrap();
    std::fs::write(dir.join("known_hosts"), known_hosts).unwrap();
    config
}

#[test]
fn ssh_material_good_and_broken() {
    let tb = testbed();
    let pinned = std::fs::read_to_string(tb.dir.join("ssh/known_hosts")).unwrap();

    let (code, report) = check(&ssh_config("ssh-good", &pinned, 0o600), &[]);
    expect(&report, "ssh.keyfile", "ok", "unencrypted private key");
    expect(&report, "ssh.known_hosts", "ok", "[127.0.0.1]:2222");
    expect(&report, "connection", "ok", "over ssh");
    assert_eq!(code, 0, "{report:#}");
    assert!(findings(&report, "tls.ca").is_empty());

    let (code, report) = check(&ssh_config("ssh-0644", &pinned, 0o644), &[]);
    assert_eq!(code, 1);
    let f = expect(&report, "ssh.keyfile", "error", "mode 0644");
    assert!(f["fix"].as_str().unwrap().starts_with("chmod 600 "), "{f}");

    // Pinned for the host on port 22, not for port 2222: no entry.
    let other = pinned.replace("[127.0.0.1]:2222", "127.0.0.1");
    let (code, report) = check(&ssh_config("ssh-no-entry", &other, 0o600), &[]);
    assert_eq!(code, 1);
    let f = expect(
        &report,
        "ssh.known_hosts",
        "error",
        "no key for [127.0.0.1]:2222",
    );
    assert!(
        f["fix"]
            .as_str()
            .unwrap()
            .contains("ssh-keyscan -p 2222 127.0.0.1"),
        "{f}"
    );
}

#[test]
fn json_shape_and_exit_statuses() {
    let tb = testbed();
    // A config the CPI refuses: one finding, and the check stops there.
    let config = tb.config_with("bad-config", json!({"pool": {"colour": "blue"}}));
    let (code, report) = check(&config, &[]);
    assert_eq!(code, 1);
    assert_eq!(report["status"], "error");
    assert_eq!(report["config"], config.display().to_string());
    assert_eq!(
        report["summary"],
        json!({"ok": 0, "warning": 0, "error": 1})
    );
    let f = expect(&report, "config", "error", "unknown field `colour`");
    assert_eq!(
        f.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["check", "fix", "message", "status"]
    );

    // The summary counts what the findings say.
    let (_, report) = check(&tb.config, &[]);
    let count = |s: &str| {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["status"] == s)
            .count()
    };
    for s in ["ok", "warning", "error"] {
        assert_eq!(report["summary"][s], json!(count(s)), "{s}: {report:#}");
    }

    // A bad command line: status 2, usage on stderr, nothing on stdout.
    for args in [
        &["check"][..],
        &["check", "--colour", "x.json"],
        &["check", "--static", "nope", "x.json"],
    ] {
        let child = Command::new(env!("CARGO_BIN_EXE_cpi"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_timeout(child, CPI_CALL_TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("usage: cpi check"),
            "{args:?}"
        );
    }
}

#[test]
fn an_existing_pool_elsewhere_than_pool_path_is_a_warning() {
    let tb = testbed();
    tb.pool_in_use();
    let config = tb.config_with(
        "pool-elsewhere",
        json!({"pool": {"path": "/var/lib/libvirt/elsewhere"}}),
    );
    let (code, report) = check(&config, &[]);
    let f = expect(
        &report,
        "pool.path",
        "warning",
        "/var/lib/libvirt/elsewhere",
    );
    assert!(
        f["message"]
            .as_str()
            .unwrap()
            .contains("uses the pool as it is"),
        "{f}"
    );
    assert_eq!(code, 0, "{report:#}");
}
