//! has_vm, reboot_vm, set_vm_metadata, calculate_vm_cloud_properties: the
//! VM methods that only look at or act on an existing VM. A CID that is not
//! ours is an absent VM, never a lookup.

use std::time::Duration;

use serde_json::Value;

use crate::error::{CpiError, Result};
use crate::host::{RebootOutcome, VmHost};
use crate::log::Logger;
use crate::method::Object;
use crate::names;
use crate::vm_spec;

/// True while a domain of that name is defined (running or not); a CID that is
/// not ours is simply absent. Errors only for infrastructure failures.
pub fn has_vm(host: &dyn VmHost, vm_cid: &str) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Ok(Value::Bool(false));
    }
    let found = host.vm_exists(vm_cid)?;
    Ok(Value::Bool(found))
}

pub fn calculate_vm_cloud_properties(cpu: u64, ram_mib: u64, ephemeral_mib: u64) -> Result<Value> {
    vm_spec::cloud_properties_for(cpu, ram_mib, ephemeral_mib).map_err(CpiError::cloud)
}

/// Reboots the VM, giving the guest `grace` to do it itself.
pub fn reboot_vm(
    host: &dyn VmHost,
    log: &mut Logger,
    vm_cid: &str,
    grace: Duration,
) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let outcome = host
        .reboot_vm(vm_cid, grace)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    log.summary(match outcome {
        RebootOutcome::Graceful => format!("{vm_cid} rebooted"),
        RebootOutcome::HardReset => format!(
            "{vm_cid} did not reboot within {}s of the ACPI request: reset",
            grace.as_secs()
        ),
        RebootOutcome::Started => format!("{vm_cid} was shut off: started"),
    });
    Ok(Value::Null)
}

pub fn set_vm_metadata(
    host: &dyn VmHost,
    log: &mut Logger,
    vm_cid: &str,
    metadata: &Object,
) -> Result<Value> {
    if !names::is_vm_cid(vm_cid) {
        return Err(CpiError::vm_not_found(vm_cid));
    }
    let facts = host
        .vm_facts(vm_cid)?
        .ok_or_else(|| CpiError::vm_not_found(vm_cid))?;
    let mut md = facts.metadata.unwrap_or_default();
    md.tags = metadata
        .iter()
        .map(|(k, v)| {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), text)
        })
        .collect();
    host.set_vm_metadata(vm_cid, &md)?;
    let title = title_for(metadata);
    if let Some(title) = &title {
        host.set_vm_title(vm_cid, title)?;
    }
    log.summary(format!(
        "metadata of {vm_cid} set ({} keys{})",
        md.tags.len(),
        title.map(|t| format!(", title '{t}'")).unwrap_or_default()
    ));
    Ok(Value::Null)
}

/// `name`, else `job/index`, as a one-line title.
fn title_for(metadata: &Object) -> Option<String> {
    let s = |k: &str| match metadata.get(k) {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        _ => None,
    };
    let title = s("name").or_else(|| match (s("job"), s("index")) {
        (Some(j), Some(i)) => Some(format!("{j}/{i}")),
        (Some(j), None) => Some(j),
        _ => None,
    })?;
    Some(
        title
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(200)
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn titles() {
        let m = |v: Value| v.as_object().unwrap().clone();
        assert_eq!(
            title_for(&m(json!({"name": "redis/ce7d", "job": "redis"}))).as_deref(),
            Some("redis/ce7d")
        );
        assert_eq!(
            title_for(&m(json!({"job": "redis", "index": "0"}))).as_deref(),
            Some("redis/0")
        );
        assert_eq!(
            title_for(&m(json!({"name": "a\nb"}))).as_deref(),
            Some("a b")
        );
        assert_eq!(title_for(&m(json!({"director": "d"}))), None);
    }
}
