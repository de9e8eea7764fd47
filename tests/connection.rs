//! The binary reaches the real libvirtd over TLS, and a client without the
//! right certificate is refused with a clear CloudError.

mod common;

use common::*;
use serde_json::json;

#[test]
fn has_vm_over_tls_reaches_libvirt() {
    let tb = testbed();
    assert!(
        tb.uri.starts_with("qemu+tls://"),
        "the test bed must use TLS: {}",
        tb.uri
    );
    let absent = "vm-00000000-0000-4000-8000-000000000000";
    assert_eq!(ok(&tb.config, "has_vm", json!([absent])), json!(false));
    // A CID that is not ours is absent too, without a libvirt error.
    assert_eq!(ok(&tb.config, "has_vm", json!(["i-12345"])), json!(false));

    // A domain that really exists (defined by hand, never started) is found.
    let name = format!("vm-{}", uuid::Uuid::new_v4());
    let dir = scratch_dir("has-vm");
    let xml = dir.join("domain.xml");
    std::fs::write(
        &xml,
        format!("<domain type='qemu'><name>{name}</name><memory unit='MiB'>32</memory><os><type arch='x86_64' machine='q35'>hvm</type></os></domain>"),
    )
    .unwrap();
    tb.virsh_ok(&["define", xml.to_str().unwrap()]);
    let found = ok(&tb.config, "has_vm", json!([name]));
    tb.virsh_ok(&["undefine", &name]);
    assert_eq!(found, json!(true));
    assert_eq!(ok(&tb.config, "has_vm", json!([name])), json!(false));
}

fn with_pkipath(tb: &Testbed, name: &str, pki: &str) -> std::path::PathBuf {
    let uri = tb.uri.replace("/pki/client", &format!("/pki/{pki}"));
    assert_ne!(uri, tb.uri);
    tb.config_with(name, json!({"libvirt": {"uri": uri}}))
}

#[test]
fn a_client_without_the_right_certificate_is_refused() {
    let tb = testbed();
    for pki in ["rogue", "nocert"] {
        let cfg = with_pkipath(tb, pki, pki);
        let (t, m) = err(
            &cfg,
            "has_vm",
            json!(["vm-00000000-0000-4000-8000-000000000000"]),
        );
        assert_eq!(t, "CloudError", "{pki}: {m}");
        assert!(
            m.starts_with("connecting to libvirt at qemu+tls://"),
            "{pki}: {m}"
        );
        assert!(
            m.contains("TLS") && m.contains("certificate"),
            "{pki}: the reason should name TLS and the certificate: {m}"
        );
    }
}

#[test]
fn an_unreachable_host_is_a_cloud_error_not_a_hang() {
    let tb = testbed();
    // Nothing listens on this loopback port.
    let uri = tb.uri.replace("localhost/system", "localhost:1/system");
    let cfg = tb.config_with("unreachable", json!({"libvirt": {"uri": uri}}));
    let (t, m) = err(
        &cfg,
        "has_vm",
        json!(["vm-00000000-0000-4000-8000-000000000000"]),
    );
    assert_eq!(t, "CloudError");
    assert!(m.contains("connecting to libvirt"), "{m}");
}
