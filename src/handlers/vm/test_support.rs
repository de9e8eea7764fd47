//! What the VM handlers' tests share: a fake host holding a stemcell and the
//! config's network, and the requests and records they start from.

use serde_json::{json, Map, Value};

use super::create::{create_vm, CreateVm};
use crate::config::Config;
use crate::error::Result;
use crate::host::fake::FakeHost;
use crate::host::DhcpHost;
use crate::log::Logger;
use crate::method::Object;

pub const SC: &str = "sc-3f1e2d4c-5b6a-4798-8a9b-0c1d2e3f4a5b";
/// The config's network (config::tests::sample).
pub const NET: &str = "bosh-net";
pub const VM: &str = "vm-0d8e4c4e-6f37-4d4b-9e51-4c1f1f2b9a10";
pub const OTHER_VM: &str = "vm-7b2f0a11-3c44-4e55-8a66-9d7700bb1122";

pub fn log() -> Logger {
    Logger::new(None, "test")
}

pub fn config() -> Config {
    Config::from_value(crate::config::tests::sample(), &Map::new()).expect("config")
}

pub fn obj(v: Value) -> Object {
    v.as_object().cloned().unwrap_or_default()
}

/// A host with a 5 GiB qcow2 stemcell `SC` and the config's network running.
pub fn fake() -> FakeHost {
    let host = FakeHost::new();
    host.put_stemcell(
        SC,
        5 << 30,
        &json!({"cloud_properties": {}, "format": "qcow2", "virtual_size": 5u64 << 30}),
    );
    host.put_network(NET, "10.0.16.0/24");
    host
}

/// One manual network, `private`, on the config's libvirt network.
pub fn manual(ip: &str) -> Value {
    json!({"private": {
        "type": "manual", "ip": ip, "netmask": "255.255.255.0",
        "gateway": "10.0.16.1", "default": ["dns", "gateway"], "cloud_properties": {}
    }})
}

pub fn entry(mac: &str, name: &str, ip: &str) -> DhcpHost {
    DhcpHost {
        mac: Some(mac.into()),
        name: Some(name.into()),
        ip: Some(ip.into()),
    }
}

/// create_vm of agent-1 on `SC` with these networks and cloud_properties,
/// as a caller of stemcell API `api` asks.
pub fn create_with(host: &FakeHost, networks: Value, cp: Value, api: Option<u64>) -> Result<Value> {
    let (networks, cp): (Object, Object) = (obj(networks), obj(cp));
    create_vm(
        host,
        &mut log(),
        &config(),
        CreateVm {
            agent_id: "agent-1",
            stemcell_cid: SC,
            cloud_properties: &cp,
            networks: &networks,
            disk_cids: &[],
            env: &json!({}),
            stemcell_api: api,
        },
    )
}
