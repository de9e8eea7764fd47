//! ci/lib.sh, the helpers the ci/ scripts share: run in bash, no test bed.
//! The selection `ci/testbed down` uses (xml_names_path_under) is tested here
//! because `ci/testbed down` itself may not run on a shared test bed.

use std::io::Write;
use std::process::{Command, Stdio};

/// Runs `SCRIPT` in bash after sourcing ci/lib.sh, with `input` on stdin;
/// (exit code, stdout, stderr).
fn lib(script: &str, input: &str) -> (i32, String, String) {
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!(". ci/lib.sh\n{script}"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn json_get_prints_strings_as_is_and_the_rest_as_json() {
    let doc = r#"{"libvirt": {"uri": "qemu:///system"}, "list": ["a", {"b": 1}], "n": 3}"#;
    assert_eq!(lib("json_get - libvirt uri", doc).1, "qemu:///system\n");
    assert_eq!(lib("json_get - list 0", doc).1, "a\n");
    assert_eq!(lib("json_get - list 1", doc).1, "{\"b\": 1}\n");
    assert_eq!(lib("json_get - n", doc).1, "3\n");
    assert_eq!(lib("json_get -", "\"vm-1\"").1, "vm-1\n");
    assert_ne!(lib("json_get - missing", doc).0, 0);
}

#[test]
fn cpi_request_is_a_director_request() {
    let (code, out, _) = lib("cpi_request has_vm '[\"vm-1\"]' bench cpi-000007", "");
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"method": "has_vm", "arguments": ["vm-1"], "api_version": 2,
            "context": {"director_uuid": "bench", "request_id": "cpi-000007"}})
    );
}

#[test]
fn cpi_result_prints_the_result_or_fails_with_the_error() {
    let ok = r#"{"result": ["vm-1", {"n": {}}], "error": null, "log": ""}"#;
    let (code, out, _) = lib("cpi_result", ok);
    assert_eq!((code, out.as_str()), (0, "[\"vm-1\", {\"n\": {}}]\n"));
    let err = r#"{"result": null, "error": {"type": "Bosh::Clouds::VMNotFound", "message": "gone", "ok_to_retry": false}, "log": ""}"#;
    let (code, out, stderr) = lib("cpi_result", err);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(stderr, "error: Bosh::Clouds::VMNotFound: gone\n");
}

#[test]
fn median_of_numbers() {
    assert_eq!(lib("median 3 1 2", "").1, "2.0\n");
    assert_eq!(lib("median 4 1 2 3", "").1, "2.5\n");
}

const TB: &str = "/srv/ci/target/testbed";

fn under(xml: &str) -> bool {
    lib(&format!("xml_names_path_under {TB} /srv/ci/target"), xml).0 == 0
}

#[test]
fn a_domain_with_a_volume_or_console_of_the_test_bed_is_ours() {
    assert!(under(&format!(
        "<domain><name>vm-1</name><devices><disk type='file'><source file='{TB}/pool/vm-1-root'/></disk></devices></domain>"
    )));
    assert!(under(&format!(
        "<domain><name>vm-2</name><devices><disk type='file'><source file='/var/lib/other/vm-2-root'/></disk>\
         <serial type='pty'><log file='{TB}/consoles/vm-2.console.log'/></serial></devices></domain>"
    )));
    // A test's private pool lives under the checkout's target/test-scratch.
    assert!(under(
        "<domain><name>vm-3</name><devices><disk type='file'><source file='/srv/ci/target/test-scratch/p/pool/vm-3-root'/></disk></devices></domain>"
    ));
}

#[test]
fn a_domain_of_anybody_else_is_not_ours() {
    // Somebody's real BOSH VM on the same machine: same vm- prefix, own storage.
    assert!(!under(
        "<domain><name>vm-4</name><devices><disk type='file'><source file='/var/lib/libvirt/images/vm-4-root'/></disk>\
         <serial type='pty'><log file='/var/log/bosh/vm-4.console.log'/></serial></devices></domain>"
    ));
    // A directory that only starts with the checkout's path is not under it.
    assert!(!under(
        "<domain><name>vm-5</name><devices><disk type='file'><source file='/srv/ci/target-other/vm-5-root'/></disk></devices></domain>"
    ));
    // No files at all, a relative path, no XML (the domain vanished meanwhile).
    assert!(!under("<domain><name>vm-6</name></domain>"));
    assert!(!under(
        "<domain><devices><disk><source file='target/testbed/pool/x'/></disk></devices></domain>"
    ));
    assert!(!under(""));
}

#[test]
fn a_pool_is_ours_by_its_target_path() {
    assert!(under(&format!(
        "<pool type='dir'><name>cpi-testbed</name><target><path>{TB}/pool</path></target></pool>"
    )));
    assert!(!under(
        "<pool type='dir'><name>cpi-testbed</name><target><path>/work/other/target/testbed/pool</path></target></pool>"
    ));
}
