//! The envelope through the built binary, as the director runs it: every
//! malformed input still yields one valid response and exit 0.

mod common;

use common::*;
use serde_json::json;

fn static_config() -> std::path::PathBuf {
    let dir = scratch_dir("envelope");
    let path = dir.join("cpi.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({
            "libvirt": {"uri": "test:///default", "domain_type": "qemu"},
            "pool": {"name": "p"}, "network": {"name": "n"},
            "agent": {"mbus": "nats://1.2.3.4:4222"},
            "stemcell_formats": ["openstack-qcow2"]
        }))
        .unwrap(),
    )
    .unwrap();
    path
}

fn error_of(config: Option<&std::path::Path>, stdin: &[u8]) -> (String, String) {
    let r = run_cpi_raw(config, stdin).response;
    assert!(
        !r["error"].is_null(),
        "expected an error for {:?}: {r}",
        String::from_utf8_lossy(stdin)
    );
    (
        r["error"]["type"].as_str().unwrap().to_string(),
        r["error"]["message"].as_str().unwrap().to_string(),
    )
}

#[test]
fn malformed_input_gets_a_typed_error() {
    let cfg = static_config();
    let cases: &[(&[u8], &str)] = &[
        (b"", "empty request"),
        (b"not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "UTF-8"),
        (b"[]", "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"null", "must be a JSON object"),
        (b"{\"arguments\":[]}", "Must provide 'method' key"),
        (
            b"{\"method\":7,\"arguments\":[]}",
            "'method' must be a non-empty string",
        ),
        (b"{\"method\":\"info\"}", "Must provide 'arguments' key"),
        (
            b"{\"method\":\"info\",\"arguments\":\"x\"}",
            "'arguments' must be an array",
        ),
        (
            b"{\"method\":\"has_vm\",\"arguments\":[]}",
            "expected 1 arguments",
        ),
        (
            b"{\"method\":\"has_vm\",\"arguments\":[{}]}",
            "(vm_cid) must be a non-empty string",
        ),
        (
            b"{\"method\":\"create_disk\",\"arguments\":[\"big\",{},null]}",
            "(size) must be a positive integer",
        ),
        (
            b"{\"method\":\"info\",\"arguments\":[]}{\"method\":\"info\",\"arguments\":[]}",
            "not valid JSON",
        ),
    ];
    for (input, wanted) in cases {
        let (t, m) = error_of(Some(&cfg), input);
        assert_eq!(
            t,
            "Bosh::Clouds::CpiError",
            "type for {:?}",
            String::from_utf8_lossy(input)
        );
        assert!(
            m.contains(wanted),
            "{:?}: message {m:?} lacks {wanted:?}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn unknown_method_is_not_implemented() {
    let cfg = static_config();
    let (t, m) = error_of(Some(&cfg), &director_request("create_network", json!([{}])));
    assert_eq!(t, "Bosh::Clouds::NotImplemented");
    assert_eq!(
        m,
        "Must call implemented method: Unknown method 'create_network'"
    );
}

#[test]
fn info_answers_from_config_without_libvirt() {
    // The URI points nowhere reachable: info must not care.
    let dir = scratch_dir("info");
    let cfg = dir.join("cpi.json");
    std::fs::write(&cfg, br#"{"libvirt":{"uri":"qemu+tls://nowhere.invalid/system"},"pool":{"name":"p"},"network":{"name":"n"},"agent":{"mbus":"m"}}"#).unwrap();
    for request in [
        br#"{"method":"info","arguments":[],"context":{"director_uuid":"d","request_id":"cpi-482913"}}"#.to_vec(),
        br#"{"method":"info","arguments":[],"context":{"director_uuid":"d","vm":{"stemcell":{"api_version":3}}},"api_version":1}"#.to_vec(),
    ] {
        let r = run_cpi_raw(Some(&cfg), &request);
        assert_eq!(
            (&r.response["result"], &r.response["error"]),
            (
                &json!({"api_version": 2, "stemcell_formats": ["openstack-qcow2", "openstack-raw"]}),
                &json!(null)
            )
        );
        assert!(r.response["log"].as_str().unwrap().contains("api_version"));
    }
    let r = run_cpi_raw(Some(&static_config()), &director_request("info", json!([])));
    assert_eq!(
        r.response["result"]["stemcell_formats"],
        json!(["openstack-qcow2"])
    );
}

#[test]
fn missing_or_invalid_config_is_a_cloud_error() {
    let request = director_request("info", json!([]));
    let (t, m) = error_of(None, &request);
    assert_eq!(t, "Bosh::Clouds::CloudError");
    assert!(m.contains("no config file"), "{m}");

    let missing = scratch_dir("cfg").join("absent.json");
    let (t, m) = error_of(Some(&missing), &request);
    assert_eq!(t, "Bosh::Clouds::CloudError");
    assert!(m.contains("reading config file"), "{m}");

    let dir = scratch_dir("cfg");
    let bad = dir.join("bad.json");
    std::fs::write(&bad, b"{not json").unwrap();
    assert!(error_of(Some(&bad), &request).1.contains("not valid JSON"));

    std::fs::write(&bad, br#"{"libvirt":{"uri":"test:///default","colour":1},"pool":{"name":"p"},"network":{"name":"n"},"agent":{"mbus":"m"}}"#).unwrap();
    let (_, m) = error_of(Some(&bad), &request);
    assert!(
        m.contains("libvirt.colour") && m.contains("unknown field"),
        "{m}"
    );

    std::fs::write(
        &bad,
        br#"{"libvirt":{"uri":"test:///default"},"pool":{"name":"p"},"network":{"name":"n"}}"#,
    )
    .unwrap();
    assert!(error_of(Some(&bad), &request)
        .1
        .contains("missing field `agent`"));
}

#[test]
fn context_overrides_config_like_a_cpi_config() {
    let cfg = static_config();
    let request = serde_json::to_vec(&json!({
        "method": "info", "arguments": [],
        "context": {"director_uuid": "d", "request_id": "cpi-000001", "stemcell_formats": ["openstack-raw"]}
    }))
    .unwrap();
    let r = run_cpi_raw(Some(&cfg), &request);
    assert_eq!(
        r.response["result"]["stemcell_formats"],
        json!(["openstack-raw"])
    );
}

#[test]
fn stderr_lines_carry_the_request_id_and_stdout_holds_only_the_response() {
    let cfg = static_config();
    let r = run_cpi_raw(Some(&cfg), &director_request("has_vm", json!([7])));
    assert!(
        r.stderr.lines().any(|l| l.contains("[cpi-123456]")),
        "stderr: {}",
        r.stderr
    );
    assert_eq!(
        r.stdout.iter().filter(|b| **b == b'\n').count(),
        0,
        "one document, no extra lines"
    );
}

#[test]
fn the_front_executable_does_not_load_libvirt() {
    // `info` is called before nearly every method; loading libvirt and its
    // dependency closure would cost ~11 ms per call.
    let needed = elf_needed(&std::fs::read(env!("CARGO_BIN_EXE_cpi")).unwrap());
    assert!(
        needed.iter().any(|n| n.starts_with("libc.so")),
        "no libc among the NEEDED entries: {needed:?}"
    );
    assert!(
        !needed.iter().any(|n| n.contains("libvirt")),
        "cpi links libvirt: {needed:?}"
    );
    // The same reading finds libvirt where it is linked.
    let worker = elf_needed(&std::fs::read(env!("CARGO_BIN_EXE_cpi-libvirt")).unwrap());
    assert!(
        worker.iter().any(|n| n.starts_with("libvirt.so")),
        "cpi-libvirt: {worker:?}"
    );
}

/// The DT_NEEDED entries of a little-endian ELF64 executable, what
/// `readelf -d` lists as NEEDED: the `.dynamic` section's entries with tag 1,
/// names in the string table its `sh_link` points to (layouts from elf(5)).
fn elf_needed(elf: &[u8]) -> Vec<String> {
    assert!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "not a little-endian ELF64"
    );
    let u = |at: usize, width: usize| -> usize {
        let mut b = [0u8; 8];
        b[..width].copy_from_slice(&elf[at..at + width]);
        u64::from_le_bytes(b) as usize
    };
    let (shoff, shentsize, shnum) = (u(0x28, 8), u(0x3a, 2), u(0x3c, 2));
    let section = |i: usize| shoff + i * shentsize;
    let dynamic = (0..shnum)
        .map(section)
        .find(|&sh| u(sh + 4, 4) == 6) // SHT_DYNAMIC
        .expect("no .dynamic section: a static executable?");
    let strtab = u(section(u(dynamic + 40, 4)) + 24, 8);
    let (start, size) = (u(dynamic + 24, 8), u(dynamic + 32, 8));
    (start..start + size)
        .step_by(16)
        .take_while(|&e| u(e, 8) != 0) // DT_NULL
        .filter(|&e| u(e, 8) == 1) // DT_NEEDED
        .map(|e| {
            let name = &elf[strtab + u(e + 8, 8)..];
            let end = name.iter().position(|&b| b == 0).unwrap();
            String::from_utf8_lossy(&name[..end]).into_owned()
        })
        .collect()
}

/// Operators time calls from the log: one completion line per call, with its
/// outcome and duration, after at most one start line (the front and
/// cpi-libvirt each logged "start" before), and a `log` summary always.
#[test]
fn every_call_ends_with_one_completion_line_and_a_summary() {
    let dir = scratch_dir("envelope-debug");
    let cfg = dir.join("cpi.json");
    let mut doc: serde_json::Value =
        serde_json::from_slice(&std::fs::read(static_config()).unwrap()).unwrap();
    doc["log_level"] = json!("debug");
    std::fs::write(&cfg, serde_json::to_vec(&doc).unwrap()).unwrap();
    let completion = |stderr: &str, method: &str, outcome: &str| -> Vec<u64> {
        stderr
            .lines()
            .filter_map(|l| l.split_once(&format!("{method}: {outcome} ")))
            .filter_map(|(_, rest)| rest.split(" ms").next()?.parse().ok())
            .collect()
    };
    for (method, args) in [("has_vm", json!(["not-a-vm"])), ("info", json!([]))] {
        let r = run_cpi_raw(Some(&cfg), &director_request(method, args));
        assert!(r.response["error"].is_null(), "{}", r.response);
        let done = completion(&r.stderr, method, "done in");
        assert_eq!(done.len(), 1, "one completion line:\n{}", r.stderr);
        assert!(done[0] < 60_000, "{done:?}");
        let starts = r.stderr.lines().filter(|l| l.contains(": start")).count();
        assert!(starts <= 1, "duplicate start lines:\n{}", r.stderr);
        assert!(
            !r.response["log"].as_str().unwrap().is_empty(),
            "{method}: empty log summary"
        );
    }
    let r = run_cpi_raw(Some(&cfg), &director_request("has_vm", json!([7])));
    assert_eq!(
        completion(&r.stderr, "has_vm", "failed after").len(),
        1,
        "{}",
        r.stderr
    );
}
