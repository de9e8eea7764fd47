//! Several hosts, as a director with a cpi-config drives them: one named CPI
//! per host, each CPI's properties merged at the top level of every request's
//! `context` (cpi-contract.md 1.2), over the same cpi.json.
//!
//! This machine has one libvirtd, so "host 2" is another URI to it over the
//! same transport (`qemu+tls://127.0.0.1/...` where cpi.json says
//! `localhost`), another pool and another NAT network. Storage is what tells
//! hosts apart here: a stemcell or disk CID of one host is absent on the
//! other. Domains are machine-wide in one libvirtd, so `has_vm` cannot tell
//! the two apart on this machine; what a VM made for host 2 shows is that it
//! lives in host 2's pool and network, and that host 1's stemcell CID is
//! unknown there.

mod common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// A request as the director sends it with a cpi-config: the CPI's
/// properties (`props`) at the top level of the context.
fn call_as(config: &Path, props: &Value, method: &str, arguments: Value) -> Value {
    let mut context = json!({"director_uuid": DIRECTOR_UUID, "request_id": "cpi-424242"});
    for (k, v) in props.as_object().unwrap() {
        context[k] = v.clone();
    }
    let request =
        json!({"method": method, "arguments": arguments, "context": context, "api_version": 2});
    run_cpi_raw(Some(config), &serde_json::to_vec(&request).unwrap()).response
}

fn ok_as(config: &Path, props: &Value, method: &str, arguments: Value) -> Value {
    let r = call_as(config, props, method, arguments.clone());
    assert!(
        r["error"].is_null(),
        "{method} {arguments} with context {props} failed: {}",
        r["error"]
    );
    r["result"].clone()
}

fn pool_volumes(tb: &Testbed, pool: &str) -> Vec<String> {
    let _ = tb.virsh(&["pool-refresh", pool]);
    tb.virsh_ok(&["vol-list", pool])
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

/// Host 2's pool and network, made beforehand (as an operator makes them
/// on a host: a context may not set pool.path or pool.create), removed on
/// drop with whatever is left in them.
struct Host2 {
    pool: String,
    pool_dir: std::path::PathBuf,
    network: String,
    props: Value,
}

impl Host2 {
    fn new() -> Host2 {
        let tb = testbed();
        let id = uuid_like();
        let pool = format!("cpi-testbed-host2-{id}");
        let network = format!("cpi-testbed-h2-{}", &id[id.len() - 6..]);
        let pool_dir = scratch_dir("host2-pool").join("pool");
        std::fs::create_dir(&pool_dir).unwrap();
        let dir = pool_dir.to_str().unwrap();
        tb.virsh_ok(&["pool-define-as", &pool, "dir", "--target", dir]);
        tb.virsh_ok(&["pool-start", &pool]);
        let octet = 10 + uuid::Uuid::new_v4().as_bytes()[0] % 240;
        let subnet = format!("10.252.{octet}.0/24");
        // The test bed's URI names `localhost`; host 2 is 127.0.0.1, same PKI.
        let uri = tb.uri.replace("://localhost/", "://127.0.0.1/");
        assert_ne!(uri, tb.uri);
        let props = json!({
            "libvirt": {"uri": uri},
            "pool": {"name": pool},
            "network": {"name": network, "subnet": subnet},
        });
        Host2 {
            pool,
            pool_dir,
            network,
            props,
        }
    }
}

impl Drop for Host2 {
    fn drop(&mut self) {
        let tb = testbed();
        for vol in pool_volumes(tb, &self.pool) {
            let _ = tb.virsh(&["vol-delete", &vol, "--pool", &self.pool]);
        }
        // The staging pool the CPI made inside it (src/libvirt/staging.rs) too.
        for pool in [format!("{}-staging", self.pool), self.pool.clone()] {
            let _ = tb.virsh(&["pool-destroy", &pool]);
            let _ = tb.virsh(&["pool-undefine", &pool]);
        }
        let _ = tb.virsh(&["net-destroy", &self.network]);
        let _ = tb.virsh(&["net-undefine", &self.network]);
        let _ = std::fs::remove_dir_all(&self.pool_dir);
    }
}

#[test]
fn requests_with_another_hosts_properties_act_there_and_the_file_defaults_act_on_the_first() {
    let tb = testbed();
    let config = &tb.config;
    let host1 = json!({}); // a director without cpi-config properties: cpi.json alone
    let host2 = Host2::new();
    let h2 = &host2.props;
    let pool1 = tb.pool_name();
    let image = tb.stemcell_dir("qcow2").join("image");
    let props =
        json!({"name": "bosh-libvirt-test", "version": "1.0", "disk": 64, "disk_format": "qcow2"});
    let mut cleanup: Vec<(Value, &str, String)> = Vec::new();

    // Every call below through `call_as`, recorded for cleanup in reverse.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // Stemcells land in their own host's pool only.
        let sc1 = ok_as(config, &host1, "create_stemcell", json!([image, props]));
        let sc1 = sc1.as_str().unwrap().to_string();
        cleanup.push((host1.clone(), "delete_stemcell", sc1.clone()));
        let sc2 = ok_as(config, h2, "create_stemcell", json!([image, props]));
        let sc2 = sc2.as_str().unwrap().to_string();
        cleanup.push((h2.clone(), "delete_stemcell", sc2.clone()));
        let (v1, v2) = (pool_volumes(tb, &pool1), pool_volumes(tb, &host2.pool));
        assert!(
            v1.contains(&sc1) && !v2.contains(&sc1),
            "{sc1}: {v1:?} / {v2:?}"
        );
        assert!(
            v2.contains(&sc2) && !v1.contains(&sc2),
            "{sc2}: {v1:?} / {v2:?}"
        );

        // Disks: made, found and deleted on their own host, absent on the other.
        let d1 = ok_as(config, &host1, "create_disk", json!([16, {}, null]));
        let d1 = d1.as_str().unwrap().to_string();
        cleanup.push((host1.clone(), "delete_disk", d1.clone()));
        let d2 = ok_as(config, h2, "create_disk", json!([16, {}, null]));
        let d2 = d2.as_str().unwrap().to_string();
        cleanup.push((h2.clone(), "delete_disk", d2.clone()));
        assert!(pool_volumes(tb, &host2.pool).contains(&d2));
        assert_eq!(ok_as(config, &host1, "has_disk", json!([d1])), json!(true));
        assert_eq!(ok_as(config, h2, "has_disk", json!([d2])), json!(true));
        assert_eq!(ok_as(config, h2, "has_disk", json!([d1])), json!(false));
        assert_eq!(ok_as(config, &host1, "has_disk", json!([d2])), json!(false));
        // delete_disk of a CID the host does not have leaves the other's alone.
        ok_as(config, h2, "delete_disk", json!([d1]));
        assert_eq!(ok_as(config, &host1, "has_disk", json!([d1])), json!(true));

        // A VM for host 2: host 1's stemcell is unknown there; with its own
        // it boots from host 2's pool on host 2's network (which the CPI
        // creates from the context's subnet).
        let nets = json!({"default": {"type": "dynamic", "cloud_properties": {}}});
        let r = call_as(
            config,
            h2,
            "create_vm",
            json!(["agent-host2", sc1, {"memory": 64}, nets, [], {}]),
        );
        assert!(
            r["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(&sc1)),
            "host 1's stemcell on host 2: {r}"
        );
        let vm = ok_as(
            config,
            h2,
            "create_vm",
            json!(["agent-host2", sc2, {"memory": 64}, nets, [], {}]),
        );
        let vm = vm[0].as_str().unwrap().to_string();
        cleanup.push((h2.clone(), "delete_vm", vm.clone()));
        let xml = tb.virsh_ok(&["dumpxml", &vm]);
        assert!(
            xml.contains(&format!("<source network='{}'", host2.network)),
            "{xml}"
        );
        assert!(
            xml.contains(&format!("pool='{}'", host2.pool))
                || xml.contains(host2.pool_dir.to_str().unwrap()),
            "{xml}"
        );
        assert!(pool_volumes(tb, &host2.pool)
            .iter()
            .any(|v| v.starts_with(&vm)));
        assert!(!pool_volumes(tb, &pool1).iter().any(|v| v.starts_with(&vm)));
        assert_eq!(ok_as(config, h2, "has_vm", json!([vm])), json!(true));
        ok_as(config, h2, "delete_vm", json!([vm]));
        assert_eq!(ok_as(config, h2, "has_vm", json!([vm])), json!(false));
        assert!(!pool_volumes(tb, &host2.pool)
            .iter()
            .any(|v| v.starts_with(&vm)));

        // Each host deletes its own.
        ok_as(config, &host1, "delete_disk", json!([d1]));
        ok_as(config, h2, "delete_disk", json!([d2]));
        assert_eq!(ok_as(config, &host1, "has_disk", json!([d1])), json!(false));
        assert_eq!(ok_as(config, h2, "has_disk", json!([d2])), json!(false));
        ok_as(config, h2, "delete_stemcell", json!([sc2]));
        ok_as(config, &host1, "delete_stemcell", json!([sc1]));
        assert!(!pool_volumes(tb, &host2.pool).contains(&sc2));
        assert!(!pool_volumes(tb, &pool1).contains(&sc1));
    }));
    for (props, method, cid) in cleanup.iter().rev() {
        let _ = call_as(config, props, method, json!([cid]));
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// What a cpi-config may not do through the context, through the binary:
/// move storage or loosen the transport. (Unit tests cover every key.)
#[test]
fn a_hosts_properties_cannot_move_storage_or_switch_transport() {
    let tb = testbed();
    for (props, expect) in [
        (json!({"pool": {"name": "p", "path": "/etc"}}), "pool.path"),
        (
            json!({"libvirt": {"uri": "qemu+tcp://127.0.0.1/system"}}),
            "tcp transport where the config file's uses tls",
        ),
        (
            json!({"libvirt": {"insecure_skip_tls_verify": true}}),
            "libvirt.insecure_skip_tls_verify",
        ),
    ] {
        let r = call_as(
            &tb.config,
            &props,
            "has_disk",
            json!(["disk-000000000000000"]),
        );
        let m = r["error"]["message"].as_str().unwrap_or_default();
        assert!(
            m.contains("invalid request context") && m.contains(expect),
            "{props}: {r}"
        );
    }
}
